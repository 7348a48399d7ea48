"""Data as users have it: 16-bit PNGs, empty class folders, a flat folder of images, unreadable files named, a batch
larger than the data; FAR's code cache follows the folder's changes.

Run: python -m pytest tests/test_own_data.py -q
"""
import io
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import codes  # noqa: E402
import evaluate  # noqa: E402
import images  # noqa: E402
import train_far  # noqa: E402
import train_tokenizer  # noqa: E402
from images import ImageFolder, open_rgb  # noqa: E402

TOKENIZER = ["--preset", "tiny8", "--image-size", "32", "--global-batch-size", "4", "--num-workers", "0",
             "--log-every", "1", "--eval-every", "1000", "--sample-every", "1000", "--max-steps", "2"]
FAR = ["--global-batch-size", "8", "--log-every", "1", "--eval-every", "1000", "--sample-every", "1000",
       "--max-steps", "2", "--augment", "flip", "--extract-batch-size", "4"]   # 2 views: quick to extract


def photo(rng, size=(40, 48)):
    return rng.integers(0, 256, (*size, 3), dtype=np.uint8)


def folder(root, classes, per_class=2, seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for j in range(per_class):
            Image.fromarray(photo(rng)).save(root / c / f"{j}.png")
    return root


def test_16_bit_grayscale_png_equals_its_8_bit_image(tmp_path):
    """PIL opens 16-bit grayscale as mode I;16, whose convert("RGB") clips to white; open_rgb scales it. An 8-bit
    image stored in 16 bits (v * 257) comes back exactly; 16-bit RGB (which PIL reduces itself) too."""
    a8 = np.random.default_rng(0).integers(0, 256, (20, 30), dtype=np.uint8)
    Image.fromarray(a8.astype(np.uint16) * 257).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode == "I;16"
    assert np.array_equal(np.asarray(open_rgb(tmp_path / "gray16.png")), np.repeat(a8[..., None], 3, 2))
    rgb = np.random.default_rng(1).integers(0, 256, (6, 7, 3)).astype(np.uint16)   # 48-bit PNG, written by hand
    rows = b"".join(b"\x00" + (rgb[y] * 257).astype(">u2").tobytes() for y in range(6))
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 7, 6, 16, 2, 0, 0, 0)) +
           chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    assert np.array_equal(np.asarray(open_rgb(io.BytesIO(png))), rgb.astype(np.uint8))


def test_empty_class_folders_keep_every_id_and_are_named(tmp_path, capsys):
    root = folder(tmp_path / "data", ["a", "c"])
    os.makedirs(root / "b")                                              # no images: "c" keeps label 2
    ds = ImageFolder(str(root), (32, 32))
    assert ds.classes == ["a", "b", "c"] and ds.empty == ["b"] and {label for _, label in ds.samples} == {0, 2}
    train_tokenizer.main(TOKENIZER + ["--data-path", str(root), "--out-dir", str(tmp_path / "tok")])
    assert "class folders without images (their ids are kept): b" in capsys.readouterr().out


def test_a_flat_folder_trains_the_tokenizer_and_is_evaluated_but_far_names_the_layout(tmp_path, tok_ckpt, capsys):
    rng = np.random.default_rng(0)
    (tmp_path / "flat").mkdir()
    for j in range(6):
        Image.fromarray(photo(rng)).save(tmp_path / "flat" / f"{j}.jpg")
    train_tokenizer.main(TOKENIZER + ["--data-path", str(tmp_path / "flat"), "--out-dir", str(tmp_path / "tok")])
    res = evaluate.main(["--tokenizer-ckpt", tok_ckpt, "--data-path", str(tmp_path / "flat"), "--num-workers", "0",
                         "--no-fid", "--no-lpips", "--out-json", str(tmp_path / "res.json")])
    assert res["images"] == 6 and res["psnr"] > 0
    with pytest.raises(SystemExit) as e:
        train_far.main(FAR + ["--tokenizer-ckpt", tok_ckpt, "--data-path", str(tmp_path / "flat"),
                              "--out-dir", str(tmp_path / "far")])
    assert e.value.code == 2 and "FAR needs class folders, root/<class>/<image>" in capsys.readouterr().err


def test_unreadable_files_are_named(tmp_path, tok_ckpt, capsys):
    root = folder(tmp_path / "data", ["a", "b"])
    (root / "b" / "broken.png").write_bytes(b"not a png")
    train_tokenizer.main(TOKENIZER + ["--data-path", str(root), "--out-dir", str(tmp_path / "tok"),
                                      "--global-batch-size", "5", "--max-steps", "3"])
    last = [json.loads(line) for line in open(tmp_path / "tok" / "log.jsonl")][-1]
    assert last["unreadable_images"] == 1 and last["unreadable_files"] == [str(root / "b" / "broken.png")]
    train_far.main(FAR + ["--tokenizer-ckpt", tok_ckpt, "--data-path", str(root), "--out-dir", str(tmp_path / "far")])
    assert f"unreadable: {root / 'b' / 'broken.png'}" in capsys.readouterr().out


def test_a_batch_larger_than_the_data_exits_2_before_any_work(tmp_path, tok_ckpt, capsys):
    root = folder(tmp_path / "data", ["a", "b"], per_class=3)           # 6 images
    with pytest.raises(SystemExit) as e:
        train_tokenizer.main(TOKENIZER + ["--data-path", str(root), "--out-dir", str(tmp_path / "tok"),
                                          "--global-batch-size", "8"])
    assert e.value.code == 2 and "--global-batch-size 8 is larger than the data: 6 images" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:                                 # 6 images x 10 views < 64
        train_far.main(FAR + ["--tokenizer-ckpt", tok_ckpt, "--data-path", str(root), "--augment", "tencrop",
                              "--global-batch-size", "64", "--out-dir", str(tmp_path / "far")])
    assert e.value.code == 2 and "6 images x 10 views" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "far" / "codes")                # refused before extraction
    # fewer images than the batch, but enough views: FAR trains (a batch may hold two views of one image); the tiny
    # recipe's 40 random crops of each 40 x 48 photo
    train_far.main(FAR + ["--tokenizer-ckpt", tok_ckpt, "--data-path", str(root), "--augment", "random",
                          "--out-dir", str(tmp_path / "ok")])
    assert torch.load(tmp_path / "ok" / "checkpoints" / "last.pt", weights_only=True)["step"] == 2


def test_far_extracts_again_when_the_folder_changes(tmp_path, tok_ckpt, capsys):
    """The code cache records the files (sizes, mtimes, labels), the classes, the tokenizer and the crops: a new class
    and a removed image make the next run extract again, with the new class's label; another tokenizer is refused."""
    root = folder(tmp_path / "data", ["a", "c"])
    out = tmp_path / "far"
    train_far.main(FAR + ["--tokenizer-ckpt", tok_ckpt, "--data-path", str(root), "--out-dir", str(out)])
    folder(root, ["b"], seed=1)                                          # a new class between the two
    os.remove(root / "c" / "1.png")
    train_far.main(FAR + ["--tokenizer-ckpt", tok_ckpt, "--data-path", str(root), "--out-dir", str(tmp_path / "far2")])
    os.symlink(tmp_path / "far" / "codes", tmp_path / "far3")             # the first run's codes, now stale
    (tmp_path / "run3").mkdir()
    os.symlink(tmp_path / "far3", tmp_path / "run3" / "codes")
    capsys.readouterr()
    train_far.main(FAR + ["--tokenizer-ckpt", tok_ckpt, "--data-path", str(root), "--out-dir", str(tmp_path / "run3")])
    assert "were made from other data (4 files, classes other): extracting again" in capsys.readouterr().out
    meta = json.load(open(tmp_path / "run3" / "codes" / "train" / "meta.json"))
    assert meta["classes"] == ["a", "b", "c"] and meta["files"] == 5
    labels = np.asarray(codes.load_shards(str(tmp_path / "run3" / "codes" / "train"), meta["shards"])[1])
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 2]                   # b is class 1, c (one image left) class 2
    other = str(tmp_path / "other.pt")                                   # another tokenizer: refused, not mixed
    state = torch.load(tok_ckpt, weights_only=True)
    state["model"] = {k: v + 1 if k.endswith("embedding.weight") else v for k, v in state["model"].items()}
    torch.save(state, other)
    with pytest.raises(SystemExit) as e:
        train_far.main(FAR + ["--tokenizer-ckpt", other, "--data-path", str(root), "--out-dir",
                              str(tmp_path / "run3"), "--resume"])
    assert e.value.code == 2 and "holds the codes of another tokenizer" in capsys.readouterr().err


def test_images_without_torchvision_equal_torchvision(tmp_path):
    """images.py reads and writes pictures without importing torchvision (1-2 s at every script start): to_tensor is
    pil_to_tensor's, save_grid draws make_grid's picture (2-px black gaps; one image alone, no border), and no entry
    script imports torchvision but for the paper recipe's ten-crop, LPIPS and Inception (torch-fidelity)."""
    import torchvision
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8))
    assert torch.equal(images.to_tensor(img), torchvision.transforms.functional.pil_to_tensor(img).float() / 127.5 - 1)
    for n, nrow in [(1, 4), (2, 2), (5, 3), (7, 8), (3, 1)]:
        x = torch.from_numpy(rng.integers(0, 256, (n, 3, 5, 7), dtype=np.uint8))
        images.save_grid(x, tmp_path / "grid.png", nrow)
        want = torchvision.utils.make_grid(x, nrow=nrow, padding=2).permute(1, 2, 0).numpy()
        assert np.array_equal(np.asarray(Image.open(tmp_path / "grid.png")), want), (n, nrow)
    script = ("import sys; sys.argv = ['x']; import train_tokenizer, train_far, sample, evaluate; "
              "print('torchvision' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True).stdout == "False\n"
