"""The CPU rehearsal of what only a GPU run takes (issue: "the first GPU run must not crash"): every model the scripts
build or load is on the device they were asked for (run on `meta`, a device no CPU code path uses by accident); the
tokenizer's training forward compiles without graph breaks and the compiled quantizers equal the eager ones; the
numerics switches that a CUDA run sets. The 2-process runs (compile after DDP, --rep-weight 0) are in
test_train_far.py and test_train_tokenizer.py, the ImageNet-shaped rehearsal in test_scale.py.

Run: python -m pytest tests/test_gpu_paths.py -q
"""
import argparse
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoints  # noqa: E402
import quantizer  # noqa: E402
import sample  # noqa: E402
import train_far  # noqa: E402
import train_tokenizer  # noqa: E402
from tokenizer import PRESETS, Tokenizer, TokenizerConfig  # noqa: E402

META = torch.device("meta")


def devices(*modules):
    """The device types of every parameter and buffer of the modules."""
    return {t.device.type for m in modules for t in [*m.parameters(), *m.buffers()]}


def test_loaders_put_every_tensor_on_the_device(pair, monkeypatch):
    d = pair[0]
    assert devices(checkpoints.load_tokenizer(str(d / "tok.pt"), META)) == {"meta"}
    assert devices(checkpoints.load_far(str(d / "far.pt"), META)) == {"meta"}
    monkeypatch.setattr(checkpoints, "check_pair", lambda *args: None)   # it reads the codebooks' values: none on meta
    args = argparse.Namespace(far_ckpt=str(d / "far.pt"), tokenizer_ckpt=None, class_id=[4])   # the recorded tokenizer
    far, tok, classes = sample.load_models(args, None, META)
    assert devices(far, tok) == {"meta"} and classes == list("vwxyz")


def test_training_scripts_build_everything_on_the_device():
    args, _ = train_tokenizer.parse_args(["--preset", "tiny-dual", "--precision", "bf16", "--gan-weight", "0.5"])
    tok, ema, disc, lpips, teachers = train_tokenizer.build_models(args, TokenizerConfig(**PRESETS["tiny-dual"]), META)
    assert devices(tok, ema, disc, *teachers.values()) == {"meta"} and len(teachers) == 1 and lpips is None
    # the frozen teacher is cast to bf16 once, not by autocast at every step; the trained weights stay fp32
    assert {p.dtype for p in teachers[1].parameters()} == {torch.bfloat16}
    assert {p.dtype for p in tok.parameters()} == {torch.float32}
    far_args, _ = train_far.parse_args([])
    tok = Tokenizer(TokenizerConfig(**PRESETS["tiny"])).to(META)
    cfg, far = train_far.build_model(far_args, tok, [f"c{i}" for i in range(1000)], META)
    assert devices(far) == {"meta"} and cfg.num_classes == 1000


def test_without_a_teacher_the_feature_heads_neither_run_nor_train():
    args, _ = train_tokenizer.parse_args(["--preset", "tiny-dual", "--rep-weight", "0"])
    cfg = TokenizerConfig(**{**PRESETS["tiny-dual"], "image_size": 32})
    tok, _, _, _, teachers = train_tokenizer.build_models(args, cfg, torch.device("cpu"))
    assert teachers == {} and not any(p.requires_grad for p in tok.branches[1].feat_head.parameters())
    x_rec, aux = tok(torch.zeros(2, 3, 32, 32), features=False)
    assert aux["features"] == {}


@pytest.mark.parametrize("preset", ["tiny", "tiny-dual", "tiny8-ibq"])
def test_tokenizer_training_forward_compiles_without_graph_breaks(preset):
    """What train_tokenizer.py compiles on CUDA, in training mode with the entropy loss on: one graph, no break."""
    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig(**{**PRESETS[preset], "image_size": 32})).train()
    explanation = torch._dynamo.explain(tok)(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


@pytest.mark.parametrize("kind", ["vq", "ibq"])
def test_compiled_quantizer_equals_eager(kind):
    """Under torch.compile the quantizers run the paper's forms (quantizer.use_fast() is False): same codes, values,
    losses and gradients as the blocked eager forms."""
    torch.manual_seed(0)
    q = (quantizer.VectorQuantizer(256, 8, entropy_weight=0.03) if kind == "vq" else
         quantizer.IBQuantizer(256, 16, entropy_weight=0.05)).train()
    z = torch.randn(4, q.codebook_dim, 8, 8)
    results = []
    for fn in (q, torch.compile(q, fullgraph=True)):
        q.zero_grad()
        zi = z.clone().requires_grad_()
        z_q, losses, codes = fn(zi)
        ((z_q * torch.linspace(-1, 1, z_q.numel()).view(z_q.shape)).sum() + sum(losses.values())).backward()
        results.append((codes, z_q.detach(), torch.stack(list(losses.values())).detach(), zi.grad,
                        q.embedding.weight.grad.clone()))
    assert torch.equal(results[0][0], results[1][0])                   # the same codes
    for eager, compiled in zip(results[0][1:], results[1][1:]):   # T = 0.01 scales float rounding by 100
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_init_distributed_sets_the_documented_numerics(monkeypatch):
    """CUDA runs: matmuls in true fp32 (the quantizer's distances), TF32 convolutions, cudnn.benchmark, a 60-minute
    collective timeout and device_id. Checked by faking one CUDA device: the flags are plain settings on any machine."""
    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("set_device", d))
    monkeypatch.setattr(checkpoints.dist, "init_process_group", lambda *a, **k: calls.setdefault("pg", (a, k)))
    monkeypatch.setattr(checkpoints.dist, "get_rank", lambda: 3)
    monkeypatch.setattr(checkpoints.dist, "get_world_size", lambda: 8)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        ddp, rank, world, local_rank, device = checkpoints.init_distributed()
        assert (ddp, rank, world, local_rank, device) == (True, 3, 8, 3, torch.device("cuda", 3))
        assert not torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.benchmark and calls["set_device"] == torch.device("cuda", 3)
        args, kwargs = calls["pg"]
        assert args == ("nccl",) and kwargs["device_id"] == device and kwargs["timeout"].total_seconds() == 3600
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = before


def test_device_flag_names_the_valid_choices():
    assert checkpoints.device_flag("cpu") == "cpu" and checkpoints.device_flag("cpu:0") == "cpu:0"
    for bad in ("gpu", "cuda:7" if not torch.cuda.is_available() else "cuda:99", "meta", "cpu:1"):   # one CPU device
        with pytest.raises(argparse.ArgumentTypeError, match="use cpu"):
            checkpoints.device_flag(bad)


def test_training_modules_are_compiled_after_ddp():
    """checkpoints.distribute: compile(DDP(raw)), so the compiled backward is split at DDP's buckets; raw, whose
    weights the wrappers share, is what EMA, saving and sampling use."""
    checkpoints.dist.init_process_group("gloo", rank=0, world_size=1, store=checkpoints.dist.HashStore())
    try:
        raw = torch.nn.Linear(4, 4)
        model = checkpoints.distribute(raw, ddp=True, device=torch.device("cpu"), compile_=True)
        assert isinstance(model._orig_mod, checkpoints.DDP) and model._orig_mod.module is raw
        assert checkpoints.distribute(raw, ddp=False, device=torch.device("cpu"), compile_=False) is raw
    finally:
        checkpoints.dist.destroy_process_group()
