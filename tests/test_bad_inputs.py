"""Every bad input a user can give the entry scripts: one line naming the flag or file and what is wrong, exit 2, no
traceback, nothing left behind. One table, one row per input (the rows of the "clear message" issue plus ours).

Run: python -m pytest tests/test_bad_inputs.py -q
"""
import json
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ablate  # noqa: E402
import checkpoints  # noqa: E402
import evaluate  # noqa: E402
import figures  # noqa: E402
import sample  # noqa: E402
import train_far  # noqa: E402
import train_teacher  # noqa: E402
import train_tokenizer  # noqa: E402

SCRIPTS = {"sample": sample.main, "evaluate": evaluate.main, "train_far": train_far.main,
           "train_tokenizer": train_tokenizer.main, "ablate": ablate.main, "figures": figures.main,
           "train_teacher": train_teacher.main}


@pytest.fixture(scope="module")
def files(tmp_path_factory, pair):
    """Bad files of every kind, beside the good random pair of conftest."""
    d = tmp_path_factory.mktemp("bad")
    good = open(pair[0] / "tok.pt", "rb").read()
    (d / "empty.pt").write_bytes(b"")
    (d / "truncated.pt").write_bytes(good[: len(good) // 2])
    (d / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save(torch.zeros(3), d / "tensor.pt")                         # a checkpoint, but a bare tensor
    with zipfile.ZipFile(pair[0] / "tok.pt") as src, zipfile.ZipFile(d / "damaged.pt", "w") as dst:
        for info in src.infolist():                                     # a whole zip, one tensor's record cut short
            data = src.read(info)
            dst.writestr(info, data[: len(data) // 2] if info.filename.endswith("/data/0") else data)
    # a run folder whose last.pt was cut short, with numbered checkpoints to fall back on
    ckpts = d / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "last.pt").write_bytes(good[: len(good) // 3])
    for step in (100, 200):
        (ckpts / f"{step:07d}.pt").write_bytes(good)
    # run folders whose last.pt is a whole file of another kind
    for name, source in (("tensor", d / "tensor.pt"), ("far", os.path.join(ROOT, "weights", "tiny_far.pt")),
                         ("weights", os.path.join(ROOT, "weights", "tiny_tokenizer.pt"))):
        (d / f"run_{name}" / "checkpoints").mkdir(parents=True)
        (d / f"run_{name}" / "checkpoints" / "last.pt").write_bytes(open(source, "rb").read())
    # image folders: 14 val images of which 3 unreadable; one where every file is unreadable
    rng = np.random.default_rng(0)
    for name, broken in (("mixed", 3), ("all_broken", 4)):
        for c in ("a", "b"):
            (d / name / c).mkdir(parents=True)
        for j in range(14 if name == "mixed" else 4):
            path = d / name / "ab"[j % 2] / f"{j:02d}.png"
            if j < broken:
                path.write_bytes(b"\x89PNG\r\n\x1a\n cut short")
            else:
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
    (d / "no_images" / "a").mkdir(parents=True)                      # a class folder, no image in it
    (d / "zebra" / "zebra").mkdir(parents=True)                        # samples of a class the teacher does not know
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(d / "zebra" / "zebra" / "0.png")
    # generation mode inputs: an npz without images, one without arr_0, a file that is not a zip
    np.savez(d / "zero.npz", arr_0=np.zeros((0, 32, 32, 3), np.uint8))
    np.savez(d / "no_arr0.npz", images=np.zeros((2, 32, 32, 3), np.uint8))
    (d / "not_zip.npz").write_bytes(b"not a zip archive")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "grid.png")   # a PNG grid where an npz belongs
    np.savez(d / "two.npz", arr_0=np.zeros((2, 64, 64, 3), np.uint8), labels=np.array([0, 1]))   # sample.py's kind
    np.savez(d / "one.npz", arr_0=np.zeros((1, 64, 64, 3), np.uint8), labels=np.array([0]))
    return d


def run(script, argv, capsys):
    """(exit code, stdout + stderr) of one entry script's main(argv), in this process."""
    try:
        SCRIPTS[script](argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err


# (name, script, argv builder (files folder d, pair folder p) -> argv, exit code, message that must appear)
CASES = [
    # broken checkpoint files, to every script that reads a tokenizer
    *[(f"{kind} tokenizer to {script}", script, (lambda d, p, kind=kind, flag=flag, script=script:
       [flag, str(d / f"{kind}.pt")] + (["--far-ckpt", str(p / "far.pt"), "--class-id", "0", "--out",
                                          str(d / "x.png")] if script == "sample" else [])),
       2, message)
      for kind, message in (("empty", "is empty (0 bytes)"), ("truncated", "is not a complete PyTorch checkpoint"),
                            ("random", "is not a complete PyTorch checkpoint"),
                            ("damaged", "damaged.pt cannot be read (RuntimeError: record size"))
      for script, flag in (("sample", "--tokenizer-ckpt"), ("evaluate", "--tokenizer-ckpt"),
                           ("train_far", "--tokenizer-ckpt"))],
    ("empty FAR to sample", "sample", lambda d, p: ["--far-ckpt", str(d / "empty.pt"), "--class-id", "0"], 2,
     "--far-ckpt " + "{d}/empty.pt is empty"),
    ("resume from a truncated last.pt", "train_tokenizer",
     lambda d, p: ["--out-dir", str(d / "run"), "--resume", "--image-size", "32"], 2,
     "copy one of 0000100.pt, 0000200.pt over last.pt"),
    ("resume from a tensor file", "train_tokenizer", lambda d, p: ["--out-dir", str(d / "run_tensor"), "--resume"], 2,
     "last.pt holds no model of this project, not a tokenizer's training state; use another --out-dir"),
    ("resume a tokenizer from a FAR run's last.pt", "train_tokenizer",
     lambda d, p: ["--out-dir", str(d / "run_far"), "--resume"], 2, "last.pt holds a FAR, not a tokenizer's training"),
    ("resume from weights without a training state", "train_tokenizer",
     lambda d, p: ["--out-dir", str(d / "run_weights"), "--resume"], 2,
     "last.pt holds a tokenizer's weights without a training state (step, RNG states); fine-tune from it with "
     "--init-from instead"),
    # values checked at parse time
    ("sample --cfg-scale nan", "sample", lambda d, p: ["--class-id", "0", "--cfg-scale", "nan"], 2,
     "--cfg-scale nan is out of range: must be a finite number"),
    ("sample --temperature 0", "sample", lambda d, p: ["--class-id", "0", "--temperature", "0"], 2,
     "--temperature 0.0 is out of range"),
    ("train_tokenizer --ema-decay 2", "train_tokenizer", lambda d, p: ["--ema-decay", "2"], 2,
     "--ema-decay 2.0 is out of range: must be in [0, 1)"),
    ("train_tokenizer --codebook-size 0", "train_tokenizer", lambda d, p: ["--codebook-size", "0"], 2,
     "--codebook-size 0 is out of range"),
    *[(f"train_tokenizer --image-size {v}", "train_tokenizer", lambda d, p, v=v: ["--image-size", v], 2,
       f"--image-size {v} is out of range: preset tiny needs a positive multiple of its downsample factor 4")
      for v in ("62", "0", "-64")],
    ("train_tokenizer --hold-out nosuch", "train_tokenizer", lambda d, p: ["--hold-out", "nosuch"], 2,
     "--hold-out: no class nosuch under"),
    ("train_tokenizer --crop-scale 0.5", "train_tokenizer", lambda d, p: ["--crop-scale", "0.5"], 2,
     "--crop-scale 0.5 is out of range: must be a number >= 1"),
    ("train_tokenizer --warmup-steps -1", "train_tokenizer", lambda d, p: ["--warmup-steps", "-1"], 2,
     "--warmup-steps -1 is out of range"),
    ("train_tokenizer --lr -1", "train_tokenizer", lambda d, p: ["--lr", "-1"], 2,
     "--lr -1.0 is out of range: must be a finite number > 0"),
    ("train_tokenizer --num-workers -1", "train_tokenizer", lambda d, p: ["--num-workers", "-1"], 2,
     "--num-workers -1 is out of range"),
    ("train_tokenizer --gan-weight inf", "train_tokenizer", lambda d, p: ["--gan-weight", "inf"], 2,
     "--gan-weight inf is out of range"),
    ("train_tokenizer --beta1 1.5", "train_tokenizer", lambda d, p: ["--beta1", "1.5"], 2,
     "--beta1 1.5 is out of range: must be in [0, 1)"),
    ("train_far --beta2 -0.1", "train_far", lambda d, p: ["--beta2", "-0.1"], 2,
     "--beta2 -0.1 is out of range: must be in [0, 1)"),
    ("train_far --lr nan", "train_far", lambda d, p: ["--lr", "nan"], 2, "--lr nan is out of range"),
    ("train_far --sample-every -1", "train_far", lambda d, p: ["--sample-every", "-1"], 2,
     "--sample-every -1 is out of range: must be an integer >= 0"),       # 0: no sample grids
    ("train_tokenizer on a folder without images", "train_tokenizer",
     lambda d, p: ["--data-path", str(d / "no_images"), "--out-dir", str(d / "tok_run")], 2,
     "no images under {d}/no_images/<class>/"),
    ("train_tokenizer --val-path of unreadable files", "train_tokenizer",
     lambda d, p: ["--val-path", str(d / "all_broken"), "--out-dir", str(d / "tok_run")], 2,
     "--val-path {d}/all_broken: none of its 4 images could be read"),
    ("train_tokenizer on a folder of unreadable files", "train_tokenizer",
     lambda d, p: ["--data-path", str(d / "all_broken"), "--global-batch-size", "2", "--out-dir", str(d / "tok_run")],
     2, "--data-path {d}/all_broken: none of its 4 images could be read"),
    ("train_far --val-path of unreadable files", "train_far",
     lambda d, p: ["--tokenizer-ckpt", str(p / "tok.pt"), "--data-path", str(d / "mixed"), "--val-path",
                   str(d / "all_broken"), "--out-dir", str(d / "far_val_run")], 2,
     "--val-path {d}/all_broken: no readable images (every file was unreadable)"),
    ("train_far on a folder of unreadable files", "train_far",
     lambda d, p: ["--tokenizer-ckpt", str(p / "tok.pt"), "--data-path", str(d / "all_broken"), "--out-dir",
                   str(d / "far_run")], 2, "every file was unreadable"),
    ("evaluate on a folder of unreadable files", "evaluate",
     lambda d, p: ["--tokenizer-ckpt", str(p / "tok.pt"), "--data-path", str(d / "all_broken"), "--num-workers", "0",
                   "--no-fid", "--no-lpips", "--out-json", str(d / "r.json")], 2,
     "none of the 4 images under {d}/all_broken could be read"),
    ("evaluate on a folder without images", "evaluate",
     lambda d, p: ["--tokenizer-ckpt", str(p / "tok.pt"), "--data-path", str(d / "no_images"), "--out-json",
                   str(d / "r.json")], 2, "no images under {d}/no_images/<class>/"),
    # generation mode of evaluate.py: the inputs are checked before Inception is loaded
    ("evaluate --classes nosuch", "evaluate", lambda d, p: ["--classes", "nosuch"], 2,
     "--classes nosuch: not all are class folders of --data-path"),
    ("evaluate npz with 0 images", "evaluate",
     lambda d, p: ["--samples", str(d / "zero.npz"), "--reference", str(d / "zero.npz")], 2, "holds 0 images"),
    ("evaluate npz without arr_0", "evaluate",
     lambda d, p: ["--samples", str(d / "no_arr0.npz"), "--reference", str(d / "zero.npz")], 2, "has no arr_0"),
    ("evaluate file that is not a zip", "evaluate",
     lambda d, p: ["--samples", str(d / "not_zip.npz"), "--reference", str(d / "zero.npz")], 2,
     "is not an npz file"),
    # outputs: checked before any work, nothing half-written left behind
    ("sample --out a directory", "sample", lambda d, p: ["--class-id", "0", "--out", str(d) + "/"], 2,
     "is a directory"),
    ("sample --out in a missing folder", "sample", lambda d, p: ["--class-id", "0", "--out", str(d / "no/x.png")], 2,
     "does not exist; create it first"),
    ("sample --out-npz in a missing folder", "sample",
     lambda d, p: ["--num-samples", "2", "--out-npz", str(d / "no/x.npz")], 2, "does not exist; create it first"),
    # sample.py's two modes: a PNG grid of --class-id rows, or an npz of --num-samples over all classes
    ("sample --num-samples 0 --out-npz", "sample", lambda d, p: ["--num-samples", "0", "--out-npz", str(d / "x.npz")],
     2, "--out-npz needs --num-samples N, an integer >= 1 (got 0)"),
    ("sample --out-npz alone", "sample", lambda d, p: ["--out-npz", str(d / "x.npz")], 2,
     "--out-npz needs --num-samples N, an integer >= 1 (got 0)"),
    ("sample --num-samples alone", "sample", lambda d, p: ["--num-samples", "4"], 2,
     "--num-samples N needs --out-npz FILE"),
    ("sample --out-npz without .npz", "sample", lambda d, p: ["--num-samples", "4", "--out-npz", str(d / "x.txt")], 2,
     "x.txt: it is written as NPZ; the file name must end in .npz"),
    ("sample --out not .png", "sample", lambda d, p: ["--class-id", "0", "--out", str(d / "grid.jpg")], 2,
     "grid.jpg: it is written as PNG; the file name must end in .png"),
    # ablate.py: the files' kinds before any training (--table ar trains its VQ tokenizer before it reads the FQ one)
    ("ablate --table ar --tokenizer-ckpt a FAR file", "ablate", lambda d, p: ["--table", "ar", "--tokenizer-ckpt",
     os.path.join(ROOT, "weights", "tiny_far.pt"), "--work-dir", str(d / "ablate"), "--out", str(d / "r.json")], 2,
     "tiny_far.pt is not a tokenizer of this project or the official FQGAN: it holds a FAR"),
    ("ablate --table 4 --teacher random bytes", "ablate", lambda d, p: ["--table", "4", "--teacher", str(
     d / "random.pt"), "--work-dir", str(d / "ablate"), "--out", str(d / "r.json")], 2,
     "random.pt is not a stand-in teacher of train_teacher.py: it is not a complete PyTorch checkpoint"),
    ("ablate --table 4 --teacher a FAR file", "ablate", lambda d, p: ["--table", "4", "--teacher", os.path.join(
     ROOT, "weights", "tiny_far.pt"), "--work-dir", str(d / "ablate"), "--out", str(d / "r.json")], 2,
     "tiny_far.pt is not a stand-in teacher of train_teacher.py"),
    ("evaluate --teacher a tensor file", "evaluate", lambda d, p: ["--samples", str(d / "two.npz"), "--teacher",
                                                                  str(d / "tensor.pt")], 2,
     "tensor.pt is not a stand-in teacher of train_teacher.py (no config in it)"),
    ("evaluate --teacher a FAR file", "evaluate", lambda d, p: ["--samples", str(d / "two.npz"), "--teacher",
                                                                os.path.join(ROOT, "weights", "tiny_far.pt")], 2,
     "tiny_far.pt is not a stand-in teacher of train_teacher.py"),
    ("evaluate --samples of 1 image", "evaluate", lambda d, p: ["--samples", str(d / "one.npz")], 2,
     "one.npz: 1 image; fd_teacher needs 2 or more"),
    ("evaluate --samples a PNG", "evaluate", lambda d, p: ["--samples", str(d / "grid.png")], 2,
     "grid.png: a file that is not an .npz"),
    ("sample --class-id with --num-samples", "sample",
     lambda d, p: ["--class-id", "3", "--num-samples", "4", "--out-npz", str(d / "x.npz")], 2, "two modes: give one"),
    ("evaluate --out-json in a missing folder", "evaluate", lambda d, p: ["--out-json", str(d / "no/r.json")], 2,
     "does not exist; create it first"),
    ("evaluate --samples of unreadable files", "evaluate",
     lambda d, p: ["--samples", str(d / "all_broken"), "--reference", str(d / "mixed")], 2,
     "none of the images in {d}/all_broken could be read"),
    ("evaluate --inception-weights a missing file", "evaluate",
     lambda d, p: ["--inception-weights", str(d / "no.pth"), "--out-json", str(d / "r.json")], 2,
     "--inception-weights {d}/no.pth: no such file"),
    ("sample without a mode", "sample", lambda d, p: [], 2, "give --class-id N (or --num-samples N --out-npz FILE)"),
    ("evaluate --samples of classes the teacher does not know", "evaluate",
     lambda d, p: ["--samples", str(d / "zebra")], 2,
     "zebra: needs class folders named as the teacher's classes (astronaut, brick"),
    ("evaluate --samples a folder without images", "evaluate", lambda d, p: ["--samples", str(d / "no_images")], 2,
     "--samples {d}/no_images: no images (extensions .png"),
    ("evaluate --data-path of other classes than the teacher's", "evaluate",
     lambda d, p: ["--samples", str(d / "two.npz"), "--data-path", str(d / "mixed")], 2,
     "--data-path {d}/mixed has classes a, b; the teacher knows astronaut, brick"),
    ("ablate --rows a typo", "ablate", lambda d, p: ["--table", "3", "--rows", "FQ(Kx3)", "--out", str(d / "r.json")],
     2, "--rows must be among ['VQ(K)'"),
    ("figures --fig3-images 0", "figures", lambda d, p: ["--fig3-images", "0"], 2,
     "--fig3-images 0 is out of range: must be an integer in 1..64"),
    ("figures --tokenizer-ckpt damaged", "figures", lambda d, p: ["--tokenizer-ckpt", str(d / "damaged.pt")], 2,
     "damaged.pt cannot be read"),
    ("train_teacher on a folder with an unreadable image", "train_teacher",
     lambda d, p: ["--data-path", str(d / "mixed"), "--val-path", str(d / "mixed"), "--out", str(d / "t.pt")], 2,
     "--data-path {d}/mixed: 3 unreadable images, {d}/mixed/a/00.png"),
]


@pytest.mark.parametrize("name,script,argv,code,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_exit_2(name, script, argv, code, message, files, pair, capsys):
    before = set(os.listdir(files))
    got, text = run(script, argv(files, pair[0]), capsys)
    assert got == code, text[-2000:]
    assert message.format(d=files) in text, text[-2000:]
    assert "Traceback" not in text
    assert not {f for f in set(os.listdir(files)) - before if ".tmp" in f}   # no temp file left behind


def test_missing_pretrained_weights_name_each_file_and_exit_2(files, pair, tmp_path, monkeypatch, capsys):
    """LPIPS' files (tokenizer training with a perceptual weight, evaluate.py --lpips): exit 2 with the files to
    download and where they go, no traceback, before any training step. (A paper preset's missing CLIP / DINOv2 file
    takes the same way out of train_tokenizer.build_models; tests/test_losses.py checks its message.) LPIPS' and
    Inception's files cut short: exit 2 naming the file and its URL."""
    monkeypatch.setenv("FQGAN_WEIGHTS", str(tmp_path / "weights"))    # empty: whatever this machine has cached
    quick = ["--global-batch-size", "4", "--max-steps", "1", "--low-res-steps", "0", "--num-workers", "0"]
    for script, argv, message in (
            ("train_tokenizer", [*quick, "--perceptual-weight", "0.1", "--out-dir", str(tmp_path / "a")],
             f"LPIPS weights not found:\n  {tmp_path / 'weights' / 'vgg16-397923af.pth'}"),
            ("evaluate", ["--tokenizer-ckpt", str(pair[0] / "tok.pt"), "--data-path", str(files / "mixed"), "--lpips",
                          "--no-fid", "--out-json", str(tmp_path / "r.json")], "LPIPS weights not found")):
        code, text = run(script, argv, capsys)
        assert code == 2 and message in text and "Traceback" not in text, text[-2000:]
        assert not os.path.exists(tmp_path / "a" / "log.jsonl") and not os.path.exists(tmp_path / "r.json")
    # the files there, but cut short (an interrupted download): named, with the URL to download again
    weights = tmp_path / "weights"
    weights.mkdir()
    for name in ("vgg16-397923af.pth", "weights-vgg16-lpips.pth", "weights-inception-2015-12-05-6726825d.pth"):
        torch.save({"w": torch.zeros(1000)}, weights / name)
        (weights / name).write_bytes((weights / name).read_bytes()[:1000])
    for script, argv, file in (
            ("train_tokenizer", [*quick, "--perceptual-weight", "0.1", "--out-dir", str(tmp_path / "a")],
             "vgg16-397923af.pth"),
            # evaluate.py without --lpips / --fid: a damaged file is an error, not the null of an absent one
            ("evaluate", ["--tokenizer-ckpt", str(pair[0] / "tok.pt"), "--data-path", str(files / "mixed"),
                          "--out-json", str(tmp_path / "r.json")], "vgg16-397923af.pth"),
            ("evaluate", ["--tokenizer-ckpt", str(pair[0] / "tok.pt"), "--data-path", str(files / "mixed"),
                          "--no-lpips", "--out-json", str(tmp_path / "r.json")], "weights-inception-2015-12-05")):
        code, text = run(script, argv, capsys)
        assert code == 2 and f"{weights / file}" in text and "cannot be read" in text and "again" in text, text[-2000:]
        assert "Traceback" not in text and not os.path.exists(tmp_path / "r.json")


def test_unreadable_evaluation_images_are_skipped_and_counted(files, pair, tmp_path, capsys):
    """3 unreadable files of 14: evaluated on the 11 readable ones, reported as 3 unreadable; never duplicated."""
    code, text = run("evaluate", ["--tokenizer-ckpt", str(pair[0] / "tok.pt"), "--data-path", str(files / "mixed"),
                                  "--num-workers", "0", "--no-fid", "--no-lpips", "--out-json",
                                  str(tmp_path / "r.json")], capsys)
    assert code == 0
    res = json.load(open(tmp_path / "r.json"))
    assert res["images"] == 11 and res["unreadable"] == 3
    assert "unreadable            3" in text


def test_a_refused_run_removes_the_out_dir_it_made(tmp_path, capsys):
    """A run refused after it made its --out-dir (here: no images under --data-path) removes that folder when the
    process ends, and the parents it made for it, so a typo leaves nothing behind; a folder that was there before
    stays."""
    (tmp_path / "empty" / "a").mkdir(parents=True)
    argv = ["--data-path", str(tmp_path / "empty"), "--max-steps", "1", "--out-dir"]
    proc = subprocess.run([sys.executable, "train_tokenizer.py", *argv, str(tmp_path / "new")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no images under" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "new").exists()                              # at exit (atexit), as a user's process ends
    (tmp_path / "old").mkdir()
    for out in ("old", "new2", "old/new3/a/b"):                         # in this process: the exit handler called
        with pytest.raises(SystemExit):
            train_tokenizer.main(argv + [str(tmp_path / out)])
    checkpoints.remove_unused_out_dirs()
    assert sorted(os.listdir(tmp_path)) == ["empty", "old"] and os.listdir(tmp_path / "old") == [".lock"]
    capsys.readouterr()


def test_a_teacher_file_of_another_kind_stops_tokenizer_training(files, tmp_path, monkeypatch, capsys):
    """tiny-dual's stand-in teacher is found as ./tiny_teacher.pt before weights/tiny_teacher.pt: a file there that is
    no teacher (random bytes) stops train_tokenizer.py with one line, exit 2, before any step."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny_teacher.pt").write_bytes((files / "random.pt").read_bytes())
    code, text = run("train_tokenizer", ["--preset", "tiny-dual", "--max-steps", "1", "--num-workers", "0",
                                         "--out-dir", str(tmp_path / "run")], capsys)
    assert code == 2 and "tiny_teacher.pt is not a stand-in teacher of train_teacher.py: it is not a complete" in text
    assert "Traceback" not in text
    checkpoints.remove_unused_out_dirs()                                # at exit, as in a user's process
    assert os.listdir(tmp_path) == ["tiny_teacher.pt"]


def test_refused_runs_leave_no_default_output_folder(tmp_path, monkeypatch, capsys):
    """evaluate.py and train_teacher.py write to runs/eval and runs/teacher by default, folders they make when they
    write the file: refused (a FAR file as the tokenizer, a folder without images), they leave nothing in the working
    directory, and where the folder cannot be made the run is refused before any work."""
    import train_teacher
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    for main, argv, says in ((evaluate.main, ["--tokenizer-ckpt", os.path.join(ROOT, "weights", "tiny_far.pt")],
                              "it holds a FAR"),
                             (train_teacher.main, ["--data-path", str(tmp_path / "empty")], "no images")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and says in capsys.readouterr().err
        assert os.listdir(tmp_path) == ["empty"]
    (tmp_path / "runs").write_text("a file where the default folder goes")
    with pytest.raises(SystemExit) as e:
        evaluate.main([])
    assert e.value.code == 2 and "--out-json runs/eval/tokenizer.json: the folder" in capsys.readouterr().err


@pytest.mark.parametrize("script,argv", [("ablate", ["--table", "3", "--out", "r.json"]), ("figures", []),
                                         ("train_teacher", []), ("bench", ["--quick"])])
def test_one_process_scripts_refuse_torchrun(script, argv, tmp_path, monkeypatch, capsys):
    """A script that runs in one process, started by torchrun with 2 processes (WORLD_SIZE=2, as torchrun sets it):
    exit 2 before any work, saying to start it with python; under torchrun with 1 process it runs (not done here)."""
    monkeypatch.chdir(tmp_path)                                         # anything it made would show up here
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        __import__(script).main(argv)
    assert e.value.code == 2
    assert "runs in one process, and torchrun started 2: start it with python, not torchrun" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_stale_temp_files_of_a_killed_run_are_removed(tmp_path, capsys):
    """A kill -9 during a checkpoint write leaves last.pt.tmp<pid>; the next start removes it."""
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "last.pt.tmp4242").write_bytes(b"half")
    (ckpts / "0000100.pt.tmp4242").write_bytes(b"half")
    train_tokenizer.main(["--image-size", "32", "--global-batch-size", "2", "--max-steps", "1", "--num-workers", "0",
                          "--eval-every", "100", "--out-dir", str(tmp_path / "run")])
    assert sorted(os.listdir(ckpts)) == ["0000001.pt", "last.pt"]
    assert "removed stale 0000100.pt.tmp4242, last.pt.tmp4242" in capsys.readouterr().out


HELP_FILES = ["quantizer.py", "fast.py", "losses.py", "teachers.py", "far.py", "tokenizer.py", "codes.py", "sample.py",
              "evaluate.py", "figures.py", "train_tokenizer.py", "train_far.py"]
# `python FILE --help` for each file in turn, in one fresh process (one import of torch, not twelve): FILE runs as
# __main__ with sys.argv as python gives it -> {file: [exit code, stdout, traceback]} as JSON.
RUN_EACH_HELP = """import contextlib, io, json, runpy, sys, traceback
result = {}
for script in sys.argv[1:]:
    out, sys.argv, code, error = io.StringIO(), [script, "--help"], None, ""
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            code = e.code
        except BaseException:
            error = traceback.format_exc()
    result[script] = [code, out.getvalue(), error]
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def helps():
    proc = subprocess.run([sys.executable, "-c", RUN_EACH_HELP, *HELP_FILES], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("script", HELP_FILES)
def test_help_of_every_file(script, helps):
    """--help prints a description (and exits 0) for the model files too; the torchrun examples keep their line
    breaks (a backslash in a docstring must be written twice)."""
    code, out, error = helps[script]
    assert code == 0 and "usage:" in out and "arXiv" in out, error[-2000:] or out[-2000:]
    assert not re.search(r"\S {4,}--\w", out), out                  # no two lines joined into one
