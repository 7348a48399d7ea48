"""Fixtures shared by the test files. Run the tests from the repo root: python -m pytest -q tests"""
import os
import shutil
import sys
from dataclasses import asdict

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
