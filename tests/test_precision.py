"""bf16 autocast, as `--precision bf16` runs on GPUs, exercised on the CPU: a few training steps of the tokenizer (GAN
and entropy loss on, so the discriminator and fast._CodeSoftmax run) and of FAR, a resume under bf16, and the
parts that must stay fp32 (quantizer distances and softmax statistics, RMSNorm, loss sums).

Run: python -m pytest tests/test_precision.py -q
"""
import argparse
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoints  # noqa: E402
import fast  # noqa: E402
import quantizer  # noqa: E402
import train_far  # noqa: E402
import train_tokenizer  # noqa: E402
from far import FAR, PRESETS as FAR_PRESETS, FARConfig, RMSNorm, far_loss  # noqa: E402
from tokenizer import PRESETS, Tokenizer, TokenizerConfig  # noqa: E402

BF16 = ["--precision", "bf16", "--image-size", "32", "--global-batch-size", "4", "--num-workers", "0",
        "--log-every", "1", "--eval-every", "100", "--sample-every", "100", "--ckpt-every", "100"]


def log(out):
    return [json.loads(line) for line in open(out / "log.jsonl")]


def record_dtypes(monkeypatch):
    """Wrap the quantizer's lookup and its softmax autograd function; return the list of dtypes they saw."""
    seen = []
    lookup, softmax = fast.nearest_code, fast.code_softmax

    def nearest_code(z, codebook, *args, **kwargs):
        seen.append(("lookup", z.dtype, codebook.dtype, torch.is_autocast_enabled("cpu")))
        return lookup(z, codebook, *args, **kwargs)

    def code_softmax(z, codebook, *args, **kwargs):
        out = softmax(z, codebook, *args, **kwargs)                      # (codes, z_q or None, h_sample, h_code)
        seen.append(("softmax", out[-2].dtype, (out[1] if out[1] is not None else out[-1]).dtype,
                     torch.is_autocast_enabled("cpu")))
        return out
    monkeypatch.setattr(fast, "nearest_code", nearest_code)
    monkeypatch.setattr(fast, "code_softmax", code_softmax)
    return seen


@pytest.mark.parametrize("preset", ["tiny", "tiny8-ibq"])
def test_tokenizer_bf16_steps_and_resume(preset, tmp_path, monkeypatch, killed_after):
    seen = record_dtypes(monkeypatch)
    flags = BF16 + ["--preset", preset, "--gan-weight", "0.5", "--gan-start", "1", "--entropy-weight", "0.03",
                    "--max-steps", "3", "--ckpt-every", "2", "--low-res-steps", "0"]   # the tiny recipe: cosine lr;
    # full-size 32 px crops: the GAN's PatchGAN needs >= 32 px (half-size crops: test_train_tokenizer)
    train_tokenizer.main(flags + ["--out-dir", str(tmp_path / "full")])
    killed_after(train_tokenizer, flags + ["--out-dir", str(tmp_path / "split")], 2)
    train_tokenizer.main(flags + ["--out-dir", str(tmp_path / "split"), "--resume"])
    full, split = ([r for r in log(tmp_path / d) if "g/total" in r] for d in ("full", "split"))
    assert len(full) == 3 and all(all(v == v and abs(v) != float("inf") for v in r.values()) for r in full)
    assert full[-1]["d/hinge"] > 0 and full[-1]["g/gan_weight"] == 0.5     # the discriminator ran, under bf16
    assert [r["g/total"] for r in full] == [r["g/total"] for r in split]    # bf16 resume equals uninterrupted
    a, b = (torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=True) for d in ("full", "split"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(t.dtype == torch.float32 for t in a["model"].values() if t.is_floating_point())   # fp32 master weights
    # every lookup and every softmax over the codes ran in fp32 with autocast off, though the step was under bf16
    kinds = {s[0] for s in seen}
    assert kinds == {"softmax"} | ({"lookup"} if preset == "tiny" else set())
    assert all(s[1:] == (torch.float32, torch.float32, False) for s in seen), set(seen)


def test_bf16_losses_are_fp32_and_the_quantizers_ignore_autocast():
    """Under autocast the decoder runs in bf16, yet every loss term is an fp32 scalar; and the quantizers (with the
    custom autograd function of IBQ and the entropy loss) give exactly the same result and gradients for the same bf16
    input inside and outside autocast: they compute in fp32 whatever the ambient autocast state."""
    from losses import generator_loss
    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig(**{**PRESETS["tiny8-ibq"], "image_size": 32}))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_rec, aux = tok(x)
        g = generator_loss(x, x_rec, aux, 0)
    assert x_rec.dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for v in g.values()), {k: v.dtype for k, v in g.items()}
    for q in (quantizer.IBQuantizer(256, 8), quantizer.VectorQuantizer(256, 8, entropy_weight=0.03)):
        z = torch.randn(2, 8, 4, 4).to(torch.bfloat16)
        results = []
        for enabled in (True, False):
            q.zero_grad()
            zi = z.detach().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                z_q, losses, codes = q(zi)
                loss = (z_q.float() * torch.linspace(-1, 1, z_q.numel()).view(z_q.shape)).sum() + sum(losses.values())
            loss.backward()
            results.append((z_q.float(), codes, loss, zi.grad.float(), q.embedding.weight.grad))
        for a, b in zip(*results):
            assert torch.equal(a, b), type(q).__name__


def test_rmsnorm_normalises_in_fp32_under_bf16():
    norm = RMSNorm(64, 1e-5)
    norm.weight.data.normal_()
    x = torch.randn(4, 64).to(torch.bfloat16) * 30
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    x32 = x.float()
    want = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16) * norm.weight
    assert torch.equal(y, want)                                            # fp32 statistics, then cast, then scale


def test_far_bf16_steps_resume_and_fp32_loss(tok_ckpt, tmp_path):
    torch.manual_seed(0)
    model = FAR(FARConfig(**{**FAR_PRESETS["tiny"], "grid": (4, 4), "num_classes": 11}))
    codes = torch.randint(0, 512, (2, 2, 4, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(codes, torch.tensor([0, 3]))
        loss = far_loss(logits, codes)
    assert logits.dtype == torch.float32 and loss["loss"].dtype == torch.float32   # logits and CE in fp32
    flags = ["--precision", "bf16", "--tokenizer-ckpt", tok_ckpt, "--global-batch-size", "8", "--log-every", "1",
             "--eval-every", "100", "--sample-every", "100", "--ckpt-every", "100", "--extract-batch-size", "8",
             "--augment", "flip"]                                          # 88 views to encode, not 40 x 44
    train_far.main(flags + ["--out-dir", str(tmp_path / "full"), "--max-steps", "3"])
    os.symlink(tmp_path / "full" / "codes", tmp_path / "codes")               # the same extracted codes
    (tmp_path / "split").mkdir()
    os.symlink(tmp_path / "full" / "codes", tmp_path / "split" / "codes")
    train_far.main(flags + ["--out-dir", str(tmp_path / "split"), "--max-steps", "2"])
    train_far.main(flags + ["--out-dir", str(tmp_path / "split"), "--max-steps", "3", "--resume"])
    full, split = ([r["loss"] for r in log(tmp_path / d) if "loss" in r] for d in ("full", "split"))
    assert len(full) == 3 and all(v == v for v in full) and full == split


@pytest.mark.parametrize("caps, native", [({"avx512_bf16": True, "amx_bf16": False}, True),
                                          ({"avx512_bf16": False, "amx_bf16": True}, True),
                                          ({"avx512_bf16": False, "amx_bf16": False}, False), ({}, False)])
def test_native_bf16_reads_the_cpu_flags(monkeypatch, caps, native):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    assert checkpoints.native_bf16(torch.device("cpu")) is native and not checkpoints.native_bf16(torch.device("meta"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: native)   # a GPU: what torch says of it (V100: no)
    assert checkpoints.native_bf16(torch.device("cuda")) is native


def test_the_tiny_recipes_auto_precision_follows_the_cpu_and_a_flag_overrides_it(tok_ckpt, tmp_path, monkeypatch,
                                                                                 capsys):
    """The tiny recipes say --precision auto: bf16 where the CPU has bf16 instructions, fp32 where oneDNN would
    emulate them (2.2-2.7x slower there). A run takes the resolved value, prints it and records it in its checkpoint."""
    assert train_far.RECIPES["tiny"]["precision"] == train_tokenizer.RECIPES["tiny"]["precision"] == "auto"
    no_bf16 = lambda: {"avx512_bf16": False, "amx_bf16": False}
    monkeypatch.setattr(torch.cpu, "get_capabilities", no_bf16)
    train_far.main(["--tokenizer-ckpt", tok_ckpt, "--augment", "none", "--global-batch-size", "8", "--max-steps", "1",
                    "--eval-every", "100", "--sample-every", "100", "--out-dir", str(tmp_path / "run")])
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["args"]["precision"] == "fp32" and "cpu, fp32" in capsys.readouterr().out
    parser = argparse.ArgumentParser()                                 # its error() is never reached here
    for caps, flag, want in ((no_bf16, "auto", "fp32"), (lambda: {"amx_bf16": True}, "auto", "bf16"),
                             (no_bf16, "bf16", "bf16"), (no_bf16, None, "fp32"), (no_bf16, "fp32", "fp32")):
        monkeypatch.setattr(torch.cpu, "get_capabilities", caps)
        args = argparse.Namespace(global_batch_size=8, out_dir=str(tmp_path / "set-up"), resume=False,
                                  precision=flag, compile=None)
        checkpoints.start_training(args, parser)
        assert args.precision == want and args.compile is False, (flag, caps())
