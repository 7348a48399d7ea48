"""Invariants of far.py (Sec. 3.3, Tab. 2, Tab. 4 of arXiv 2411.16681) and parity with the official FAR logits.

Run: python -m pytest tests/test_far.py -q   (CPU, ~1 minute; the FAR-B parity test is most of it)
"""
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from far import FAR, PRESETS, FARConfig, far_loss, generate  # noqa: E402


THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models run ~100x faster on one thread when other jobs load the CPU (OpenMP threads just wait on
    each other); the FAR-B parity test asks for all threads again."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(THREADS)


def tiny(k=2, head="ar", **overrides):
    """A FAR small enough for exhaustive checks, with non-zero classifiers (the zero init gives constant logits)."""
    torch.manual_seed(0)
    cfg = FARConfig(**{**PRESETS["tiny"], "dim": 64, "n_layer": 2, "ar_head_layers": 2, "codebook_size": 32,
                       "grid": (4, 4), "num_classes": 5, "multiple_of": 32, "num_codebooks": k, "head": head,
                       **overrides})
    model = FAR(cfg)
    for out in model.output:
        nn.init.normal_(out.weight, std=0.1)
    return model.eval()


def random_batch(cfg, B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, cfg.codebook_size, (B, cfg.num_codebooks, *cfg.grid), generator=g)
    return codes, torch.randint(0, cfg.num_classes, (B,), generator=g)


def reference_sample(model, labels, cfg_scale, pick):
    """Slow sampler written from the definition: one teacher-forced model.forward per sub-code, positions in
    raster order, Sec. 3.3 CFG l_u + s (l_c - l_u). Valid because of causality (unfilled codes are zeros)."""
    cfg = model.cfg
    B, k, L = len(labels), cfg.num_codebooks, cfg.grid[0] * cfg.grid[1]
    codes = torch.zeros(B, k, *cfg.grid, dtype=torch.long)
    flat = codes.view(B, k, L)  # (B, k, h, w) -> (B, k, L), shares memory
    null = torch.full_like(labels, cfg.num_classes)
    with torch.no_grad():
        for t in range(L):
            for j in range(k):
                logits = model(codes, labels)[:, j, t]
                if cfg_scale != 1.0:
                    uncond = model(codes, null)[:, j, t]
                    logits = uncond + cfg_scale * (logits - uncond)
                flat[:, j, t] = pick(logits)
    return codes


HEADS = [(1, "ar"), (2, "ar"), (3, "ar"), (2, "linear"), (3, "mlp")]


@pytest.mark.parametrize("k,head", HEADS)
def test_causality_backbone_and_head(k, head):
    model = tiny(k, head)
    V = model.cfg.codebook_size
    codes, labels = random_batch(model.cfg)
    with torch.no_grad():
        base = model(codes, labels)  # (B, k, L, V)
        assert base.shape == (2, k, 16, V) and base.dtype == torch.float32
        t = 6
        # Changing every code after position t leaves the logits of positions <= t bit-identical.
        later = codes.clone().flatten(2)
        later[:, :, t + 1:] = (later[:, :, t + 1:] + 1) % V
        out = model(later.view_as(codes), labels)
        assert torch.equal(out[:, :, :t + 1], base[:, :, :t + 1])
        assert not torch.allclose(out[:, :, t + 2:], base[:, :, t + 2:])  # ... and later positions do see it
        # Inside position t: sub-codes 1..i+1 do not see code i (0-based) at t; the AR head's sub-code i+2 does,
        # the Tab. 4 classifiers' do not (they only read h_t); position t+1 sees it through the backbone.
        for i in range(k):
            one = codes.clone().flatten(2)
            one[:, i, t] = (one[:, i, t] + 1) % V
            out = model(one.view_as(codes), labels)
            assert torch.equal(out[:, :, :t], base[:, :, :t])
            assert torch.equal(out[:, :i + 1, t], base[:, :i + 1, t])
            if i + 1 < k:
                assert torch.equal(out[:, i + 1:, t], base[:, i + 1:, t]) != (head == "ar")
            assert not torch.allclose(out[:, :, t + 1], base[:, :, t + 1])


@pytest.mark.parametrize("k,head", HEADS)
def test_kv_cache_generation_equals_full_recompute(k, head):
    model = tiny(k, head)
    labels = torch.tensor([0, 3, 4])
    kw = dict(cfg_scale=2.0, temperature=0.9, top_p=0.95 if k == 2 else 1.0)
    fast = generate(model, labels, generator=torch.Generator().manual_seed(7), use_cache=True, **kw)
    slow = generate(model, labels, generator=torch.Generator().manual_seed(7), use_cache=False, **kw)
    assert fast.shape == (3, k, 4, 4) and fast.dtype == torch.int64
    assert torch.equal(fast, slow)
    assert len(fast.unique()) > 5  # really sampled, not a constant map


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_generate_equals_teacher_forced_sampling(cfg_scale):
    """generate() = ancestral sampling from forward()'s logits (with CFG for s != 1). For s = 1 this is plain
    conditional sampling, and the null class must not be run at all (no doubled batch)."""
    model = tiny(2, "ar")
    labels = torch.tensor([1, 2])
    batch_sizes = []
    hook = model.cls_embedding.register_forward_hook(lambda m, args, out: batch_sizes.append(args[0].shape[0]))
    out = generate(model, labels, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(3))
    hook.remove()
    assert batch_sizes == [2 if cfg_scale == 1.0 else 4]
    g = torch.Generator().manual_seed(3)
    ref = reference_sample(model, labels, cfg_scale, lambda l: torch.multinomial(l.softmax(-1), 1, generator=g)[:, 0])
    assert torch.equal(out, ref)


def test_top_k_1_is_greedy():
    model = tiny(3, "ar")
    labels = torch.tensor([0, 4])
    a = generate(model, labels, top_k=1, generator=torch.Generator().manual_seed(0))
    b = generate(model, labels, top_k=1, generator=torch.Generator().manual_seed(1), use_cache=False)
    greedy = reference_sample(model, labels, 2.0, lambda l: l.argmax(-1))
    assert torch.equal(a, greedy) and torch.equal(b, greedy)


def test_loss_is_mean_ce_and_overfits_one_batch():
    model = tiny(2, "ar", token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0, class_dropout_prob=0.0)
    for out in model.output:  # back to the real zero init: the first loss is exactly log(codebook_size)
        nn.init.zeros_(out.weight)
    codes, labels = random_batch(model.cfg, B=8)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(60):
        logits = model(codes, labels)
        d = far_loss(logits, codes)
        if step == 0:  # mean over sub-codes of the mean CE = one CE over all B*k*L tokens (equal counts)
            V = model.cfg.codebook_size
            flat = F.cross_entropy(logits.reshape(-1, V), codes.flatten(2).reshape(-1))
            assert torch.allclose(d["loss"], flat) and torch.allclose(d["loss"], (d["ce/0"] + d["ce/1"]) / 2)
            assert abs(d["loss"].item() - math.log(V)) < 1e-5
        opt.zero_grad()
        d["loss"].backward()
        opt.step()
        losses.append(d["loss"].item())
    # Memorising 8 x 2 x 16 random codes: 3.47 nats -> 0.046 measured in 60 steps; we assert a factor 10.
    assert losses[-1] < losses[0] / 10, losses[::10]


def test_short_head_sequences_take_the_math_kernel_with_the_same_logits_and_gradients(monkeypatch):
    """fast.sdpa_backend: in training the AR head's k-slot sequences run the math kernel on a CPU, the backbone's
    L-slot ones torch's flash kernel; logits and gradients equal those of torch's default choice up to rounding."""
    import fast
    model = tiny(3).train()
    codes, labels = random_batch(model.cfg, B=4)
    torch.manual_seed(5)                                              # the same dropout masks in both runs
    with torch.profiler.profile() as prof:
        ours = model(codes, labels)
    flash = sum(e.count for e in prof.key_averages() if e.key == "aten::_scaled_dot_product_flash_attention_for_cpu")
    assert flash == model.cfg.n_layer                                 # the backbone only: the head took math
    ours.square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    monkeypatch.setattr(fast, "sdpa_backend", lambda q: __import__("contextlib").nullcontext())
    torch.manual_seed(5)
    default = model(codes, labels)
    default.square().mean().backward()
    assert torch.allclose(ours, default, atol=1e-5)
    assert all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(grads, model.parameters()))


def test_label_dropout_uses_null_class():
    model = tiny(2, "ar", class_dropout_prob=1.0).train()
    labels = torch.tensor([0, 1, 4])
    null = model.cls_embedding.embedding_table.weight[model.cfg.num_classes]  # row num_classes, not 1000
    assert torch.equal(model.cls_embedding(labels), null.expand(3, -1))
    assert torch.equal(model.cls_embedding.eval()(labels), model.cls_embedding.embedding_table(labels))


def test_bf16_autocast_forward_close_to_fp32():
    model = tiny(2, "ar")
    codes, labels = random_batch(model.cfg)
    with torch.no_grad():
        ref = model(codes, labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(codes, labels)
            sampled = generate(model, labels, generator=torch.Generator().manual_seed(0))
    assert low.dtype == torch.float32 and (low - ref).abs().max() < 0.05 * ref.abs().max()
    assert sampled.shape == codes.shape and sampled.max() < model.cfg.codebook_size


# Official totals (official_code.md §5.1, instantiated from the official code); ours are equal, not just within 1%.
OFFICIAL_PARAMS = {("far-b", 2): 417_104_896, ("far-b", 3): 451_707_904,
                   ("far-l", 2): 901_195_520, ("far-l", 3): 944_776_960}


@pytest.mark.parametrize("name,k", list(OFFICIAL_PARAMS))
def test_parameter_counts_match_official(name, k):
    with torch.device("meta"):  # shapes only: no 900M-parameter allocation
        model = FAR(FARConfig(**{**PRESETS[name], "num_codebooks": k}))
    n = sum(p.numel() for p in model.parameters())
    assert n == OFFICIAL_PARAMS[name, k]
    assert abs(n - OFFICIAL_PARAMS[name, k]) <= 0.01 * OFFICIAL_PARAMS[name, k]  # the brief's tolerance


def test_compiled_forward_and_gradients_equal_eager():
    # train_far.py compiles the model on CUDA by default: the compiled graph must compute the same function
    model = tiny(k=2).train()
    model.cls_embedding.p = 0.0                                        # no label dropout: a deterministic pass
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    codes, labels = random_batch(model.cfg)
    eager = far_loss(model(codes, labels), codes)["loss"]
    g_eager = torch.autograd.grad(eager, model.tok_embeddings[0].weight)[0]
    compiled = far_loss(torch.compile(model)(codes, labels), codes)["loss"]
    g_compiled = torch.autograd.grad(compiled, model.tok_embeddings[0].weight)[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_compiled, g_eager, rtol=1e-4, atol=1e-7)
