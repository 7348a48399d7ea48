"""The ImageNet-scale rehearsal on a CPU: the real scripts on ImageNet-*shaped* data (1000 classes of tiny images, made
in a temp dir), with every cadence (samples, evaluation, checkpoints) hit within a few steps, run at 10 and at 1000
classes. What must not grow with the number of classes or images: the peak memory of the process and its time per
training step (evaluation included). A path that sampled every class, or built an (N, C, d) tensor, fails here.

Run: python -m pytest tests/test_scale.py -q   (about 30 s on 2 cores)
"""
import json
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tokenizer import PRESETS, Tokenizer, TokenizerConfig  # noqa: E402

SMALL, LARGE, SIDE = 10, 1000, 16                                      # classes; image side (px)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """{classes: ImageNet-layout folder root/<class>/<image>} with 2 random 16 px images per class, and "val": a fixed
    10-class held-out folder (the held-out metrics then cost the same at both sizes)."""
    rng, roots = np.random.default_rng(0), {}
    for name, classes in (("val", SMALL), (SMALL, SMALL), (LARGE, LARGE)):
        root = roots[name] = tmp_path_factory.mktemp(f"imagenet{name}")
        for c in range(classes):
            os.makedirs(root / f"n{c:08d}")                            # ImageNet's synset-style folder names
            for j in range(2):
                pixels = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / f"n{c:08d}" / f"{j}.png")
    return roots


@pytest.fixture(scope="module")
def tok_ckpt(tmp_path_factory):
    """A random tiny8 tokenizer at 16 px (2x2 codes): what grows with the classes is the same at any image size, and
    encoding 2000 images costs a quarter of conftest's 32 px tokenizer."""
    torch.manual_seed(0)
    cfg = TokenizerConfig(**{**PRESETS["tiny8"], "image_size": SIDE})
    path = tmp_path_factory.mktemp("tok16") / "tok.pt"
    torch.save({"model": Tokenizer(cfg).state_dict(), "config": asdict(cfg)}, path)
    return str(path)


# Both sizes in one fresh process, one after the other: the script's main(argv) (what `python SCRIPT` runs) at 10
# classes, then at 1000, with the process's peak resident memory after each -> JSON [MiB after 10, MiB after 1000].
# Memory the first run freed is reused by the second (checkpoints.keep_freed_memory keeps it in the heap), so the
# second peak passes the first by what the larger run needs beyond the smaller one, as in two processes. The larger
# run finds the process warm (oneDNN's kernels for the same shapes made), which can only favour it in the throughput
# check; a cost per step that grows with the classes still shows at 100x the classes.
BOTH_SIZES = """import json, resource, sys
sys.path.insert(0, sys.argv[1])
main = __import__(sys.argv[2][:-3]).main
peaks = []
for argv in json.loads(sys.argv[3]):
    main(argv)
    peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print(json.dumps(peaks))
"""


def run_both(out, script, small, large):
    """Run script at both sizes (argv lists) in one process of its own -> (peak MiB after small, after large)."""
    with open(out / f"{script}.log", "w") as log:
        proc = subprocess.run([sys.executable, "-c", BOTH_SIZES, ROOT, script, json.dumps([list(map(str, small)),
                              list(map(str, large))])], cwd=out, stdout=subprocess.PIPE, stderr=log, text=True)
    assert proc.returncode == 0, (out / f"{script}.log").read_text()[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def last_log(out, key):
    """The last value of `key` in out/log.jsonl (throughputs: measured from the loop's start, evaluation included)."""
    return [r[key] for r in map(json.loads, open(out / "log.jsonl")) if key in r][-1]


def both_sizes(tmp_path, data, script, flags):
    """Run script at 10 and 1000 classes (flags(root, out) -> argv) -> {classes: (peak MiB, out dir)}."""
    outs = {classes: tmp_path / f"{script[:-3]}{classes}" for classes in (SMALL, LARGE)}
    for out in outs.values():
        out.mkdir()
    peaks = run_both(tmp_path, script, *(flags(data[classes], outs[classes]) for classes in (SMALL, LARGE)))
    return {classes: (peak, outs[classes]) for classes, peak in zip((SMALL, LARGE), peaks)}


def assert_bounded(result, what, key=None, extra_mib=250):
    """Peak memory at 1000 classes within extra_mib of the 10-class run; throughput (log key) at least a third."""
    (small, out_s), (large, out_l) = result[SMALL], result[LARGE]
    assert large < small + extra_mib, f"{what}: peak {large:.0f} MiB at {LARGE} classes vs {small:.0f} at {SMALL}"
    if key:
        ratio = last_log(out_l, key) / last_log(out_s, key)
        assert ratio > 1 / 3, f"{what}: {key} at {LARGE} classes is {ratio:.2f}x the {SMALL}-class run's"


def test_tokenizer_training_is_bounded(tmp_path, data):
    flags = lambda root, out: ["--preset", "tiny8", "--image-size", SIDE, "--global-batch-size", 4, "--max-steps", 4,
                               "--num-workers", 0, "--log-every", 1, "--sample-every", 2, "--eval-every", 2,
                               "--ckpt-every", 2, "--data-path", root, "--val-path", data["val"], "--out-dir", out]
    result = both_sizes(tmp_path, data, "train_tokenizer.py", flags)
    assert_bounded(result, "train_tokenizer.py", "images_per_s")
    assert sorted(os.listdir(result[LARGE][1] / "checkpoints")) == ["0000002.pt", "0000004.pt", "last.pt"]


@pytest.fixture(scope="module")
def far_runs(tmp_path_factory, data, tok_ckpt):
    """train_far.py at both sizes (codes of the conftest tokenizer, 4x4 grid): extraction, NLL, samples, checkpoints
    every 2 steps."""
    flags = lambda root, out: ["--tokenizer-ckpt", tok_ckpt, "--augment", "none", "--global-batch-size", 8,
                               "--max-steps", 4, "--log-every", 1, "--sample-every", 2, "--eval-every", 2,
                               "--ckpt-every", 2, "--data-path", root, "--val-path", data["val"], "--out-dir", out]
    return both_sizes(tmp_path_factory.mktemp("far"), data, "train_far.py", flags)


def test_far_training_is_bounded(far_runs):
    assert_bounded(far_runs, "train_far.py", "tokens_per_s")
    out = far_runs[LARGE][1]
    assert json.load(open(out / "codes" / "train" / "meta.json"))["unreadable"] == 0
    assert os.path.exists(out / "samples" / "0000004.png")
    assert [r["step"] for r in map(json.loads, open(out / "log.jsonl")) if "copy/sample_nn" in r] == [2, 4]


def test_sampling_is_bounded(tmp_path, far_runs):
    flags = lambda out: ["--far-ckpt", far_runs[out][1] / "checkpoints" / "last.pt", "--num-samples", 16,
                         "--batch-size", 8, "--device", "cpu", "--out-npz", tmp_path / f"{out}.npz"]
    small, large = run_both(tmp_path, "sample.py", flags(SMALL), flags(LARGE))
    assert large < small + 250, f"sample.py: peak {large:.0f} MiB at {LARGE} classes vs {small:.0f} at {SMALL}"
    assert len(np.unique(np.load(tmp_path / f"{LARGE}.npz")["labels"])) == 16   # 16 of the 1000 classes, balanced


def test_evaluation_is_bounded(tmp_path, data, tok_ckpt):
    flags = lambda root, out: ["--tokenizer-ckpt", tok_ckpt, "--data-path", root, "--num-workers", 0, "--no-fid",
                               "--device", "cpu", "--no-lpips", "--out-json", out / "res.json"]
    result = both_sizes(tmp_path, data, "evaluate.py", flags)
    assert_bounded(result, "evaluate.py")       # the class probe of 2000 images x 1000 classes, (N, C) at most
    res = json.load(open(result[LARGE][1] / "res.json"))
    assert res["images"] == 2 * LARGE and res["probe_chance"] == 1 / LARGE
