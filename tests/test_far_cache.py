"""The static KV cache and the compiled decode step of far.generate (fast.decode; Sec. 3.3; official_code.md §6).

Invariants: cached sampling draws the same codes as full recompute for every k and head, with and without CFG
and filtering; each layer's cache is one preallocated buffer written in place (same shape and storage at every
position); the compiled decode step equals the eager one, compiles two graphs (backbone, AR head) and never
recompiles across positions, calls, models or weight updates; with the weights folded in ("frozen") it equals eager
for each model and refuses weights changed in place; sampling under bf16 autocast keeps bf16 caches and gives valid
codes; eager CPU sampling runs on packed weight copies, remade after a weight update.

Run: python -m pytest tests/test_far_cache.py -q   (CPU; ~1 minute cold, most of it one inductor compile;
~25 s once inductor's on-disk cache holds the kernels)
"""
import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fast  # noqa: E402
from far import FAR, PRESETS, FARConfig, generate  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread when other jobs load the CPU (see tests/test_far.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(k=2, head="ar", seed=0):
    """A FAR of 2 backbone + 2 head blocks on a 4 x 4 grid with non-zero classifiers (the zero init samples
    uniformly)."""
    torch.manual_seed(seed)
    cfg = FARConfig(**{**PRESETS["tiny"], "dim": 64, "n_layer": 2, "ar_head_layers": 2, "codebook_size": 32,
                       "grid": (4, 4), "num_classes": 5, "multiple_of": 32, "num_codebooks": k, "head": head})
    model = FAR(cfg)
    for out in model.output:
        nn.init.normal_(out.weight, std=0.1)
    return model.eval()


def like_sample_py(seed):
    """A one-block FAR of the tiny preset's widths on a 4 x 4 grid: the shapes of test_sample's `sample.py --compile`
    run. With SAMPLE_PY_LABELS (its batch), the compiled-decode tests here compile the C++ kernels that run needs,
    so a cold run (a fresh clone) compiles them once for both files: inductor keys them by their source, shapes
    included."""
    torch.manual_seed(seed)
    model = FAR(FARConfig(**{**PRESETS["tiny"], "n_layer": 1, "ar_head_layers": 1, "grid": (4, 4), "num_classes": 5}))
    for out in model.output:
        nn.init.normal_(out.weight, std=0.5)
    return model.eval()


SAMPLE_PY_LABELS = torch.tensor([0, 0, 0, 4, 4, 4])   # sample.py --class-id 0 4 --per-class 3


def sample(model, seed=7, labels=None, **kw):
    labels = torch.tensor([0, 3, 4]) if labels is None else labels
    return generate(model, labels, generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("filters", [{}, {"top_k": 8}, {"top_p": 0.9}, {"top_k": 8, "top_p": 0.9}])
@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
@pytest.mark.parametrize("head", ["ar", "linear", "mlp"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_static_cache_equals_full_recompute(k, head, cfg_scale, filters):
    model = tiny(k, head)
    kw = dict(cfg_scale=cfg_scale, temperature=0.9, **filters)
    fast, slow = sample(model, use_cache=True, **kw), sample(model, use_cache=False, **kw)
    assert fast.shape == (3, k, 4, 4) and fast.dtype == torch.int64
    assert torch.equal(fast, slow)
    assert len(fast.unique()) > 4  # really sampled, not a constant map


def record_caches(model):
    """Forward pre-hooks logging (block list, shape, dtype, data_ptr of k_cache, pos) at every Attention call."""
    log, hooks = [], []
    for name, blocks in (("layers", model.layers), ("ar_head", getattr(model, "ar_head", []))):
        for block in blocks:
            def hook(module, args, name=name):
                cache, pos = args[2], args[3]
                log.append((name, tuple(cache[0].shape), cache[0].dtype, cache[0].data_ptr(), pos.tolist()))
            hooks.append(block.attention.register_forward_pre_hook(hook))
    return log, hooks


@pytest.mark.parametrize("k", [2, 3])
def test_one_static_buffer_per_layer_written_in_place(k):
    """Backbone caches (CFG batch, H, h*w, D), head caches (CFG batch, H, k, D): allocated once per call, never
    grown or reallocated (the same storage at every position), written at slot t / slot j."""
    model = tiny(k)
    log, hooks = record_caches(model)
    sample(model, cfg_scale=2.0)
    for h in hooks:
        h.remove()
    L, H, D = 16, model.cfg.n_head, model.cfg.dim // model.cfg.n_head
    backbone = [e for e in log if e[0] == "layers"]
    head = [e for e in log if e[0] == "ar_head"]
    assert {e[1] for e in backbone} == {(6, H, L, D)} and {e[1] for e in head} == {(6, H, k, D)}
    assert len({e[3] for e in backbone}) == model.cfg.n_layer      # one storage per layer for all 16 positions
    assert len({e[3] for e in head}) == model.cfg.ar_head_layers    # the head's k slots are reused, not re-zeroed
    assert [e[4] for e in backbone[::model.cfg.n_layer]] == [[t] for t in range(L)]
    assert [e[4] for e in head[::model.cfg.ar_head_layers]] == [[j] for j in range(k)] * L


def test_compiled_decode_equals_eager_and_never_recompiles():
    """torch.compile of the decode step: same codes as eager under the same generator; two graphs (decode_backbone,
    decode_head) for 16 positions x (1 + k) steps; a second call, a second model of the same shapes and updated
    weights reuse them (error_on_recompile turns any recompilation into an error). like_sample_py's one block each
    keeps the cold inductor compile short on a CPU."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    fast.compiled.cache_clear()
    counters.clear()
    model = like_sample_py(0)
    kw = dict(cfg_scale=2.0, top_k=16, labels=SAMPLE_PY_LABELS)
    eager = sample(model, **kw)
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert torch.equal(sample(model, compile=True, **kw), eager)
        assert torch.equal(sample(model, seed=8, compile=True, **kw), sample(model, seed=8, **kw))
        other = like_sample_py(1)                      # new weights, same shapes: parameters are graph inputs
        assert torch.equal(sample(other, compile=True, **kw), sample(other, **kw))
        with torch.no_grad():                          # an in-place update (a training step) is seen, not baked in
            model.layers[0].feed_forward.w1.weight.mul_(3)
        assert torch.equal(sample(model, compile=True, **kw), sample(model, **kw))
    assert counters["stats"]["unique_graphs"] == 2
    assert not counters["graph_break"]
    with pytest.raises(AssertionError, match="use_cache"):
        sample(model, use_cache=False, compile=True)


def test_frozen_compiled_decode_equals_eager_per_model_and_refuses_changed_weights():
    """compile="frozen" (sample.py --compile on a CPU) folds the weights into the graphs: same codes as eager for each
    of two models (a graph pair per model, never shared: the second model must not sample with the first one's
    weights), and a weight changed in place afterwards is refused, not silently ignored (like_sample_py's shapes)."""
    fast.compiled.cache_clear()
    first, second = like_sample_py(0), like_sample_py(1)
    kw = dict(cfg_scale=2.0, top_k=16, labels=SAMPLE_PY_LABELS)
    for model in (first, second, first):
        assert torch.equal(sample(model, compile="frozen", **kw), sample(model, **kw))
    assert not torch.equal(sample(first, **kw), sample(second, **kw))   # the two really differ
    with torch.no_grad():
        first.layers[0].feed_forward.w1.weight.mul_(3)                  # as an optimizer step would
    with pytest.raises(RuntimeError, match="changed in place"):
        sample(first, compile="frozen", **kw)
    assert torch.equal(sample(first, compile=True, **kw), sample(first, **kw))   # weights as inputs: fine


def test_bf16_autocast_sampling():
    """Under CPU bf16 autocast the caches hold bf16 keys (the dtype wqkv gives), codes are valid, and greedy
    codes agree with fp32 greedy codes almost everywhere (bf16 moves near-tied logits only)."""
    model = tiny(3)
    log, hooks = record_caches(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = sample(model, cfg_scale=2.0, top_k=1)
    for h in hooks:
        h.remove()
    assert {e[2] for e in log} == {torch.bfloat16}
    assert low.dtype == torch.int64 and low.min() >= 0 and low.max() < model.cfg.codebook_size
    ref = sample(model, cfg_scale=2.0, top_k=1)
    assert (low == ref).float().mean() > 0.9


def test_eager_decode_packs_linear_weights_once_and_repacks_after_a_weight_update(monkeypatch):
    """Eager CPU sampling runs every large nn.Linear on oneDNN-packed copies of its weight (fast.packed_linears; the
    size limit lowered here so that a small model has them): each layer gives F.linear's output up to summation order,
    the copies are reused while the weights are unchanged and remade after an in-place update (training samples the
    model it trains), codes follow the new weights, and no Linear keeps the patched forward after the call. Under
    autocast, for weights under the limit, and where the packing op is missing, nothing is packed."""
    model = tiny(2)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad(), fast.packed_linears(model, 6):              # the default limit: every weight is smaller
        assert not any("forward" in vars(m) for m in linears)
    monkeypatch.setattr(fast, "PACK_MIN_ELEMS", 0)
    x = {m: torch.randn(6, 1, m.in_features) for m in linears}
    plain = {m: m(x[m]) for m in linears}
    with torch.no_grad(), fast.packed_linears(model, 6):
        assert all("forward" in vars(m) for m in linears)             # really the packed path
        for m in linears:
            torch.testing.assert_close(m(x[m]), plain[m], rtol=1e-5, atol=1e-6)
    assert not any("forward" in vars(m) for m in linears)
    first = sample(model, cfg_scale=2.0)
    packed = fast._PACKED[model][1]
    assert torch.equal(sample(model, cfg_scale=2.0), first) and fast._PACKED[model][1] is packed   # reused, same codes
    copy.deepcopy(model)                                                # (an EMA copy) never meets the packed copies
    with torch.no_grad():
        model.layers[0].feed_forward.w1.weight.mul_(3)                  # as an optimizer step would
    updated = sample(model, cfg_scale=2.0)
    assert fast._PACKED[model][1] is not packed                         # repacked
    assert torch.equal(updated, sample(model, cfg_scale=2.0, use_cache=False))   # the new weights' codes
    assert not torch.equal(updated, first)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), fast.packed_linears(model, 6):
        assert not any("forward" in vars(m) for m in linears)
    fresh = tiny(2, seed=1)

    def missing(*args):
        raise RuntimeError("no such op in this build")
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", missing)
    with torch.no_grad(), fast.packed_linears(fresh, 6):              # a build without the packing op: plain F.linear
        assert not any("forward" in vars(m) for m in fresh.modules() if isinstance(m, nn.Linear))
    assert torch.equal(sample(fresh), sample(fresh, use_cache=False))
