"""Fine-tuning (--init-from) from the shipped weights, our checkpoints and released FQGAN / FAR files, and the README's
"Train on your own images" commands end to end on a small folder made here.

Run: python -m pytest tests/test_finetune.py -q
"""
import argparse
import json
import os
import re
import shutil
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
sys.path.insert(0, ROOT)
sys.path.insert(0, TESTS)
import parity_weights  # noqa: E402
import sample  # noqa: E402
import train_far  # noqa: E402
import train_tokenizer  # noqa: E402
from checkpoints import CheckpointError, far_ours_to_official, init_weights, load_far, load_tokenizer  # noqa: E402
from images import ImageFolder  # noqa: E402
from tokenizer import PRESETS, Tokenizer, TokenizerConfig  # noqa: E402

SHIPPED_TOKENIZER, SHIPPED_FAR = (os.path.join(ROOT, "weights", f) for f in ("tiny_tokenizer.pt", "tiny_far.pt"))
TABLE = "cls_embedding.embedding_table.weight"                         # FAR's class table: a row per class, then null
QUICK = ["--num-workers", "0", "--log-every", "1", "--eval-every", "1000", "--sample-every", "1000"]


@pytest.fixture(scope="module")
def own_images(tmp_path_factory):
    """Three classes of photo-like images (smooth colour fields, 80 x 96 px), two each: a user's own folder."""
    root, rng = tmp_path_factory.mktemp("mine"), np.random.default_rng(0)
    for c in ("boats", "cats", "trees"):
        os.makedirs(root / c)
        for j in range(2):
            small = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
            Image.fromarray(small).resize((96, 80), Image.BICUBIC).save(root / c / f"{j}.jpg")
    return root


def test_init_from_the_shipped_tokenizer_starts_at_its_weights(own_images, tmp_path):
    """Step 0 of the fine-tuning run is the shipped model: its held-out PSNR before training is the shipped model's."""
    out = tmp_path / "tok"
    train_tokenizer.main(QUICK + ["--preset", "tiny64", "--init-from", SHIPPED_TOKENIZER, "--data-path",
                                  str(own_images), "--val-path",
                                  str(own_images), "--global-batch-size", "4", "--max-steps", "1",
                                  "--out-dir", str(out)])
    first = next(r for r in map(json.loads, open(out / "log.jsonl")) if "val_psnr" in r)
    shipped = load_tokenizer(SHIPPED_TOKENIZER)
    val = ImageFolder(str(own_images), shipped.cfg.image_shape, train=False)
    assert first["step"] == 0 and first["val_psnr"] == pytest.approx(train_tokenizer.psnr_on([shipped], val, "cpu")[0],
                                                                     abs=1e-9)
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == 1   # the count starts at 0


def test_init_from_another_architecture_exits_2_naming_it(own_images, tmp_path, capsys):
    """The default preset (tiny, 48 channels) is not the shipped tokenizer's (tiny64): the error names tiny64; a file
    that no preset fits (another codebook size) gets the flags to choose."""
    other = tmp_path / "k256.pt"
    cfg = TokenizerConfig(**{**PRESETS["tiny"], "codebook_size": 256})
    torch.save({"model": Tokenizer(cfg).state_dict(), "config": asdict(cfg)}, other)
    for source, hint in ((SHIPPED_TOKENIZER, "it is --preset tiny64"), (str(other), "choose its --preset (and")):
        with pytest.raises(SystemExit) as e:
            train_tokenizer.main(QUICK + ["--init-from", source, "--data-path", str(own_images),
                                          "--global-batch-size", "4", "--out-dir", str(tmp_path / "run")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "has another architecture than this run" in err and hint in err, err


def test_init_from_a_released_fqgan_file(tmp_path):
    """A released FQGAN-Dual f16 file (the official names; deterministic weights of its key listing) initialises the
    fqgan-dual-16 preset: every tensor of the file, renamed, and nothing else."""
    sd = parity_weights.make_state_dict("fqgan_dual_tokenizer_keys.txt", seed=0)
    torch.save({"model": sd, "args": argparse.Namespace(image_size=256)}, tmp_path / "fqgan_dual_ds16.pt")
    released = load_tokenizer(tmp_path / "fqgan_dual_ds16.pt")
    tok = Tokenizer(TokenizerConfig(**PRESETS["fqgan-dual-16"]))
    assert init_weights(tok, released, "--init-from fqgan_dual_ds16.pt") == []
    assert all(torch.equal(v, released.state_dict()[k]) for k, v in tok.state_dict().items())
    assert torch.equal(tok.state_dict()["branches.1.quantize.embedding.weight"], sd["quantize_sem.embedding.weight"])
    with torch.device("meta"):                                          # refused on names and shapes: no weights
        triple = Tokenizer(TokenizerConfig(**PRESETS["fqgan-triple-16"]))
    with pytest.raises(CheckpointError, match="another architecture"):
        init_weights(triple, released, "--init-from x")


def test_far_of_another_architecture_names_the_preset_that_fits_it():
    """The hint of init_weights for FAR: a file that is exactly a FAR preset is named; another one gets the flags."""
    source = train_far.FAR(train_far.FARConfig(**train_far.PRESETS["tiny"]))
    small = {**train_far.PRESETS["tiny"], "dim": 64, "n_head": 1, "n_layer": 1, "ar_head_layers": 1}
    with pytest.raises(CheckpointError, match="it is --preset tiny$"):
        init_weights(train_far.FAR(train_far.FARConfig(**small)), source, "--init-from x")
    with pytest.raises(CheckpointError, match="choose its --preset"):
        init_weights(source, train_far.FAR(train_far.FARConfig(**small)), "--init-from x")


def test_a_wrong_far_init_from_exits_2_before_the_codes_are_extracted(own_images, tmp_path, capsys):
    """The tokenizer file given as FAR's --init-from (the pair swapped), and a FAR with another head: one line, exit 2,
    and no codes written (at ImageNet scale the extraction takes an hour; the file is checked on the meta device).
    A resumed run does not read it again."""
    swapped = "is not a FAR of this project or the official code: it holds a tokenizer"
    for source, head, message in ((SHIPPED_TOKENIZER, "ar", swapped),
                                  (SHIPPED_FAR, "mlp", "has another architecture than this run")):
        out = tmp_path / head
        with pytest.raises(SystemExit) as e:
            train_far.main(QUICK + ["--init-from", source, "--head", head, "--data-path", str(own_images),
                                    "--global-batch-size", "4", "--out-dir", str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and source in err, err
        assert not os.path.exists(out / "codes")
    # a resumed run continues from its last.pt: the --init-from file of its first start is not read again
    source, flags = tmp_path / "far.pt", ["--data-path", str(own_images), "--global-batch-size", "4", "--augment",
                                          "none", "--sample-every", "0", "--out-dir", str(tmp_path / "resumed")]
    shutil.copy(SHIPPED_FAR, source)
    train_far.main(QUICK + flags + ["--init-from", str(source), "--max-steps", "1"])
    os.remove(source)
    train_far.main(QUICK + flags + ["--init-from", str(source), "--max-steps", "2", "--resume"])
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)["step"] == 2


def test_far_init_from_shipped_and_released_files_with_other_classes(own_images, tmp_path, capsys):
    """The shipped tiny FAR (11 classes) and the same weights in the released format initialise a FAR on 3 classes:
    every tensor but the class table comes from the file (an lr of 1e-12 keeps step 1 where step 0 was). The table's
    rows go by class name where the file names its classes (none of boats, cats, trees is a shipped class; after a
    rename, two are), as they are from a released file of as many classes, and CFG's null row comes from the file."""
    shipped, names = load_far(SHIPPED_FAR), torch.load(SHIPPED_FAR, weights_only=True)["classes"]
    rows = shipped.state_dict()[TABLE]                                  # (11 classes + the null row, 128)
    released = tmp_path / "far_released.pt"
    torch.save({"model": far_ours_to_official(shipped.state_dict()), "args": argparse.Namespace(image_size=64,
               downsample_size=4)}, released)

    def init(name, source, data):                                       # -> the checkpoint after one step, the output
        train_far.main(QUICK + ["--init-from", source, "--data-path", str(data), "--augment", "none", "--global-batch-"
                                "size", "4", "--max-steps", "1", "--lr", "1e-12", "--sample-every", "0",   # no PNGs
                                "--out-dir", str(tmp_path / name)])
        assert not os.path.exists(tmp_path / name / "samples")          # not even an empty folder
        state = torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)
        for k, v in shipped.state_dict().items():
            if k != TABLE:
                torch.testing.assert_close(state["model"][k], v, atol=1e-6, rtol=0, msg=k)
        return state, capsys.readouterr().out

    close = lambda a, b: torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for name, source in (("shipped", SHIPPED_FAR), ("released", str(released))):
        state, out = init(name, source, own_images)
        assert "class table: 0 of 3 classes from the file by name, the others afresh, CFG's null row from the " \
            "file" in out
        assert state["config"]["num_classes"] == 3 and state["classes"] == ["boats", "cats", "trees"]
        table = state["model"][TABLE]
        assert table.shape == (4, 128)                                  # 3 classes + the null row
        close(table[3], rows[11])
        assert (table[:3, None] - rows[None]).abs().amax(-1).min() > 1e-3   # no class row is one of the file's
    fresh = table[:3]
    renamed = tmp_path / "renamed"                                      # classes brick, cats, coffee
    shutil.copytree(own_images, renamed)
    os.rename(renamed / "boats", renamed / "brick")
    os.rename(renamed / "trees", renamed / "coffee")
    state, out = init("renamed", SHIPPED_FAR, renamed)
    assert "class table: 2 of 3 classes from the file by name (brick, coffee), the others afresh" in out
    table = state["model"][TABLE]
    close(table[0], rows[names.index("brick")])
    close(table[1], fresh[1])                                           # cats: this run's own initialisation
    close(table[2], rows[names.index("coffee")])
    close(table[3], rows[11])
    # a released file (no class names) of as many classes as the data: its table as it is
    torch.save({"model": far_ours_to_official(state["model"]), "args": argparse.Namespace(image_size=64,
               downsample_size=4)}, released)
    state, out = init("released3", str(released), own_images)
    assert "its class table as it is: the file names no classes" in out
    close(state["model"][TABLE], table)


def test_the_readme_commands_on_your_own_images(own_images, tmp_path, monkeypatch, capsys):
    """README "Train on your own images": a tokenizer fine-tuned from the shipped one, FAR on its codes from the
    shipped FAR, samples of the user's class 1; the commands as written but for the step counts, each script's
    main(argv) run from the user's folder (what `python SCRIPT` runs; test_scale.py starts each script as a process).
    Then weights/README.md's fp16 exports of the two runs, and samples from the exported pair."""
    monkeypatch.chdir(tmp_path)
    steps = ["--max-steps", "2", "--eval-every", "1000", "--sample-every", "1000"]
    train_tokenizer.main(["--preset", "tiny64", "--data-path", str(own_images), "--init-from", SHIPPED_TOKENIZER,
                          "--global-batch-size", "4", "--out-dir", "runs/my-tokenizer", *steps])
    train_far.main(["--data-path", str(own_images), "--tokenizer-ckpt", "runs/my-tokenizer/checkpoints/last.pt",
                    "--init-from", SHIPPED_FAR, "--global-batch-size", "8", "--out-dir", "runs/my-far", *steps])
    capsys.readouterr()
    sample.main(["--far-ckpt", "runs/my-far/checkpoints/last.pt", "--class-id", "1", "--per-class", "2"])
    assert "samples of class 1 (cats)" in capsys.readouterr().out
    assert Image.open(tmp_path / "samples.png").size == (2 + 2 * 66, 2 + 66)
    # weights/README.md's fp16 exports of the two runs, their code as written there but for the run folders (from the
    # same folder); sample.py then finds the tokenizer beside the exported FAR by its bare name
    os.makedirs("weights")
    exports = weights_readme_exports()
    for out in ("weights/tiny_tokenizer.pt", "weights/tiny_far.pt"):
        exec(exports[out].replace("runs/far-tiny/", "runs/my-far/").replace("runs/tiny/", "runs/my-tokenizer/"), {})
    ema = torch.load("runs/my-tokenizer/checkpoints/last.pt", weights_only=True)["ema"]   # fp32
    exported = load_tokenizer("weights/tiny_tokenizer.pt").state_dict()
    assert exported.keys() == ema.keys() and all(torch.equal(v, ema[k].half().float()) for k, v in exported.items())
    sample.main(["--far-ckpt", "weights/tiny_far.pt", "--class-id", "1", "--per-class", "2", "--out", "fp16.png"])
    assert "samples of class 1 (cats)" in capsys.readouterr().out and os.path.isfile("fp16.png")


def weights_readme_exports():
    """{file written: code} of the `python -c "..."` exports in weights/README.md (bash joins a line that ends in a
    backslash with the next one inside double quotes too)."""
    text = open(os.path.join(ROOT, "weights", "README.md")).read().replace("\\\n", "")
    return {re.search(r"'(weights/\w+\.pt)'\)$", code)[1]: code for code in re.findall(r'python -c "(.*?)"', text)}
