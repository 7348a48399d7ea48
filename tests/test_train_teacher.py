"""train_teacher.py, the offline stand-in teacher of tiny-dual (Sec. 3.2.2): it learns, its file is a teacher the
tokenizer and evaluate.py load, and bad flags fail before any training.

Run: python -m pytest tests/test_train_teacher.py -q   (CPU, a few seconds)
"""
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, ROOT)
import train_teacher  # noqa: E402
from teachers import stand_in_teacher  # noqa: E402
from teachers import load_teacher  # noqa: E402

COLOURS = {"blue": (20, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}   # one class per colour


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """train/ and val/ ImageFolders of three classes, each a noisy field of its own colour (40 x 48 px): a crop of
    any size and place shows its class, so a teacher that learns gets every held-out image right."""
    root, rng = tmp_path_factory.mktemp("colours"), np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for name, rgb in COLOURS.items():
            os.makedirs(root / split / name)
            for j in range(n):
                pixels = np.clip(np.array(rgb) + rng.normal(0, 25, (40, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{j}.png")
    return root


def flags(photos, out, *extra):
    return ["--data-path", str(photos / "train"), "--val-path", str(photos / "val"), "--image-size", "16",
            "--width", "16", "--batch-size", "8", "--out", str(out), *extra]


def test_it_learns_the_classes_and_writes_a_teacher_that_loads(photos, tmp_path, capsys):
    out = tmp_path / "teacher.pt"
    train_teacher.main(flags(photos, out, "--steps", "100"))
    assert sorted(os.listdir(tmp_path)) == ["teacher.pt"]               # atomic: no .tmp left beside it
    state = torch.load(out, weights_only=True)                         # plain types only
    assert state["classes"] == sorted(COLOURS) and state["steps"] == 100
    assert state["command"].startswith("python train_teacher.py --data-path ")   # how to make it again
    assert state["config"] == {"num_classes": 3, "width": 16, "image_size": 16}
    assert state["val_accuracy"] == 1.0, state["val_accuracy"]         # chance 1/3; 1.0 from ~45 steps on
    assert "held-out accuracy 1.000 on 6 photos" in capsys.readouterr().out
    teacher = load_teacher(f"cnn:{out}")                               # the tokenizer's teacher spec
    assert teacher(torch.zeros(2, 3, 16, 16)).shape == (2, 16)          # pooled features (B, width)
    assert stand_in_teacher(str(out), "cpu")[1] == sorted(COLOURS)     # evaluate.py's acc_teacher / fd_teacher


def test_without_out_it_writes_under_runs_never_the_shipped_file(photos, tmp_path, monkeypatch):
    """The shipped weights/tiny_teacher.pt (tiny-dual's teacher, evaluate.py's judge) is replaced only when --out names
    it: a plain run, on other photos say, writes runs/teacher/tiny_teacher.pt, a folder it makes."""
    shipped = os.path.join(ROOT, "weights", "tiny_teacher.pt")
    before = open(shipped, "rb").read()
    monkeypatch.chdir(tmp_path)
    train_teacher.main(flags(photos, "x")[:-2] + ["--steps", "1"])    # every flag but --out
    assert os.listdir(tmp_path / "runs" / "teacher") == ["tiny_teacher.pt"]
    assert open(shipped, "rb").read() == before


@pytest.mark.parametrize("bad, words", [
    (["--out", "{tmp}/missing/t.pt"], "--out"),
    (["--data-path", "{tmp}/nothing"], "data folder not found"),
    (["--val-path", "{photos}/val/red"], "need the same class folders"),     # images directly in it
    (["--steps", "0"], "--steps 0 is out of range"),
    (["--lr", "nan"], "--lr nan is out of range"),
])
def test_bad_flags_exit_2_before_training(photos, tmp_path, capsys, bad, words):
    out = tmp_path / "teacher.pt"
    argv = flags(photos, out, "--steps", "1") + [a.format(tmp=tmp_path, photos=photos) for a in bad]
    with pytest.raises(SystemExit) as e:
        train_teacher.main(argv)
    captured = capsys.readouterr()
    assert e.value.code == 2 and words in captured.err, captured.err
    assert "step" not in captured.out and not os.path.exists(out)      # no training, nothing written


def test_a_nan_loss_stops_with_the_step_and_keeps_the_old_file(photos, tmp_path, monkeypatch):
    out = tmp_path / "teacher.pt"
    out.write_bytes(b"the teacher before")
    real = train_teacher.F.cross_entropy
    calls = []

    def nan_at_step_3(*args, **kwargs):                                # the third training loss is NaN
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss
    monkeypatch.setattr(train_teacher.F, "cross_entropy", nan_at_step_3)
    with pytest.raises(SystemExit) as e:
        train_teacher.main(flags(photos, out, "--steps", "5"))
    assert "the loss is nan at step 3; nothing written" in str(e.value.code)
    assert out.read_bytes() == b"the teacher before" and sorted(os.listdir(tmp_path)) == ["teacher.pt"]


def test_a_missing_or_unreadable_teacher_file_is_one_clear_error(tmp_path):
    """load_teacher("cnn:<file>"): no file names the train_teacher.py command that makes it; a zip that torch cannot
    load (another program's archive) and a spec of an unknown kind are one-line ValueErrors, not tracebacks."""
    with pytest.raises(FileNotFoundError, match=f"python train_teacher.py --out {tmp_path / 'absent.pt'}"):
        load_teacher(f"cnn:{tmp_path / 'absent.pt'}")
    with zipfile.ZipFile(tmp_path / "other.pt", "w") as zf:              # a complete zip, but no torch checkpoint
        zf.writestr("notes.txt", "hello")
    with pytest.raises(ValueError, match="other.pt is not a stand-in teacher of train_teacher.py: it cannot be read"):
        load_teacher(f"cnn:{tmp_path / 'other.pt'}")
    with pytest.raises(ValueError, match="must start with 'openclip:', 'timm:' or 'cnn:'"):
        load_teacher("clip:ViT-L-14")
