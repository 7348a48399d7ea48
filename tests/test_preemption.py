"""Runs that survive what a cluster does to them: SIGTERM / SIGINT (a scheduler's preemption, Ctrl-C) save last.pt at
the current step and --resume continues bit for bit, in one process and under torchrun; time-based saves; pruning of
numbered checkpoints; a run owns its --out-dir; a full disk is one line and loses nothing.

Run: python -m pytest tests/test_preemption.py -q   (about a minute on 2 cores)
"""
import json
import os
import signal
import subprocess
import sys
import time
from collections import namedtuple

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoints  # noqa: E402
import train_tokenizer  # noqa: E402

TOKENIZER = ["train_tokenizer.py", "--preset", "tiny8", "--image-size", "32", "--global-batch-size", "4",
             "--num-workers", "0", "--log-every", "1", "--eval-every", "1000", "--sample-every", "1000",
             "--ckpt-every", "1000", "--max-steps", "10", "--val-path", ""]   # '': no held-out PSNR


def start(argv, out, torchrun=False):
    """The script running in its own process (group), as a user or a scheduler starts it."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else \
        [sys.executable]
    return subprocess.Popen(launcher + argv + ["--out-dir", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def signal_after_step(proc, out, step, signum=signal.SIGTERM):
    """Send signum once the run's log shows `step`; returns the process's output after it ended."""
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(out / "log.jsonl") and any(json.loads(line).get("step", 0) >= step
                                                     for line in open(out / "log.jsonl")):
            proc.send_signal(signum)
            break
        time.sleep(0.05)
    return proc.communicate(timeout=120)[0]


def weights(out):
    return torch.load(out / "checkpoints" / "last.pt", weights_only=True)


def assert_same(a, b):
    assert a["step"] == b["step"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "weights differ"


def test_sigterm_saves_the_current_step_and_resume_equals_uninterrupted(tmp_path):
    proc = start(TOKENIZER, tmp_path / "split")
    output = signal_after_step(proc, tmp_path / "split", 3)
    assert proc.returncode == 128 + signal.SIGTERM, output[-2000:]
    line = next(x for x in output.splitlines() if x.startswith("stopped by SIGTERM after step"))
    stopped = int(line.split("after step ")[1].split(";")[0])
    assert 3 <= stopped < 10 and weights(tmp_path / "split")["step"] == stopped and "--resume" in line
    assert not (tmp_path / "split" / "checkpoints" / f"{stopped:07d}.pt").exists()   # numbered: --ckpt-every only
    train_tokenizer.main(TOKENIZER[1:] + ["--resume", "--out-dir", str(tmp_path / "split")])   # the rest, and
    train_tokenizer.main(TOKENIZER[1:] + ["--out-dir", str(tmp_path / "full")])   # uninterrupted: in this process
    assert_same(weights(tmp_path / "split"), weights(tmp_path / "full"))    # the same 10 steps, bit for bit


def test_sigterm_to_torchrun_stops_every_rank_after_the_same_step(tok_ckpt, tmp_path, two_ranks):
    """torchrun passes SIGTERM on to both ranks; they agree on the step, rank 0 saves, both exit; --resume on 2 ranks
    then ends where an uninterrupted run does (FAR, 2 gloo processes; those two runs without torchrun's agent, which
    the signal needs and they do not: conftest.two_ranks)."""
    far = ["train_far.py", "--tokenizer-ckpt", tok_ckpt, "--augment", "none", "--global-batch-size", "8",
           "--log-every", "1", "--eval-every", "1000", "--sample-every", "1000", "--ckpt-every", "1000", "--max-steps",
           "12", "--val-path", ""]                                     # '': no held-out set, extracted or measured
    proc = start(far, tmp_path / "split", torchrun=True)
    output = signal_after_step(proc, tmp_path / "split", 3)
    assert output.count("stopped by SIGTERM after step") == 1, output[-3000:]   # one line, from rank 0
    stopped = weights(tmp_path / "split")["step"]
    assert 3 <= stopped < 12 and not (tmp_path / "split" / "codes" / "val").exists()   # --val-path ''
    two_ranks(far + ["--resume", "--out-dir", str(tmp_path / "split")])
    (tmp_path / "full").mkdir()
    os.symlink(tmp_path / "split" / "codes", tmp_path / "full" / "codes")   # the same codes, extracted once
    two_ranks(far + ["--out-dir", str(tmp_path / "full")])
    assert_same(weights(tmp_path / "split"), weights(tmp_path / "full"))


def test_a_crash_with_loader_workers_exits_instead_of_hanging():
    """An uncaught exception while the loader's workers live (a bug, CUDA out of memory) ends the process with its
    traceback. The workers ignore SIGTERM (preemption is the main process's to handle), and multiprocessing's exit
    handler stops them with SIGTERM and then waits for them: the process hung there, holding its GPUs, until
    images.kill_loader_workers."""
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); from images import stream\n"
            "class Items(torch.utils.data.Dataset):\n"
            "    __len__, __getitem__ = lambda self: 8, lambda self, item: torch.tensor(item[0])\n"
            "def main():\n"
            "    batches = stream(Items(), 2, 0, 0, 1, 0, num_workers=2)\n"
            "    next(batches)\n"
            "    raise ValueError('a bug after the first batch')\n"
            "main()\n")
    proc = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, timeout=60)   # ~2 s
    assert proc.returncode == 1 and "ValueError: a bug after the first batch" in proc.stderr


@pytest.fixture
def ctrl_c():
    """Python's own Ctrl-C handler (KeyboardInterrupt) for the test, as an interactive shell starts python; pytest
    started in a script's background (`pytest ... &`) inherits SIGINT ignored, which a run leaves ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    checkpoints.release_stop_signals()                                 # a run stopped by the test: its handlers first
    signal.signal(signal.SIGINT, previous)


def sigint_at_step_2(monkeypatch):
    """A SIGINT to this process in the middle of the training loop, at step 2."""
    real = checkpoints.mean_over_ranks_or_stop

    def interrupt_at_step_2(terms, step, last, bar=None):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(terms, step, last, bar)
    monkeypatch.setattr(train_tokenizer, "mean_over_ranks_or_stop", interrupt_at_step_2)


def test_sigint_in_process_saves_too(tmp_path, monkeypatch, ctrl_c):
    """Ctrl-C (SIGINT) during an in-process run: the step finishes, last.pt holds it, exit code 130."""
    sigint_at_step_2(monkeypatch)
    with pytest.raises(SystemExit) as e:
        train_tokenizer.main(TOKENIZER[1:] + ["--out-dir", str(tmp_path)])
    assert e.value.code == 130 and weights(tmp_path)["step"] == 2


def test_a_run_started_ignoring_sigint_leaves_it_ignored(tmp_path, monkeypatch):
    """`python train_tokenizer.py ... &` in a shell script starts with SIGINT ignored (no job control): the Ctrl-C of
    the script's foreground command reaches the run too, and must not stop it, as it would not stop Python itself."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        sigint_at_step_2(monkeypatch)
        train_tokenizer.main(TOKENIZER[1:] + ["--out-dir", str(tmp_path), "--max-steps", "4"])
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert weights(tmp_path)["step"] == 4                               # ran to its end, no exit 130 at step 2


def test_a_finished_run_hands_ctrl_c_back(tmp_path, ctrl_c):
    """ablate.py runs the training scripts one after another in one process: once a run has ended, SIGINT raises
    KeyboardInterrupt at once again and SIGTERM has its old handler (a signal between runs is not noted for a loop
    that no longer asks, then dropped by the next run's start)."""
    before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    train_tokenizer.main(TOKENIZER[1:] + ["--out-dir", str(tmp_path), "--max-steps", "1"])
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == before
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)


def test_time_based_saves_and_pruning(tmp_path, monkeypatch):
    saved = []
    real = checkpoints.save_last
    monkeypatch.setattr(checkpoints, "save_last", lambda state, folder, numbered, keep=0: (
        saved.append((state["step"], numbered)), real(state, folder, numbered, keep)))
    train_tokenizer.main(TOKENIZER[1:] + ["--out-dir", str(tmp_path), "--max-steps", "6", "--ckpt-every", "2",
                                          "--ckpt-minutes", "1e-9", "--keep-checkpoints", "2"])
    # after every step (the clock), numbered at every second step; the two newest numbered ones are kept
    assert saved == [(1, False), (2, True), (3, False), (4, True), (5, False), (6, True)]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["0000004.pt", "0000006.pt", "last.pt"]


def test_a_run_owns_its_out_dir(tmp_path, capsys):
    argv = TOKENIZER[1:] + ["--out-dir", str(tmp_path), "--max-steps", "1"]
    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".lock", "a+") as held:                        # another live run holds the folder
        held.write("pid 4242 on elsewhere"), held.flush()
        child = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                                  "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                                  str(tmp_path / ".lock")], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "held"
            with pytest.raises(SystemExit) as e:
                train_tokenizer.main(argv)
            assert e.value.code == 2 and "is in use by a running training (pid 4242 on elsewhere)" in \
                capsys.readouterr().err
        finally:
            child.kill()
            child.wait()
    train_tokenizer.main(argv)                                           # the holder is gone: the lock is free
    before = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(SystemExit) as e:                                # a second run without --resume
        train_tokenizer.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "holds a run already" in err and "add --resume" in err
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == before  # untouched
    (tmp_path / "a_file").write_text("mine")
    for out in ("a_file", os.path.join("a_file", "run")):               # a file, or a file in the path
        with pytest.raises(SystemExit) as e:
            train_tokenizer.main(TOKENIZER[1:] + ["--out-dir", str(tmp_path / out), "--max-steps", "1"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"--out-dir {tmp_path / out}: cannot be made a folder (" in err
    assert (tmp_path / "a_file").read_text() == "mine"


def test_a_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    argv = TOKENIZER[1:] + ["--out-dir", str(tmp_path), "--ckpt-every", "1"]
    train_tokenizer.main(argv + ["--max-steps", "2"])
    before = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 2**20, 2**20))   # 1 MB
    with pytest.raises(SystemExit) as e:
        train_tokenizer.main(argv + ["--max-steps", "3", "--resume"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "step 3: no space left on" in err and "needs ~" in err and "1 MB free" in err
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == before
    assert not [f for f in os.listdir(tmp_path / "checkpoints") if ".tmp" in f]


def test_numbered_checkpoints_without_hard_links_are_copies_and_a_failed_copy_is_one_line(tmp_path, monkeypatch,
                                                                                             capsys):
    import errno
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")          # e.g. some network and FAT filesystems
    monkeypatch.setattr(checkpoints.os, "link", no_links)
    argv = TOKENIZER[1:] + ["--out-dir", str(tmp_path), "--ckpt-every", "1"]
    train_tokenizer.main(argv + ["--max-steps", "1"])
    folder = tmp_path / "checkpoints"
    assert (folder / "0000001.pt").read_bytes() == (folder / "last.pt").read_bytes()
    assert os.stat(folder / "0000001.pt").st_ino != os.stat(folder / "last.pt").st_ino   # a copy, not a link

    def full(src, dst):
        open(dst, "wb").write(b"half")                                  # a partial copy, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoints.shutil, "copyfile", full)
    with pytest.raises(SystemExit) as e:
        train_tokenizer.main(argv + ["--max-steps", "2", "--resume"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"step 2: wrote {folder / 'last.pt'}, but not its copy {folder / '0000002.pt'} " \
        "(No space left on device)" in err and "Traceback" not in err
    assert sorted(os.listdir(folder)) == ["0000001.pt", "last.pt"]      # no temp file, no half copy


def test_npz_on_a_full_disk_is_one_line_and_leaves_nothing(pair, tmp_path, monkeypatch, capsys):
    """sample.py's npz: the space is checked and the part files' blocks allocated before sampling, so a full disk is
    one line (exit 2), not a bus error with a .parts file left behind; a failing allocation removes its file. The PNG
    on a full disk: one line too, no temp file left."""
    import errno
    import sample
    flags = ["--far-ckpt", str(pair[0] / "far.pt"), "--num-samples", "4", "--out-npz", str(tmp_path / "s.npz")]
    usage = namedtuple("usage", "total used free")
    with monkeypatch.context() as m:
        m.setattr(checkpoints.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 2**20, 2**20))
        with pytest.raises(SystemExit) as e:
            sample.main(flags)
    assert e.value.code == 2 and "no space left on" in capsys.readouterr().err and os.listdir(tmp_path) == []

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(checkpoints.os, "posix_fallocate", full)
        with pytest.raises(SystemExit) as e:
            sample.main(flags)
    assert e.value.code == 2 and "No space left on device" in capsys.readouterr().err and os.listdir(tmp_path) == []
    monkeypatch.setattr(np.lib.format, "write_array", lambda *a, **k: full(0, 0, 0))   # the npz itself: disk full
    with pytest.raises(SystemExit) as e:
        sample.main(flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"could not write {tmp_path / 's.npz'} (No space left" in err
    assert os.listdir(tmp_path) == []                                   # no npz, no temp file, no parts
    from PIL import Image
    monkeypatch.setattr(Image.Image, "save", lambda *a, **k: full(0, 0, 0))   # the PNG grid: disk full
    with pytest.raises(SystemExit) as e:
        sample.main(flags[:2] + ["--class-id", "0", "--out", str(tmp_path / "s.png")])
    assert e.value.code == 2 and "No space left on device" in capsys.readouterr().err and os.listdir(tmp_path) == []


def test_a_signal_during_code_extraction_stops_it_and_the_next_run_extracts_again(tok_ckpt, tmp_path, monkeypatch):
    import io
    import codes
    from images import BUNDLED
    tok = checkpoints.load_tokenizer(tok_ckpt)
    terminal = io.StringIO()                                             # stdout and stderr, as a terminal shows them
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    checkpoints.STOP["signal"] = signal.SIGTERM                          # as if SIGTERM arrived during the first batch
    try:
        with pytest.raises(SystemExit) as e:
            codes.extract_codes(tok, os.path.join(BUNDLED, "train"), str(tmp_path), "none", 8, "cpu", 0, 1)
    finally:
        checkpoints.STOP.clear()
    assert e.value.code == 143 and "\nstopped by SIGTERM during the code extraction" in terminal.getvalue()   # own line
    assert not (tmp_path / "meta.json").exists()                          # incomplete: not marked done
    c, labels = codes.extract_codes(tok, os.path.join(BUNDLED, "train"), str(tmp_path), "none", 8, "cpu", 0, 1)
    assert c.shape[0] == 44 and (tmp_path / "meta.json").exists() and not list(tmp_path.glob("*.tmp.npy"))
