"""Fixtures shared by the test files. Run the tests from the repo root: python -m pytest -q tests"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import namedtuple
from dataclasses import asdict

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from checkpoints import codebook_fingerprint, load_tokenizer, release_stop_signals  # noqa: E402
from far import FAR, PRESETS as FAR_PRESETS, FARConfig  # noqa: E402
from tokenizer import PRESETS, Tokenizer, TokenizerConfig  # noqa: E402


@pytest.fixture(scope="session")
def tok_ckpt(tmp_path_factory):
    """A randomly initialised (seed 0) tiny8 tokenizer at 32 px: 4x4 codes from two 512-entry sub-codebooks (short
    FAR sequences keep the tests fast), saved in our checkpoint format {"model", "config"}."""
    torch.manual_seed(0)
    cfg = TokenizerConfig(**{**PRESETS["tiny8"], "image_size": 32})
    path = tmp_path_factory.mktemp("tok") / "tok.pt"
    torch.save({"model": Tokenizer(cfg).state_dict(), "config": asdict(cfg)}, path)
    return str(path)


@pytest.fixture(scope="session")
def pair(tmp_path_factory, tok_ckpt):
    """The random 32-px tiny tokenizer of conftest (4x4 codes) and a random tiny FAR over its codes, 5 classes, saved
    as train_far.py saves them."""
    d = tmp_path_factory.mktemp("pair")
    shutil.copy(tok_ckpt, d / "tok.pt")
    tok = load_tokenizer(d / "tok.pt")
    tcfg = tok.cfg
    torch.manual_seed(0)
    fcfg = FARConfig(**{**FAR_PRESETS["tiny"], "codebook_size": 512, "grid": (4, 4), "num_classes": 5})
    far = FAR(fcfg)
    for out in far.output:                                              # not the uniform zero init: real samples
        torch.nn.init.normal_(out.weight, std=0.5)
    info = {"config": asdict(tcfg), "fingerprint": codebook_fingerprint(tok), "path": str(d / "tok.pt")}
    torch.save({"model": far.state_dict(), "config": asdict(fcfg), "tokenizer": info,
                "classes": list("vwxyz")}, d / "far.pt")
    return d, tok, far


@pytest.fixture(scope="session")
def lpips_files(tmp_path_factory):
    """LPIPS' two weight files with random weights (seed 0) in their official formats, in one folder: torchvision's
    VGG16 file (features.* and a classifier to skip) and LPIPS v0.1's lin{0..4}. -> (folder, vgg dict, lin dict)."""
    import torchvision                                                  # here: 1-2 s to import, for LPIPS only
    from losses import LPIPS
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    trunk = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    sd = {f"features.{k}": v for k, v in trunk.state_dict().items()}      # torchvision layout ...
    sd["classifier.0.weight"] = torch.zeros(2, 2)                          # ... including a classifier to skip
    torch.save(sd, folder / "vgg16-397923af.pth")
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(LPIPS.channels)}
    torch.save(lins, folder / "weights-vgg16-lpips.pth")
    return folder, sd, lins


Ranks = namedtuple("Ranks", "codes out")                            # exit codes and output of rank 0, rank 1


@pytest.fixture(scope="session")
def two_ranks():
    """two_ranks(argv, cwd=ROOT, env=None, check=True) -> Ranks([code 0, code 1], [output 0, output 1]): what `torchrun
    --standalone --nproc_per_node=2 argv` starts, without torchrun's agent. Each rank gets the environment torchrun
    gives it (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR / MASTER_PORT, and OMP_NUM_THREADS=1 unless
    set), and when one rank fails the other gets SIGTERM, as torchrun sends it. The agent costs seconds per launch
    on 2 cores (its imports, the rendezvous, its shutdown: docs/results.md, "The test suite"); the tests of torchrun
    itself (it passes SIGTERM on to every rank: test_preemption.py) and gpu_check.sh start the real one. check: both
    ranks must exit 0 (the first failed rank's output is the assertion's message)."""
    def run(argv, cwd=ROOT, env=None, timeout=300, check=True):
        with socket.socket() as s:                                      # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {"OMP_NUM_THREADS": "1", **(os.environ if env is None else env), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        logs = [tempfile.TemporaryFile("w+") for _ in range(2)]      # files, not pipes: no full-pipe stall
        procs = [subprocess.Popen([sys.executable, *argv], cwd=cwd, stdout=logs[r], stderr=subprocess.STDOUT,
                                  text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
        deadline, stopped = time.time() + timeout, None
        while any(p.poll() is None for p in procs):
            if stopped is None and (any(p.poll() for p in procs) or time.time() > deadline):
                stopped = time.time()                                   # a rank failed (or time is up): stop the rest
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
            if stopped is not None and time.time() > stopped + 30:
                for p in procs:
                    p.kill()
            time.sleep(0.05)
        out = []
        for log in logs:
            log.seek(0)
            out.append(log.read())
            log.close()
        codes = [p.returncode for p in procs]
        assert not check or codes == [0, 0], (codes, out[[c != 0 for c in codes].index(True)][-3000:])
        return Ranks(codes, out)
    return run


@pytest.fixture
def killed_after(monkeypatch):
    """killed_after(main, argv, step): run a training script's main(argv) and "kill" it right after its checkpoint of
    `step` (argv must save one there, e.g. --ckpt-every step). The run keeps its own --max-steps, so a cosine lr
    schedule is the same as in the uninterrupted run; --resume then continues from that checkpoint."""
    def run(module, argv, step):
        real = module.save_checkpoint

        def save_then_die(args, cfg, at, *rest, **kwargs):
            real(args, cfg, at, *rest, **kwargs)
            if at == step:
                raise KeyboardInterrupt                                 # what Ctrl-C / SIGINT would raise
        monkeypatch.setattr(module, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            module.main(argv)
        monkeypatch.setattr(module, "save_checkpoint", real)
    return run


def process_state():
    """What an in-process main (or a test) could change for every later test in the same pytest process on a CPU (the
    scripts' CUDA backend flags, e.g. evaluate.py's cudnn.allow_tf32 = False, do nothing here)."""
    import quantizer
    return {"threads": torch.get_num_threads(), "grad": torch.is_grad_enabled(), "dtype": torch.get_default_dtype(),
            "deterministic": torch.are_deterministic_algorithms_enabled(), "anomaly": torch.is_anomaly_enabled(),
            "quantizer.FAST": quantizer.FAST}


@pytest.fixture(autouse=True)
def process_state_left_alone():
    """Every test leaves the process as it found it. A script's main that lowered the thread count and left it lowered
    (sample.py on its error exits did) ran every later test on one thread: slower, and the tests "at the default
    thread count" at another count, where 2-thread nondeterminism cannot show."""
    before = process_state()
    yield
    after = process_state()
    assert after == before, {k: (before[k], after[k]) for k in before if after[k] != before[k]}   # {what: (was, is)}


@pytest.fixture(autouse=True)
def stop_signals_released():
    """A run that a test stops mid-way (exit 130 / 143, a NaN, killed_after's KeyboardInterrupt) keeps its SIGINT /
    SIGTERM handlers, as a process that ends there would; the next test starts with the handlers from before it."""
    yield
    release_stop_signals()
