"""Quantizers of FQGAN and IBQ, one screen each, plus the disentanglement regularizer.

FQGAN ("Factorized Visual Tokenization and Generation", arXiv 2411.16681): Sec. 3.1 (Eq. 1, the VQ part of Eq. 2),
Sec. 3.2 (Eq. 5, one quantizer per sub-codebook), Sec. 3.2.1 (Eq. 7). IBQ (arXiv 2412.02692): the official facts
are in docs/official_code.md §8 (and §1.5 for FQGAN's quantizer). lookup_reference and ibq_reference write Eq. (1)
and IBQ out on N x K matrices, and torch.compile traces them (inductor fuses them); in eager mode nearest_code and
code_softmax compute the same in blocks (blocked()).
Tests: pytest tests/test_quantizer.py. Speed: python bench.py --only lookup

Glossary (shared by all files): z encoder features, z_q quantized, codes indices, k sub-codebooks,
codebook_size K, codebook_dim d, beta commitment weight, N = number of tokens (B*h*w).
"""
import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# CPU blocks hold CPU_ELEMS_PER_DIM * d elements: 2^20 (4 MiB, cache-sized) for the d = 8 lookup, 2^25 for IBQ's
# d = 256, whose 2d flops per element need tall GEMMs. On a GPU a block is the whole N x K matrix if it fits
# GPU_BLOCK_BYTES (FQGAN_BLOCK_MB, default 1024). code_softmax's forward + backward hold up to ~8.5 blocks at once
# (IBQ's straight-through; 5 for the entropy term alone), so eager GPU runs (--no-compile) need up to 8.5 GiB for it:
# FQGAN_BLOCK_MB=256 on 24 GB cards. Compiled runs take the paper's forms (blocked()), without blocks.
CPU_ELEMS_PER_DIM, GPU_BLOCK_BYTES = 2**17, int(float(os.environ.get("FQGAN_BLOCK_MB", 1024)) * 2**20)
GROUP = 64                      # codes per group in nearest_code's two-level argmin
# code_softmax keeps log-probabilities >= LOG_P_MIN (p >= e^-60 ~ 1e-26 of the row's largest; no fp32 sum over
# K <= 2^18 codes can see it): below, exp() and GEMMs take x86's slow paths for subnormal floats.
LOG_P_MIN = -60.0
_POOLS = {}                     # (process id, threads) -> the thread pool of _in_shards


def distances(z, codebook):
    """||z_i - c_j||^2 for z (N, d), codebook (K, d) -> (N, K), in the official code's formula and op order."""
    return z.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * z @ codebook.t()


def lookup_reference(z, codebook, _block_elems=None):
    """Eq. (1): codes_i = argmin_j ||z_i - c_j||^2 -> (N,) int64, the first index on ties (nearest_code's signature)."""
    return distances(z, codebook).argmin(1)                           # paper-map: Eq. (1)


def entropy_reference(logits, temperature):
    """Entropy loss terms, p_i = softmax(logits_i / T): mean_i H(p_i) (minimised), H(mean_i p_i) (maximised)."""
    p, logp = (logits / temperature).softmax(1), (logits / temperature).log_softmax(1)
    p_mean = p.mean(0)
    return -(p * logp).sum(1).mean(), -(p_mean * (p_mean + 1e-5).log()).sum()


def ibq_reference(z, codebook, temperature=0.01):
    """IBQ (official_code.md §8.1, §8.3) -> (codes, z_q, h_sample, h_code), as code_softmax returns them. The one-hot
    hard - sg(soft) + soft has the value of hard (so z_q = C[codes]) and the gradient of soft."""
    logits = z @ codebook.t()                                         # (N, K), raw inner products
    soft = logits.softmax(1)
    codes = soft.argmax(1)
    hard = F.one_hot(codes, codebook.shape[0]).to(soft)               # (N, K)
    z_q = (hard - soft.detach() + soft) @ codebook                    # paper-map: IBQ
    return codes, z_q, *entropy_reference(logits, temperature)


BLOCKED = True   # False: the paper's forms in eager mode too (bench.py's memory estimate of a compiled run)


def blocked():
    """True in eager mode: the quantizers take the blocked forms. Under torch.compile they take the paper's forms, which
    compile without graph breaks (the blocked ones use a thread pool and a custom autograd Function)."""
    return BLOCKED and not torch.compiler.is_compiling()


@torch.no_grad()
def max_inner_product(z, codebook, block_elems=None):
    """IBQ's codes without its softmax (evaluation, code extraction): argmax_j z_i . c_j -> (N,), in row blocks."""
    rows = max(1, (block_elems or lookup_block_elems(z.device, len(z), *codebook.shape)) // len(codebook))
    return torch.cat([(z[i:i + rows] @ codebook.t()).argmax(1) for i in range(0, len(z), rows)])


def lookup_block_elems(device, n, K, d):
    """Elements of the N x K distance / logit matrix that nearest_code and code_softmax hold at a time. CUDA: all when
    N K 4 bytes fit GPU_BLOCK_BYTES (a GPU loses time on launches, not memory traffic). CPU: cache-sized blocks."""
    if device.type == "cuda":
        return n * K if n * K * 4 <= GPU_BLOCK_BYTES else GPU_BLOCK_BYTES // 4
    return CPU_ELEMS_PER_DIM * d


def _in_shards(fn, n, rows, device):
    """[fn(blocks)] for the row blocks slice(i, i + rows) of range(n): on a CPU with T > 1 threads and >= 2T blocks,
    one run of blocks on each of T pool threads whose torch ops use one core each; else one call. Ops split over cores
    meet at barriers, and on a busy machine each waits for a descheduled thread (bench.py --only lookup)."""
    blocks, threads = [slice(i, min(i + rows, n)) for i in range(0, n, rows)], torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or len(blocks) < 2 * threads:
        return [fn(blocks)]
    if (os.getpid(), threads) not in _POOLS:                          # (a forked child builds its own pool)
        started = threading.Barrier(threads)                          # one task on each pool thread

        def one_core(_):
            torch.get_num_threads()                                   # initialise this thread's OpenMP state, then set
            torch.set_num_threads(1)                                  # it to 1: OpenMP and MKL keep one per thread,
            started.wait()                                            # the caller's is unchanged
        _POOLS[os.getpid(), threads] = pool = ThreadPoolExecutor(threads, thread_name_prefix="quantizer")
        list(pool.map(one_core, range(threads)))
        torch.set_num_threads(threads)                                # restores the default for threads started later
    step, fn = -(-len(blocks) // threads), torch.no_grad()(fn)        # grad mode is per thread: off, as in the caller
    return list(_POOLS[os.getpid(), threads].map(fn, [blocks[i:i + step] for i in range(0, len(blocks), step)]))


@torch.no_grad()
def nearest_code(z, codebook, block_elems=None):
    """lookup_reference(z, codebook) for z (N, d), codebook (K, d) -> (N,) int64, in (codes x tokens) blocks of
    block_elems distances (default lookup_block_elems), each the official (||c||^2 + ||z||^2) - 2 c.z (add, addmm:
    -2 is a power of two, so it rounds like "sum + sum - 2 * einsum"), codes-major (c @ z^T). torch's argmin is not
    vectorised, so it is two-level: the min of each group of GROUP codes, the first group holding the block minimum,
    the argmin inside it (the first minimum of the first minimal group is argmin's index, ties included).
    NOTE: fp32 distances depend on the GEMM kernel MKL picks for a shape, so near-ties (< ~1e-6 apart) can resolve
    differently for different batch sizes or thread counts, in the official code as here."""
    (n, d), K = z.shape, codebook.shape[0]
    elems = block_elems or lookup_block_elems(z.device, n, K, d)
    pad = -K % GROUP                                                  # whole groups: pad with codes at distance +inf
    c_sq = F.pad(codebook.pow(2).sum(1, keepdim=True), (0, 0, 0, pad), value=float("inf"))   # (K + pad, 1)
    codebook, z_sq, z_t = F.pad(codebook, (0, 0, 0, pad)), z.pow(2).sum(1)[None], z.t().contiguous()   # (1, N), (d, N)
    cols = min(K + pad, max(1, elems // GROUP) * GROUP)               # codes per block, whole groups
    rows = min(n, max(1, elems // cols))                              # tokens per block
    codes, best = torch.empty(n, dtype=torch.long, device=z.device), z.new_empty(n)   # best: distance of codes[i]

    def shard(blocks):
        block = z.new_empty(cols * rows)
        for c0 in range(0, K + pad, cols):
            c_blk, c_sq_blk = codebook[c0:c0 + cols], c_sq[c0:c0 + cols]
            for o in blocks:
                r = o.stop - o.start
                dist_ = torch.add(c_sq_blk, z_sq[:, o], out=block[:c_blk.shape[0] * r].view(-1, r))   # (kb, r)
                groups = dist_.addmm_(c_blk, z_t[:, o], alpha=-2).view(-1, GROUP, r)   # (kb / GROUP, GROUP, r)
                d_min, g = groups.amin(1).min(0)                      # (r,) block minimum and its first group
                idx = c0 + g * GROUP + groups[g, :, torch.arange(r, device=z.device)].argmin(1)   # (r, GROUP) -> (r,)
                better = d_min < best[o] if c0 else torch.ones_like(g, dtype=torch.bool)   # earlier blocks win ties
                codes[o], best[o] = torch.where(better, idx, codes[o]), torch.where(better, d_min, best[o])
    _in_shards(shard, n, rows, z.device)
    return codes                                                      # paper-map: Eq. (1)


def _softmax(logits, temperature):
    """softmax(logits / T) per row as (p, x, log_s), log p = x - log_s: x = logits / T - row max >= LOG_P_MIN."""
    x = logits.sub(logits.amax(1, keepdim=True)).div_(temperature).clamp_(min=LOG_P_MIN)
    p = x.exp()
    s = p.sum(1, keepdim=True)
    return p.div_(s), x, s.log_()


class _CodeSoftmax(torch.autograd.Function):
    """ibq_reference in row blocks of the logits A = z C^T (N, K), never storing A; the backward recomputes each block.
    forward -> (codes = argmax_j A_ij, z_q = onehot_ste(A) @ C, h_sample, h_code), codes and z_q None without
    straight_through. NOTE: the reference (and official) codes are argmax softmax(A): the same unless fp32 rounds the
    two largest probabilities equal. Gradients, as autograd gives them for the reference (tested):
      z_q:      dA = soft * (G - <soft, G>),  G = g_zq C^T,  and dC += hard^T g_zq
      h_sample: dH_i/dA_i = -p * (log p + H_i) / T
      h_code:   dH/dA_i = p * (u - <p, u>) / (N T),  u = dH/dpbar = -log(pbar + eps) - pbar / (pbar + eps)"""

    @staticmethod
    def forward(ctx, z, codebook, temperature, straight_through, elems):
        block_rows = min(z.shape[0], max(1, elems // codebook.shape[0]))   # tokens per block
        codes = torch.empty(z.shape[0], dtype=torch.long, device=z.device) if straight_through else None

        def shard(blocks):                                            # sum_i H_i and sum_i p_i over the blocks
            h_sum, p_sum = z.new_zeros(()), z.new_zeros(codebook.shape[0])
            for rows in blocks:
                logits = z[rows] @ codebook.t()                       # (rows, K)
                if straight_through:
                    codes[rows] = logits.argmax(1)
                p, x, log_s = _softmax(logits, temperature)
                h_sum += log_s.sum() - torch.dot(p.view(-1), x.view(-1))   # H_i = log s_i - <p_i, x_i>
                p_sum += p.sum(0)
            return h_sum, p_sum
        h_sum, p_sum = map(sum, zip(*_in_shards(shard, z.shape[0], block_rows, z.device)))
        p_mean = p_sum / z.shape[0]                                   # (K,) batch-average code distribution
        ctx.save_for_backward(z, codebook, codes, p_mean)
        ctx.temperature, ctx.block_rows = temperature, block_rows
        ctx.set_materialize_grads(False)                              # unused outputs get None: skip their terms
        h_code = -(p_mean * (p_mean + 1e-5).log()).sum()             # the +1e-5 is the official one
        return codes, codebook[codes] if straight_through else None, h_sum / z.shape[0], h_code

    @staticmethod
    def backward(ctx, _g_codes, g_zq, g_hs, g_hc):
        z, codebook, codes, p_mean = ctx.saved_tensors
        w_s, w_c = [(0 if g is None else g) / (z.shape[0] * ctx.temperature) for g in (g_hs, g_hc)]
        u = -(p_mean + 1e-5).log() - p_mean / (p_mean + 1e-5)         # (K,) dH_code / dp_mean
        g_z = torch.empty_like(z)

        def shard(blocks):                                            # fills g_z[blocks]; returns their part of dL/dC
            g_c = torch.zeros_like(codebook)
            for rows in blocks:
                logits = z[rows] @ codebook.t()                       # (rows, K), recomputed
                p, x, log_s = _softmax(logits, ctx.temperature)       # dL/dA of the entropy terms, via softmax(A / T)
                logp = x.sub_(log_s)
                h = -(p.unsqueeze(1) @ logp.unsqueeze(2)).view(-1, 1)   # (rows, 1) H_i
                g = logp.add_(h).mul_(-w_s).add_(u * w_c).sub_((p @ u)[:, None] * w_c).mul_(p)
                if g_zq is not None:                                  # straight-through one-hot, softmax(A) at T = 1
                    soft, g_hot = _softmax(logits, 1.0)[0], g_zq[rows] @ codebook.t()   # (rows, K) dL/d(one-hot)
                    g = g + g_hot.sub_((soft.unsqueeze(1) @ g_hot.unsqueeze(2)).view(-1, 1)).mul_(soft)
                g_z[rows], g_c = g @ codebook, g_c.addmm_(g.t(), z[rows])
            return g_c
        g_c = sum(_in_shards(shard, z.shape[0], ctx.block_rows, z.device))
        if g_zq is not None:
            g_c.index_add_(0, codes, g_zq)                            # the one-hot's value is hard: dC += hard^T g
        return g_z, g_c, None, None, None


def code_softmax(z, codebook, temperature=0.01, straight_through=True, block_elems=None):
    """ibq_reference(z, codebook, temperature) for z (N, d), codebook (K, d), in blocks of block_elems logits (default
    lookup_block_elems); straight_through=False returns (None, None, h_sample, h_code). Computed in >= fp32."""
    dtype = torch.promote_types(z.dtype, torch.float32)             # bf16 -> fp32; fp64 stays (tests)
    elems = block_elems or lookup_block_elems(z.device, z.shape[0], codebook.shape[0], z.shape[1])
    return _CodeSoftmax.apply(z.to(dtype), codebook.to(dtype), temperature, straight_through, elems)


class VectorQuantizer(nn.Module):
    """FQGAN / LlamaGen vector quantizer (Sec. 3.1, Eq. 1-2), used once per sub-codebook (Eq. 5).
    forward(z (B, d, h, w)) -> (z_q (B, d, h, w), losses {"codebook", "commit"[, "entropy"]}, codes (B, h, w))"""

    def __init__(self, codebook_size, codebook_dim, l2_norm=True, beta=0.25, entropy_weight=0.0,
                 entropy_temperature=0.01, block_elems=None):
        super().__init__()
        self.codebook_size, self.codebook_dim, self.l2_norm, self.beta = codebook_size, codebook_dim, l2_norm, beta
        self.entropy_weight, self.entropy_temperature = entropy_weight, entropy_temperature
        self.block_elems = block_elems                                # None: lookup_block_elems for the device
        # The official straight-through z + sg(z_q - z) is z_q up to rounding; ours, z_q + (z - sg(z)), is exactly z_q
        # (decode_codes(encode(x)) = forward(x) bit for bit). load_tokenizer() sets the official one (parity tests).
        self.official_ste = False
        self.embedding = nn.Embedding(codebook_size, codebook_dim)
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)   # official init (re-normed)
        if l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, dim=-1)

    def codebook(self):
        """The codes as used in Eq. (1): (K, d), l2-normalised when l2_norm (FQGAN's default)."""
        w = self.embedding.weight.float()
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def forward(self, z):
        if z.dim() != 4 or z.shape[1] != self.codebook_dim:
            raise ValueError(f"VectorQuantizer expects z of shape (B, {self.codebook_dim}, h, w), got {tuple(z.shape)}")
        b, d, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):            # distances in fp32 even under bf16 autocast
            z = z.float().permute(0, 2, 3, 1).reshape(-1, d)          # (B, d, h, w) -> (B*h*w, d), row-major b, h, w
            if self.l2_norm:
                z = F.normalize(z, dim=-1)                            # Sec. 3.1: cosine-similarity lookup
            codebook, fast = self.codebook(), blocked()
            codes = (nearest_code if fast else lookup_reference)(z.detach(), codebook.detach(), self.block_elems)   # Eq. (1)
            # F.embedding, not codebook[codes]: indexing's backward (index_put_ accumulate) sums in a thread-dependent
            # order on a multi-core CPU, so 2-thread training was not reproducible; embedding's backward is
            z_q = F.embedding(codes, codebook)                        # (N, d); gradient reaches the chosen rows
            # Eq. (2), L_VQ = ||sg(z) - z_q||^2 + beta ||z - sg(z_q)||^2 (means over all N*d elements)
            losses = {"codebook": F.mse_loss(z_q, z.detach()), "commit": self.beta * F.mse_loss(z, z_q.detach())}
            if self.training and self.entropy_weight > 0:             # entropy loss on softmax(-dist / T)
                if fast:   # -dist = 2 z.c - ||c||^2 - ||z||^2, whose last term cancels in the softmax: as one product
                    z_aug = torch.cat([2 * z, -z.new_ones(z.shape[0], 1)], 1)                # (N, d+1)
                    c_aug = torch.cat([codebook, codebook.pow(2).sum(1, keepdim=True)], 1)   # (K, d+1)
                    _, _, h_sample, h_code = code_softmax(z_aug, c_aug, self.entropy_temperature, False,
                                                          self.block_elems)
                else:
                    h_sample, h_code = entropy_reference(-distances(z, codebook), self.entropy_temperature)
                losses["entropy"] = self.entropy_weight * (h_sample - h_code)
            # Straight-through estimator (Sec. 3.1): value z_q, gradient identity to z.
            z_q = (z + (z_q - z).detach() if self.official_ste       # paper-map: Eq. (1) straight-through
                   else z_q.detach() + (z - z.detach()))
        z_q = z_q.view(b, h, w, d).permute(0, 3, 1, 2)                # (N, d) -> (B, d, h, w)
        return z_q, losses, codes.view(b, h, w)


class IBQuantizer(nn.Module):
    """IBQ with VectorQuantizer's interface: every code row gets gradient through the soft one-hot (ibq_reference).
    Losses (official_code.md §8.2, beta on the codebook term): beta |z_q - sg(z)|^2, |sg(z_q) - z|^2, |z_q^ste - z|^2,
    entropy."""

    def __init__(self, codebook_size, codebook_dim, beta=0.25, entropy_weight=0.05, entropy_temperature=0.01,
                 block_elems=None):
        super().__init__()
        self.codebook_size, self.codebook_dim, self.beta = codebook_size, codebook_dim, beta
        self.entropy_weight, self.entropy_temperature = entropy_weight, entropy_temperature
        self.block_elems = block_elems
        self.embedding = nn.Embedding(codebook_size, codebook_dim)    # IBQ keeps nn.Embedding's N(0, 1) init

    def codebook(self):
        return self.embedding.weight.float()

    def forward(self, z):
        if z.dim() != 4 or z.shape[1] != self.codebook_dim:
            raise ValueError(f"IBQuantizer expects z of shape (B, {self.codebook_dim}, h, w), got {tuple(z.shape)}")
        b, d, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):
            z = z.float().permute(0, 2, 3, 1).reshape(-1, d)          # (B, d, h, w) -> (B*h*w, d)
            codebook, T = self.codebook(), self.entropy_temperature
            if not self.training:                                     # the codes only: no softmax, no entropy
                codes = (max_inner_product if blocked() else lambda z, c, _: (z @ c.t()).argmax(1))(
                    z, codebook, self.block_elems)
                z_q, h_sample, h_code = F.embedding(codes, codebook), None, None
            else:
                codes, z_q, h_sample, h_code = (code_softmax(z, codebook, T, True, self.block_elems) if blocked()
                                                else ibq_reference(z, codebook, T))
            z_hard = F.embedding(codes, codebook)                     # = hard @ C, gradient to the chosen rows only
            losses = {"codebook": self.beta * F.mse_loss(z_hard, z.detach()), "commit": F.mse_loss(z_hard.detach(), z),
                      "double": F.mse_loss(z_q, z)}                   # via the soft one-hot: reaches every row
            if self.training and self.entropy_weight > 0:
                losses["entropy"] = self.entropy_weight * (h_sample - h_code)
        return z_q.view(b, h, w, d).permute(0, 3, 1, 2), losses, codes.view(b, h, w)   # (N, d) -> (B, d, h, w)


@torch.no_grad()
def codebook_usage(codes, codebook_size):
    """Fraction of the K codes used and the perplexity exp(H(counts)) over all DDP ranks (every rank must call it)."""
    counts = torch.bincount(codes.flatten().long(), minlength=codebook_size).float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    p = counts / counts.sum().clamp(min=1)
    entropy = -(p * p.clamp(min=1e-30).log()).sum()                   # 0 log 0 = 0
    return {"usage": (counts > 0).float().mean(), "perplexity": entropy.exp()}


def disentangle_loss(z_qs):
    """Eq. (7): mean over patches of (z_q^a . z_q^b)^2 for l2-normalised sub-codes z_qs (k >= 2 of (B, d, h, w)),
    averaged over all pairs (for k = 3 the official code averages the three). Unweighted: lambda_dis is in losses.py."""
    pairs = [(F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1).pow(2).mean()   # (B, h, w) -> mean
             for a, b in itertools.combinations(z_qs, 2)]
    return torch.stack(pairs).mean()                                  # paper-map: Eq. (7)


if __name__ == "__main__":   # `python quantizer.py --help` says what is here; the file itself is a library
    import argparse
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
