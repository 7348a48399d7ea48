"""train_far.py: code extraction, exact resume, non-finite stop, bad flags.

Run: python -m pytest tests/test_train_far.py -q
"""
import json
import math
import os
import shutil
import signal
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoints  # noqa: E402
import codes as codes_module  # noqa: E402
import train_far  # noqa: E402
from checkpoints import load_tokenizer  # noqa: E402
from images import center_crop, to_tensor  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

# --augment flip: two views per image, still drawn at random by the loader (the tiny recipe's 40 random crops made each
# run's extraction encode 440 views: ~2 s)
FAST = ["--preset", "tiny", "--global-batch-size", "8", "--log-every", "1", "--eval-every", "2",
        "--sample-every", "100", "--ckpt-every", "100", "--extract-batch-size", "8", "--precision", "fp32",
        "--augment", "flip"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three classes of small random photos, plus one corrupt file and one grayscale image."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        os.makedirs(root / c)
        for j in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / c / f"{j}.png")
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(root / "a" / "gray.png")
    (root / "b" / "broken.png").write_bytes(b"not a png")
    return str(root)


def run(tok_ckpt, data, out, *extra):
    train_far.main(FAST + ["--tokenizer-ckpt", tok_ckpt, "--data-path", data, "--out-dir", str(out), *extra])
    return torch.load(out / "checkpoints" / "last.pt", weights_only=True)


def test_extraction_views_codes_and_unreadable_images(tok_ckpt, data, tmp_path):
    tok = load_tokenizer(tok_ckpt)
    codes, labels = codes_module.extract_codes(tok, data, str(tmp_path / "c"), "tencrop", 4, torch.device("cpu"),
                                            0, 1)
    assert codes.shape == (11, 10, 2, 4, 4) and labels.shape == (11,)
    files = codes_module.Views(data, (32, 32), "tencrop").folder.samples
    broken = [i for i, (p, _) in enumerate(files) if p.endswith("broken.png")]
    assert labels[broken[0]] == -1 and (labels >= 0).sum() == 10           # skipped, and counted in meta.json
    assert json.load(open(tmp_path / "c" / "meta.json"))["unreadable"] == 1
    # view 4 of ten-crop is the centre crop of the 1.1x centre crop; views 5..9 are the flipped ones
    img = Image.open(files[0][0]).convert("RGB")
    centre = TF.center_crop(center_crop(img, (35, 35)), [32, 32])          # torchvision's rounding, as TenCrop
    assert torch.equal(torch.from_numpy(codes[0, 4].astype(np.int64)), tok.encode(to_tensor(centre)[None])[0])
    flipped = TF.center_crop(center_crop(img, (35, 35)).transpose(Image.FLIP_LEFT_RIGHT), [32, 32])
    assert torch.equal(torch.from_numpy(codes[0, 9].astype(np.int64)), tok.encode(to_tensor(flipped)[None])[0])
    # a second call reuses the files; codes of another tokenizer in the same folder are refused
    again = codes_module.extract_codes(tok, data, str(tmp_path / "c"), "tencrop", 4, torch.device("cpu"), 0, 1)
    assert np.array_equal(again[0], codes)
    other = Tokenizer(tok.cfg)
    with pytest.raises(codes_module.CheckpointError, match="another tokenizer"):
        codes_module.extract_codes(other, data, str(tmp_path / "c"), "tencrop", 4, torch.device("cpu"), 0, 1)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")   # 3 > this machine's 2 cores
def test_extraction_loads_images_with_num_workers_but_at_least_2(tok_ckpt, data, tmp_path, monkeypatch):
    """--num-workers sets the extraction's image loader too (the paper recipe's 4 decode JPEGs for the GPU's encoder);
    the tiny recipe's 0 (its codes are read in the main process) still decodes its images in 2 workers. Before they
    are forked, the heap's free pages go back to the kernel (images.release_free_memory), once per extraction."""
    seen, real = [], codes_module.DataLoader
    monkeypatch.setattr(codes_module, "DataLoader", lambda *a, **kw: seen.append(kw["num_workers"]) or real(*a, **kw))
    monkeypatch.setattr(codes_module, "release_free_memory", lambda: seen.append("released"))
    run(tok_ckpt, data, tmp_path / "zero", "--max-steps", "1", "--num-workers", "0")
    assert seen == [2, "released"]
    seen.clear()
    run(tok_ckpt, data, tmp_path / "three", "--max-steps", "1", "--num-workers", "3")
    assert seen == [3, "released"]


def test_resume_equals_uninterrupted_bit_for_bit(tok_ckpt, data, tmp_path, killed_after):
    cosine = ["--max-steps", "4", "--ckpt-every", "2", "--lr-decay", "cosine", "--warmup-steps", "1"]   # lr by step
    ctrl_c = signal.getsignal(signal.SIGINT)                              # Python's: raise KeyboardInterrupt
    full = run(tok_ckpt, data, tmp_path / "full", *cosine)
    killed_after(train_far, FAST + ["--tokenizer-ckpt", tok_ckpt, "--data-path", data, "--out-dir",
                                    str(tmp_path / "split"), *cosine], 2)                     # last.pt at step 2
    resumed = run(tok_ckpt, data, tmp_path / "split", *cosine, "--resume")
    assert full["step"] == resumed["step"] == 4
    for name, value in full["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    for i, state in full["opt"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, resumed["opt"]["state"][i][name])
    losses = [[r["loss"] for r in map(json.loads, open(tmp_path / d / "log.jsonl")) if "loss" in r]
              for d in ("full", "split")]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    assert signal.getsignal(signal.SIGINT) is ctrl_c    # after a run killed mid-way and one that ended: Ctrl-C as before
    # the checkpoint names the tokenizer it was trained on and the class names
    assert full["tokenizer"]["path"] == os.path.abspath(tok_ckpt) and full["classes"] == ["a", "b", "c"]
    assert full["config"]["num_classes"] == 3 and full["config"]["codebook_size"] == 512


def test_resume_of_another_run_exits_2_and_without_a_checkpoint_starts_fresh(tok_ckpt, data, tmp_path, capsys):
    """--resume refuses a last.pt of another --global-batch-size, --seed or model (its data position and weights would
    mean something else) with exit 2 and leaves it as it was; with no last.pt yet it says so and trains from step 0, and
    a finished run resumed says that there is nothing to train. And
    the global batch must split over the ranks (checkpoints.start_training, for both training scripts)."""
    run(tok_ckpt, data, tmp_path / "a", "--max-steps", "1")
    last = tmp_path / "a" / "checkpoints" / "last.pt"
    before = last.read_bytes()
    run(tok_ckpt, data, tmp_path / "a", "--max-steps", "1", "--resume")  # a finished run: said, nothing trained
    assert "is at step 1, --max-steps is 1: nothing to train" in capsys.readouterr().out and last.read_bytes() == before
    for other, what in ((["--global-batch-size", "4"], "global_batch_size 4 (the checkpoint's: 8)"),
                        (["--head", "mlp"], "head mlp (the checkpoint's: ar)"),
                        (["--seed", "3"], "seed 3 (the checkpoint's: 0)")):
        with pytest.raises(SystemExit) as e:
            run(tok_ckpt, data, tmp_path / "a", "--max-steps", "2", "--resume", *other)
        assert e.value.code == 2 and f"another model config, --global-batch-size or --seed: {what}; " in \
            capsys.readouterr().err
        assert last.read_bytes() == before
    shutil.copytree(tmp_path / "a" / "checkpoints", tmp_path / "e" / "checkpoints")   # a run folder without its codes
    for damage, what in ((lambda: None, "seed 3 (the checkpoint's: 0)"),
                         (lambda: (tmp_path / "e" / "checkpoints" / "last.pt").write_bytes(before[:1000]),
                          "is not a complete PyTorch checkpoint")):
        damage()
        with pytest.raises(SystemExit) as e:                            # refused before minutes of extraction
            run(tok_ckpt, data, tmp_path / "e", "--max-steps", "2", "--resume", "--seed", "3")
        assert e.value.code == 2 and what in capsys.readouterr().err and not (tmp_path / "e" / "codes").exists()
    other = tmp_path / "other"                                          # the same photos, a class renamed
    shutil.copytree(data, other)
    os.rename(other / "c", other / "d")
    with pytest.raises(SystemExit) as e:
        run(tok_ckpt, str(other), tmp_path / "a", "--max-steps", "2", "--resume")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "trained on other classes than --data-path" in err and "(missing: c; new: d)" in err
    assert last.read_bytes() == before and os.listdir(tmp_path / "a" / "codes") == ["train"]   # nor extracted
    assert run(tok_ckpt, data, tmp_path / "b", "--max-steps", "1", "--resume")["step"] == 1
    assert f"--resume: no {tmp_path / 'b' / 'checkpoints' / 'last.pt'} yet, starting from scratch" in \
        capsys.readouterr().out
    args, parser = train_far.parse_args(FAST + ["--tokenizer-ckpt", tok_ckpt, "--data-path", data, "--out-dir",
                                                str(tmp_path / "c"), "--global-batch-size", "3"])
    with pytest.MonkeyPatch.context() as m:                            # as under torchrun with 2 processes
        m.setattr(checkpoints, "init_distributed", lambda: (False, 0, 2, 0, torch.device("cpu")))
        with pytest.raises(SystemExit) as e:
            train_far.start_training(args, parser)
    assert e.value.code == 2 and "--global-batch-size 3 is not divisible by the world size 2" in \
        capsys.readouterr().err


def test_training_lowers_held_out_nll_on_its_own_data(tok_ckpt, data, tmp_path):
    # held-out = the training folder itself: 40 steps of lr 1e-3 must clearly beat the uniform 9 bits per sub-code
    run(tok_ckpt, data, tmp_path / "fit", "--max-steps", "40", "--eval-every", "40", "--val-path", data)
    nll = [r for r in map(json.loads, open(tmp_path / "fit" / "log.jsonl")) if "val_bits/0" in r]
    assert nll[0]["step"] == 0 and abs(nll[0]["val_bits/0"] - 9.0) < 1e-3       # zero classifiers: uniform
    assert nll[-1]["step"] == 40 and max(nll[-1]["val_bits/0"], nll[-1]["val_bits/1"]) < 8.0


def test_held_out_labels_are_the_training_folders_class_ids(tok_ckpt, data, tmp_path, monkeypatch, capsys):
    """A --val-path with some of the training classes numbers them its own way (here "c" alone is its class 0): the
    held-out NLL must condition on the training folder's id of "c" (2), not on "a"'s. A class the training data lacks,
    a missing or flat folder: exit 2 before the training codes are extracted."""
    val = tmp_path / "val"
    os.makedirs(val / "c")
    for f in os.listdir(os.path.join(data, "c")):
        Image.open(os.path.join(data, "c", f)).save(val / "c" / f)
    seen = []
    monkeypatch.setattr(train_far, "nll_bits", lambda far, val_set, *rest: (
        seen.append(sorted({val_set[i][1] for i in range(len(val_set))})), {"val_bits/0": 9.0})[1])
    run(tok_ckpt, data, tmp_path / "run", "--max-steps", "1", "--val-path", str(val))
    assert seen and all(labels == [2] for labels in seen), seen
    os.makedirs(val / "d")
    Image.open(os.path.join(data, "a", "0.png")).save(val / "d" / "0.png")
    flat = tmp_path / "flat"
    os.makedirs(flat)
    Image.open(os.path.join(data, "a", "0.png")).save(flat / "0.png")
    for path, message in ((val, "classes that --data-path does not have: d"), (tmp_path / "nope", "--val-path: data "
                          "folder not found"), (flat, "FAR needs class folders")):
        with pytest.raises(SystemExit) as e:
            run(tok_ckpt, data, tmp_path / "bad", "--val-path", str(path))
        assert e.value.code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "bad" / "codes").exists()                 # refused before the extraction


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tok_ckpt, data, tmp_path):
    good = run(tok_ckpt, data, tmp_path / "nan", "--max-steps", "2")
    before = open(tmp_path / "nan" / "checkpoints" / "last.pt", "rb").read()
    with pytest.raises(SystemExit) as e:                              # an absurd lr overflows the weights
        run(tok_ckpt, data, tmp_path / "nan", "--max-steps", "6", "--resume", "--lr", "1e30")
    assert e.value.code == 1 and good["step"] == 2
    assert open(tmp_path / "nan" / "checkpoints" / "last.pt", "rb").read() == before


@pytest.mark.parametrize("flags,message", [
    (["--preset", "far-b"], "--data-path is required"),
    (["--tokenizer-ckpt", "/nonexistent.pt"], "no such file"),
    (["--max-steps", "0"], "--max-steps 0 is out of range: must be an integer >= 1"),
    (["--head", "conv"], "invalid choice"),
])
def test_bad_flags_exit_2(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        train_far.parse_args(flags)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_copy_distance_finds_a_copied_training_view():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 512, (5, 3, 2, 4, 4), generator=g).numpy()   # 5 images x 3 views x (k, h, w)
    labels = np.array([0, 1, 2, -1, 1])                                     # image 3 unreadable: left out
    samples = torch.stack([torch.from_numpy(codes[1, 2]).long(), torch.randint(0, 512, (2, 4, 4), generator=g)])
    to_sample, between = train_far.copy_distance(samples, codes, labels)
    assert to_sample[0] == 0 and to_sample[1] > 0.9      # an exact copy of a view; a random sequence differs nearly all
    assert between.shape == (4,) and (between > 0.9).all()   # random training images are far from each other
    codes[4] = codes[0]                                  # image 4 duplicates image 0: distance 0 between them
    assert train_far.copy_distance(samples, codes, labels)[1][[0, 3]].tolist() == [0.0, 0.0]


# A sitecustomize.py that makes aot_eager torch.compile's default backend in every process started with it on
# PYTHONPATH: dynamo's graphs, AOT autograd's backward and DDP's split of them, without inductor's C++ code generation
# (with inductor, both ranks compiling its kernels cold made this test 55-60 s, 18 s without; test_far.py checks
# inductor's kernels against eager).
AOT_EAGER_SITE = """import functools, torch
compile_ = torch.compile
torch.compile = functools.wraps(compile_)(lambda *a, **kw: compile_(*a, **{"backend": "aot_eager", **kw}))
"""


def test_compiled_after_ddp_on_two_processes(tok_ckpt, data, tmp_path, two_ranks):
    """What a GPU run does by default, with gloo on this CPU: torch.compile of the DDP-wrapped FAR, the compiled
    backward split at DDP's buckets (dynamo's DDP optimizer; the backend here is aot_eager, AOT_EAGER_SITE). It trains,
    its checkpoint holds the raw module's names (no module. / _orig_mod. prefix), it is compiled once (no recompilation
    at a later step: each doubles the wait for the first steps), and it samples (the raw module) at the end. The
    held-out NLL the ranks log together (each its share of --val-path, summed) is the NLL of the whole set."""
    run, site = tmp_path / "run", tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(AOT_EAGER_SITE)
    env = {**os.environ, "TORCH_LOGS": "recompiles,ddp_graphs", "PYTHONPATH": str(site)}
    ranks = two_ranks(["train_far.py", *FAST, "--tokenizer-ckpt", tok_ckpt, "--data-path", data, "--compile",
                       "--max-steps", "3", "--sample-every", "3", "--val-path", data, "--out-dir", str(run)], env=env)
    assert not any("__recompiles" in out for out in ranks.out), ranks.out[0][-3000:]   # dynamo's log of a recompile
    assert all("---submod_1 graph---" in out for out in ranks.out)     # the graph split in two at DDP's buckets
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 3 and list(state["model"]) == list(train_far.FAR(train_far.FARConfig(**state["config"]))
                                                                  .state_dict())
    losses = [r["loss"] for r in map(json.loads, open(run / "log.jsonl")) if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert os.path.exists(run / "samples" / "0000003.png")
    val = [r for r in map(json.loads, open(run / "log.jsonl")) if "val_bits/0" in r]
    assert [r["step"] for r in val] == [0, 2, 3]                      # before training, --eval-every 2, the end
    far = train_far.FAR(train_far.FARConfig(**state["config"]))
    far.load_state_dict(state["model"])
    whole = train_far.nll_bits(far, codes_module.Codes(*codes_module.load_shards(run / "codes" / "val", 2)), "cpu")
    assert whole == pytest.approx({k: v for k, v in val[-1].items() if k.startswith("val_bits")}, rel=1e-5)


def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_that_step(tok_ckpt, data, tmp_path, two_ranks):
    """A NaN loss on rank 1 alone (an overflow in its share of the batch): both ranks stop after that step, exit 1,
    with one message, rank 0's, that names the loss (the terms are averaged over the ranks before the check; DDP's
    gradient all-reduce alone would only make rank 0's grad_norm NaN), and last.pt stays the checkpoint of step 2."""
    (tmp_path / "run.py").write_text(f"""import os, sys
sys.path.insert(0, {ROOT!r})
import train_far
real, calls = train_far.far_loss, []
def nan_on_rank_1(*a, **kw):
    out = real(*a, **kw)
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 3:             # step 3
        out["loss"] = out["loss"] * float("nan")
    return out
train_far.far_loss = nan_on_rank_1
train_far.main(sys.argv[1:])
""")
    run = tmp_path / "run"
    ranks = two_ranks([str(tmp_path / "run.py"), *FAST, "--tokenizer-ckpt", tok_ckpt, "--data-path", data,
                       "--max-steps", "4", "--ckpt-every", "2", "--out-dir", str(run)], check=False)
    assert ranks.codes[0] == 1 and ranks.codes[1] in (1, -signal.SIGTERM, 128 + signal.SIGTERM), ranks.out
    assert "non-finite loss at step 3: loss" in ranks.out[0] and "non-finite" not in ranks.out[1]
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 2


def test_copy_distance_is_bounded_by_the_limits_not_the_data(monkeypatch):
    """Above MAX_COPY_VIEWS it returns None before reading a single row; below, it reads rows a chunk at a time and
    compares at most max_queries training images with the rest (ImageNet: 1.28 M images x 10 views)."""
    class Rows:                                                       # codes (N, A, k, h, w) that count their reads
        def __init__(self, n, a):
            self.shape, self.reads = (n, a, 2, 2, 2), []

        def __getitem__(self, i):
            self.reads.append(i)
            return torch.randint(0, 8, self.shape[1:], generator=torch.Generator().manual_seed(i)).numpy()
    samples = torch.randint(0, 8, (3, 2, 2, 2))
    huge = Rows(1_281_167, 10)
    assert train_far.copy_distance(samples, huge, np.zeros(huge.shape[0], np.int64)) is None and not huge.reads
    monkeypatch.setattr(train_far, "MAX_COPY_VIEWS", 10_000)
    rows = Rows(1000, 4)
    to_sample, between = train_far.copy_distance(samples, rows, np.zeros(1000, np.int64), max_queries=50)
    assert to_sample.shape == (3,) and between.shape == (50,) and len(rows.reads) == 1000 + 50   # each row once
