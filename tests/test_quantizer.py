"""Invariants of quantizer.py: exact lookup, gradient routes, IBQ's chunked backward, entropy and Eq. (7).

Run: python -m pytest tests/test_quantizer.py -q
"""
import math
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from quantizer import (IBQuantizer, VectorQuantizer, code_softmax, codebook_usage, disentangle_loss,  # noqa: E402
                       nearest_code)


def brute_force_codes(z, codebook):
    """Eq. (1) with the whole N x K distance matrix (the formulation the chunked lookup must equal)."""
    d = z.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * z @ codebook.t()
    return d.argmin(1)


@pytest.mark.parametrize("n,k,d,chunk", [(300, 64, 8, 1), (1000, 4096, 8, 1000), (512, 2**16, 4, 2**12),
                                         (257, 1000, 256, 2**18)])
def test_nearest_code_equals_brute_force(n, k, d, chunk):
    g = torch.Generator().manual_seed(n + k)
    z, codebook = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    assert torch.equal(nearest_code(z, codebook, chunk_elems=chunk), brute_force_codes(z, codebook))


@pytest.mark.parametrize("k,chunk", [(4096, 2**20), (1000, 256), (3001, 2**12), (70, 1)])
def test_nearest_code_duplicates_resolve_to_first_index(k, chunk):
    """Exact duplicate codes (inside a group of 64, across groups, across code blocks when chunk < K) tie exactly:
    the first index wins, as in argmin, and the result equals brute force."""
    g = torch.Generator().manual_seed(k)
    codebook = F.normalize(torch.randn(k, 8, generator=g), dim=-1)
    src, dst = torch.randint(0, k, (2, k // 4), generator=g)
    codebook[dst] = codebook[src]                                     # duplicates before and after their source
    z = torch.cat([codebook[src], F.normalize(torch.randn(300, 8, generator=g), dim=-1)])   # tokens on the ties
    codes = nearest_code(z, codebook, chunk_elems=chunk)
    assert torch.equal(codes, brute_force_codes(z, codebook))
    first = {}
    for j, row in enumerate(map(tuple, codebook.tolist())):
        first.setdefault(row, j)
    assert all(first[tuple(codebook[j].tolist())] == j for j in codes[:src.shape[0]].tolist())


@pytest.mark.parametrize("k,chunk", [(4096, 2**20), (1000, 256), (3001, 2**12)])
def test_nearest_code_near_ties_within_rounding(k, chunk):
    """Codes 1 ulp apart: fp32 cannot order them, and which one wins depends on the GEMM kernel MKL picks for the
    block shape (brute force over other shapes flips some, the official code's batch size too). What holds for any
    blocking: the chosen code is within fp32 rounding of the exact (fp64) nearest one."""
    g = torch.Generator().manual_seed(k)
    codebook = F.normalize(torch.randn(k, 8, generator=g), dim=-1)
    near = torch.randint(0, k, (k // 4,), generator=g)
    codebook[near] = torch.nextafter(codebook[near], torch.full_like(codebook[near], 2.0))   # 1 ulp away
    z = torch.cat([codebook[near], F.normalize(torch.randn(300, 8, generator=g), dim=-1)])
    codes = nearest_code(z, codebook, chunk_elems=chunk)
    z64, c64 = z.double(), codebook.double()
    dist64 = z64.pow(2).sum(1, keepdim=True) + c64.pow(2).sum(1) - 2 * z64 @ c64.t()
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
    vq = VectorQuantizer(512, 8, l2_norm=l2_norm, chunk_elems=2**10)
    z = torch.randn(2, 8, 5, 7)
    z_q, losses, codes = vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)                       # (B, d, h, w) -> (B*h*w, d)
    if l2_norm:
        flat = F.normalize(flat, dim=-1)
    expected = brute_force_codes(flat, vq.codebook()).view(2, 5, 7)
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


def unchunked_code_softmax(z, codebook, temperature):
    """The IBQ / entropy formulas with full N x K tensors and plain autograd (ibq_lfq_spec.md §1.6)."""
    logits = z @ codebook.t()
    soft = logits.softmax(-1)
    codes = soft.argmax(-1)
    hard = F.one_hot(codes, codebook.shape[0]).to(soft)
    z_q = (hard - soft.detach() + soft) @ codebook
    p, logp = (logits / temperature).softmax(-1), (logits / temperature).log_softmax(-1)
    h_sample = -(p * logp).sum(-1).mean()
    p_mean = p.mean(0)
    h_code = -(p_mean * (p_mean + 1e-5).log()).sum()
    return codes, z_q, h_sample, h_code


@pytest.mark.parametrize("chunk", [1, 37 * 50, 2**18])
def test_code_softmax_chunked_equals_unchunked(chunk):
    g = torch.Generator().manual_seed(chunk)
    n, k, d, t = 60, 50, 6, 0.5
    z0, c0 = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(k, d, generator=g, dtype=torch.float64)
    w_zq, w_hs, w_hc = torch.randn(n, d, generator=g, dtype=torch.float64), 0.7, -1.3
    results = []
    for fn in (unchunked_code_softmax, lambda z, c, t: code_softmax(z, c, t, chunk)):
        z, c = z0.clone().requires_grad_(), c0.clone().requires_grad_()
        codes, z_q, h_s, h_c = fn(z, c, t)
        ((z_q * w_zq).sum() + w_hs * h_s + w_hc * h_c).backward()
        results.append((codes, z_q.detach(), h_s.detach(), h_c.detach(), z.grad, c.grad))
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (a - b).abs().max()


def test_ibq_every_codebook_row_gets_gradient():
    torch.manual_seed(0)
    ibq = IBQuantizer(1000, 16, entropy_weight=0.0, chunk_elems=4096)
    z = torch.randn(2, 16, 4, 4, requires_grad=True)
    z_q, losses, codes = ibq(z)
    assert torch.equal(z_q, ibq.codebook()[codes].permute(0, 3, 1, 2))   # value: the hard lookup
    (z_q.square().sum() + sum(losses.values())).backward()
    assert ibq.embedding.weight.grad.abs().sum(1).gt(0).all()         # all 1000 rows, not only the 32 chosen
    assert z.grad.abs().sum() > 0
    # the three quantization terms have one value in the forward pass: 2.25 * MSE(C[codes], z) (spec §1.2)
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
    """The VQ entropy term (official: softmax of -dist / T over all codes) through the chunked path."""
    torch.manual_seed(1)
    vq = VectorQuantizer(100, 8, entropy_weight=0.03, chunk_elems=256).train()
    z = torch.randn(2, 8, 4, 4)
    _, losses, _ = vq(z)
    flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 8), dim=-1)
    c = vq.codebook()
    d = flat.pow(2).sum(1, keepdim=True) + c.pow(2).sum(1) - 2 * flat @ c.t()
    logits = -d / 0.01
    p, logp = logits.softmax(1), logits.log_softmax(1)
    p_mean = p.mean(0)
    expected = 0.03 * (-(p * logp).sum(1).mean() + (p_mean * (p_mean + 1e-5).log()).sum())
    assert torch.allclose(losses["entropy"], expected, rtol=1e-4, atol=1e-6)


def test_disentangle_loss_hand_computed():
    def unit(*v):                       # one patch, (B=1, d, h=1, w=1)
        return torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1)
    assert disentangle_loss([unit(1, 0), unit(3, 0)]).item() == 1.0          # parallel: cos^2 = 1
    assert disentangle_loss([unit(1, 0), unit(0, 2)]).item() == 0.0          # orthogonal
    assert math.isclose(disentangle_loss([unit(1, 0), unit(1, 1)]).item(), 0.5, rel_tol=1e-12)
    # k = 3: the mean of the three pairs (1 + 0.5 + 0.5) / 3; patches are averaged: (1 + 0) / 2
    assert math.isclose(disentangle_loss([unit(1, 0), unit(1, 0), unit(1, 1)]).item(), 2 / 3, rel_tol=1e-12)
    two = [torch.cat([unit(1, 0), unit(1, 0)], 2), torch.cat([unit(1, 0), unit(0, 1)], 2)]   # (1, 2, 2, 1)
    assert math.isclose(disentangle_loss(two).item(), 0.5, rel_tol=1e-12)


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
