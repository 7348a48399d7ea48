"""Invariants of quantizer.py and of its fast forms in fast.py: each fast form equals the paper's form written out
(lookup_reference, ibq_reference, entropy_reference), on any blocking and thread count; gradient routes; entropy by
hand.

Run: python -m pytest tests/test_quantizer.py -q
"""
import math
import os
import sys
import threading

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fast  # noqa: E402
import quantizer  # noqa: E402
from fast import code_softmax, lookup_block_elems, nearest_code  # noqa: E402
from quantizer import (IBQuantizer, VectorQuantizer, codebook_usage, distances, entropy_reference,  # noqa: E402
                       ibq_reference, lookup_reference)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """Run a test on 1 and on 2 intra-op threads (2: the lookups shard tokens over single-core pool threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("n,K,d,block", [(300, 64, 8, 1), (1000, 4096, 8, 1000), (512, 2**16, 4, 2**12),
                                         (257, 1000, 256, 2**18), (3000, 1000, 8, 2**12), (700, 3001, 8, None)])
def test_nearest_code_equals_reference(n, K, d, block, threads):
    g = torch.Generator().manual_seed(n + K)
    z, codebook = torch.randn(n, d, generator=g), torch.randn(K, d, generator=g)
    assert torch.equal(nearest_code(z, codebook, block_elems=block), lookup_reference(z, codebook))


def test_nearest_code_in_one_block_equals_reference():
    """The GPU path (lookup_block_elems on CUDA: the whole N x K matrix in one block), run on the CPU."""
    g = torch.Generator().manual_seed(0)
    z, codebook = torch.randn(600, 8, generator=g), torch.randn(1000, 8, generator=g)
    assert torch.equal(nearest_code(z, codebook, block_elems=600 * 1000), lookup_reference(z, codebook))


def test_lookup_block_elems_by_device():
    # CUDA: the whole matrix when it fits the budget (32 images of 16 x 16 tokens and 16384 codes do)
    assert lookup_block_elems(torch.device("cuda"), 8192, 16384, 8) == 8192 * 16384
    assert lookup_block_elems(torch.device("cuda"), 2**20, 2**18, 8) * 4 == fast.GPU_BLOCK_BYTES
    # CPU: cache-sized blocks that grow with d (taller GEMMs for IBQ's d = 256), whatever N and K are
    assert lookup_block_elems(torch.device("cpu"), 8192, 16384, 8) == 2**20
    assert lookup_block_elems(torch.device("cpu"), 8, 16, 256) == 2**25


def test_shards_run_on_one_core_each_and_leave_thread_counts_alone():
    """The pool threads of the 2-thread lookup run their ops on one core each; the caller keeps 2 threads, and a thread
    started afterwards gets the default (2), not the 1 that set_num_threads set on the pool threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        shards = fast._in_shards(lambda blocks: (torch.get_num_threads(), blocks), 100, 10, torch.device("cpu"))
        assert [(n, len(blocks)) for n, blocks in shards] == [(1, 5), (1, 5)]   # 10 blocks of 10 rows
        assert torch.get_num_threads() == 2
        later = []
        t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert later == [2]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("K,block", [(4096, 2**20), (1000, 256), (3001, 2**12), (70, 1)])
def test_nearest_code_duplicates_resolve_to_first_index(K, block, threads):
    """Exact duplicate codes (inside a group of 64, across groups, across code blocks when block < K) tie exactly:
    the first index wins, as in argmin, and the result equals the reference."""
    g = torch.Generator().manual_seed(K)
    codebook = F.normalize(torch.randn(K, 8, generator=g), dim=-1)
    src, dst = torch.randint(0, K, (2, K // 4), generator=g)
    codebook[dst] = codebook[src]                                     # duplicates before and after their source
    z = torch.cat([codebook[src], F.normalize(torch.randn(300, 8, generator=g), dim=-1)])   # tokens on the ties
    codes = nearest_code(z, codebook, block_elems=block)
    assert torch.equal(codes, lookup_reference(z, codebook))
    first = {}
    for j, row in enumerate(map(tuple, codebook.tolist())):
        first.setdefault(row, j)
    assert all(first[tuple(codebook[j].tolist())] == j for j in codes[:src.shape[0]].tolist())


@pytest.mark.parametrize("K,block", [(4096, 2**20), (1000, 256), (3001, 2**12)])
def test_nearest_code_near_ties_within_rounding(K, block):
    """Codes 1 ulp apart: fp32 cannot order them, and which one wins depends on the GEMM kernel MKL picks for the
    block shape (the reference over other shapes flips some, the official code's batch size too). What holds for any
    blocking: the chosen code is within fp32 rounding of the exact (fp64) nearest one."""
    g = torch.Generator().manual_seed(K)
    codebook = F.normalize(torch.randn(K, 8, generator=g), dim=-1)
    near = torch.randint(0, K, (K // 4,), generator=g)
    codebook[near] = torch.nextafter(codebook[near], torch.full_like(codebook[near], 2.0))   # 1 ulp away
    z = torch.cat([codebook[near], F.normalize(torch.randn(300, 8, generator=g), dim=-1)])
    codes = nearest_code(z, codebook, block_elems=block)
    dist64 = distances(z.double(), codebook.double())
    assert (dist64.gather(1, codes[:, None])[:, 0] - dist64.min(1).values).max() < 1e-6


def test_nearest_code_batch_of_one_and_padding():
    """N = 1 and K not a multiple of the group size (the last group is padded with +inf distances)."""
    g = torch.Generator().manual_seed(3)
    codebook = torch.randn(65, 4, generator=g)
    z = codebook[64:65] + 1e-3                                        # the only code of the padded group
    assert nearest_code(z, codebook).tolist() == [64]


@pytest.mark.parametrize("l2_norm", [True, False])
def test_vq_codes_and_values(l2_norm):
    torch.manual_seed(0)
    vq = VectorQuantizer(512, 8, l2_norm=l2_norm, block_elems=2**10)
    z = torch.randn(2, 8, 5, 7)
    z_q, losses, codes = vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)                       # (B, d, h, w) -> (B*h*w, d)
    if l2_norm:
        flat = F.normalize(flat, dim=-1)
    expected = lookup_reference(flat, vq.codebook()).view(2, 5, 7)
    assert torch.equal(codes, expected)
    # the straight-through output is exactly the codebook rows (decode_codes relies on it)
    assert torch.equal(z_q, vq.codebook()[codes].permute(0, 3, 1, 2))
    assert set(losses) == {"codebook", "commit"}
    assert torch.allclose(losses["commit"], 0.25 * losses["codebook"])   # same value, beta = 0.25


def test_straight_through_gradient_is_identity():
    vq = VectorQuantizer(64, 4, l2_norm=False)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    g = torch.randn(2, 4, 3, 3)
    z_q, _, _ = vq(z)
    (z_q * g).sum().backward()
    assert torch.equal(z.grad, g)
    # the decoder's gradient never reaches the codebook: only L_VQ trains it
    assert vq.embedding.weight.grad is None or vq.embedding.weight.grad.abs().sum() == 0


def test_codebook_and_commit_terms_move_only_their_tensors():
    vq = VectorQuantizer(64, 4, l2_norm=True)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    _, losses, codes = vq(z)
    g_z, g_c = torch.autograd.grad(losses["codebook"], [z, vq.embedding.weight], allow_unused=True)
    assert g_z is None or g_z.abs().sum() == 0                        # sg(z): the encoder is not moved
    used = torch.zeros(64, dtype=torch.bool)
    used[codes.flatten()] = True
    assert g_c[used].abs().sum(1).gt(0).all() and g_c[~used].abs().sum() == 0   # only the chosen codes move
    _, losses, _ = vq(z)
    g_z, g_c = torch.autograd.grad(losses["commit"], [z, vq.embedding.weight], allow_unused=True)
    assert g_z.abs().sum() > 0
    assert g_c is None or g_c.abs().sum() == 0                        # sg(z_q): the codebook is not moved


@pytest.mark.parametrize("straight_through", [True, False])
@pytest.mark.parametrize("block", [1, 37 * 50, 2**18])
def test_code_softmax_equals_reference(block, straight_through, threads):
    """Values and gradients (through z_q and both entropy terms) equal autograd through ibq_reference, in fp64."""
    g = torch.Generator().manual_seed(block)
    n, K, d, t = 60, 50, 6, 0.5
    z0, c0 = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(K, d, generator=g, dtype=torch.float64)
    w_zq, w_hs, w_hc = torch.randn(n, d, generator=g, dtype=torch.float64), 0.7, -1.3
    results = []
    for fn in (ibq_reference, lambda z, c, t: code_softmax(z, c, t, straight_through, block)):
        z, c = z0.clone().requires_grad_(), c0.clone().requires_grad_()
        codes, z_q, h_s, h_c = fn(z, c, t)
        loss = w_hs * h_s + w_hc * h_c + ((z_q * w_zq).sum() if straight_through else 0)
        loss.backward()
        results.append((h_s.detach(), h_c.detach(), z.grad, c.grad) + ((codes, z_q) if straight_through else ()))
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (a - b).abs().max()
    if not straight_through:
        assert code_softmax(z0, c0, t, False, block)[:2] == (None, None)


def test_code_softmax_sharp_fp32_as_accurate_as_reference():
    """T = 0.01 on logits spread over hundreds: most probabilities underflow, and code_softmax keeps them at e^LOG_P_MIN
    of the row's largest (off exp's subnormal path). In fp32 it is as close to the fp64 reference as fp32 autograd
    through the reference is."""
    g = torch.Generator().manual_seed(0)
    z0, c0, w = torch.randn(300, 9, generator=g), torch.randn(2000, 9, generator=g), torch.randn(300, 9, generator=g)

    def run(fn, dtype):
        z, c = z0.to(dtype, copy=True).requires_grad_(), c0.to(dtype, copy=True).requires_grad_()
        codes, z_q, h_s, h_c = fn(z, c, 0.01)
        (0.03 * (h_s - h_c) + (z_q * w.to(dtype)).sum()).backward()
        return [t.double() for t in (h_s.detach(), h_c.detach(), z.grad, c.grad)]
    exact = run(ibq_reference, torch.float64)
    ref = run(ibq_reference, torch.float32)
    ours = run(lambda z, c, t: code_softmax(z, c, t, True, 2**12), torch.float32)
    for e, r, o in zip(exact, ref, ours):
        assert (o - e).abs().max() <= 2 * (r - e).abs().max() + 1e-7, ((o - e).abs().max(), (r - e).abs().max())


def test_ibq_every_codebook_row_gets_gradient():
    torch.manual_seed(0)
    ibq = IBQuantizer(1000, 16, entropy_weight=0.0, block_elems=4096)
    z = torch.randn(2, 16, 4, 4, requires_grad=True)
    z_q, losses, codes = ibq(z)
    assert torch.equal(z_q, ibq.codebook()[codes].permute(0, 3, 1, 2))   # value: the hard lookup
    (z_q.square().sum() + sum(losses.values())).backward()
    assert ibq.embedding.weight.grad.abs().sum(1).gt(0).all()         # all 1000 rows, not only the 32 chosen
    assert z.grad.abs().sum() > 0
    # the three quantization terms have one value in the forward pass: 2.25 * MSE(C[codes], z) (official_code.md §8.2)
    mse = F.mse_loss(ibq.codebook()[codes].permute(0, 3, 1, 2), z)
    assert torch.allclose(sum(losses.values()), 2.25 * mse)


def test_entropy_loss_hand_computed():
    # two tokens, two codes, T = 1, logits = z C^T with C = I
    eye = torch.eye(2, dtype=torch.float64)
    # uniform per-token distributions: H_sample = ln 2, H_code = -sum 0.5 ln(0.5 + 1e-5)
    _, _, h_s, h_c = code_softmax(torch.zeros(2, 2, dtype=torch.float64), eye, 1.0, 4)
    assert math.isclose(h_s.item(), math.log(2), rel_tol=1e-12)
    assert math.isclose(h_c.item(), -math.log(0.5 + 1e-5), rel_tol=1e-12)
    # confident, different codes: H_sample is small, H_code = ln 2 by symmetry, so the loss is about -ln 2
    _, _, h_s, h_c = code_softmax(torch.tensor([[10.0, 0], [0, 10.0]], dtype=torch.float64), eye, 1.0, 4)
    q = math.exp(-10) / (1 + math.exp(-10))                            # probability of the other code
    assert math.isclose(h_s.item(), -(q * math.log(q) + (1 - q) * math.log1p(-q)), rel_tol=1e-12)
    assert math.isclose(h_c.item(), -math.log(0.5 + 1e-5), rel_tol=1e-12)
    assert (h_s - h_c).item() < -0.69


def test_vq_entropy_equals_official_distance_formula():
    """The VQ entropy term (official: softmax of -dist / T over all codes) through the blocked path."""
    torch.manual_seed(1)
    vq = VectorQuantizer(100, 8, entropy_weight=0.03, block_elems=256).train()
    z = torch.randn(2, 8, 4, 4)
    _, losses, _ = vq(z)
    flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 8), dim=-1)   # (B, d, h, w) -> (N, d), as vq does
    h_sample, h_code = entropy_reference(-distances(flat, vq.codebook()), 0.01)
    assert torch.allclose(losses["entropy"], 0.03 * (h_sample - h_code), rtol=1e-4, atol=1e-6)


def test_codebook_usage_known_histogram():
    codes = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    stats = codebook_usage(codes, 8)
    assert stats["usage"].item() == 0.5 and math.isclose(stats["perplexity"].item(), 4.0, rel_tol=1e-6)
    stats = codebook_usage(torch.zeros(10, dtype=torch.long), 8)
    assert stats["usage"].item() == 1 / 8 and math.isclose(stats["perplexity"].item(), 1.0, rel_tol=1e-6)


def _usage_worker(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    codes = torch.tensor([[0, 1, 1, 5], [2, 2, 2, 7]][rank])
    stats = codebook_usage(codes, 16)
    out[rank] = torch.stack([stats["usage"], stats["perplexity"]])
    dist.destroy_process_group()


def test_codebook_usage_under_ddp_equals_global_batch():
    port = 29500 + os.getpid() % 1000
    out = mp.Manager().dict()
    mp.spawn(_usage_worker, args=(2, port, out), nprocs=2)
    full = codebook_usage(torch.tensor([0, 1, 1, 5, 2, 2, 2, 7]), 16)
    for rank in range(2):
        assert torch.allclose(out[rank], torch.stack([full["usage"], full["perplexity"]]))


def test_codebook_gradient_is_bitwise_reproducible_at_the_default_thread_count():
    """Indexing's backward (index_put_ with accumulate) sums a codebook row's gradient in thread order on a multi-core
    CPU, so 2-thread training was not reproducible (three identical runs, three results). The quantizers look rows up
    with F.embedding, whose backward sums in a fixed order. 16 x 16 x 16 tokens: the size at which it showed."""
    torch.manual_seed(0)
    for q in (VectorQuantizer(512, 8), IBQuantizer(512, 8, entropy_weight=0.0)):
        z = torch.randn(16, 8, 16, 16)
        grads = []
        for _ in range(5):
            q.zero_grad()
            z_q, losses, _ = q(z)
            (z_q.sum() + sum(losses.values())).backward()
            grads.append(q.embedding.weight.grad.clone())
        assert all(torch.equal(grads[0], g) for g in grads[1:]), type(q).__name__


def test_ibq_in_eval_mode_takes_the_argmax_without_a_softmax(monkeypatch):
    """Evaluation and code extraction need IBQ's codes only: the argmax of the logits, no N x K softmax (fast.py's
    blocked max_inner_product, or the plain argmax under torch.compile), the same codes as training mode's."""
    torch.manual_seed(0)
    ibq = IBQuantizer(300, 16)
    z = torch.randn(2, 16, 5, 5)
    train_codes = ibq.train()(z)[2]
    monkeypatch.setattr(fast, "code_softmax", lambda *a, **k: pytest.fail("softmax computed in eval mode"))
    z_q, losses, codes = ibq.eval()(z)
    assert torch.equal(codes, train_codes) and "entropy" not in losses
    assert torch.equal(z_q, ibq.codebook()[codes].permute(0, 3, 1, 2))
    monkeypatch.setattr(quantizer, "FAST", False)                      # the paper's form: the same argmax
    assert torch.equal(ibq(z)[2], codes)
