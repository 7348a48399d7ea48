"""Quantizers of FQGAN and IBQ, one screen each, plus the disentanglement regularizer.

Papers
  FQGAN: "Factorized Visual Tokenization and Generation", Bai et al., arXiv 2411.16681
         Sec. 3.1 (Eq. 1, the VQ part of Eq. 2), Sec. 3.2 (Eq. 5, one quantizer per sub-codebook),
         Sec. 3.2.1 (Eq. 7, disentanglement).
  IBQ:   "Taming Scalable Visual Tokenizer for Autoregressive Image Generation", arXiv 2412.02692
         (index backpropagation quantization; `../shared/reference/ibq_lfq_spec.md`).

What is here
  nearest_code()       Eq. (1): exact argmin over the codebook in bounded chunks (never the N x K matrix).
  code_softmax()       softmax over all K codes in chunks, with a hand-written backward: the IBQ straight-through
                       one-hot and the entropy loss (per-sample entropy minus codebook entropy).
  VectorQuantizer      FQGAN's quantizer: l2-normalised codes, straight-through estimator, codebook + commitment
                       loss (beta = 0.25), optional entropy loss.
  IBQuantizer          IBQ: logits z.C^T, straight-through on the soft one-hot so every code row gets gradient.
  codebook_usage()     fraction of codes used and perplexity, summed over all DDP ranks.
  disentangle_loss()   Eq. (7).

Glossary (shared by all files): z encoder features, z_q quantized, codes indices, k sub-codebooks,
codebook_size K, codebook_dim d, beta commitment weight, N = number of tokens (B*h*w).

Run the tests: python -m pytest tests/test_quantizer.py -q
"""
import itertools

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# Elements of one block of distances for the lookup: 2^20 fp32 = 4 MiB, about the L2 caches of this 2-core CPU
# (1 MiB blocks were slower: more calls, and MKL's kernels are slow on very thin GEMMs). It bounds the extra memory
# of nearest_code independently of N and K.
CHUNK_ELEMS = 2**20
# Codes per group in nearest_code's two-level argmin (a vectorised min over groups, then an argmin inside one).
GROUP = 64
# Elements of one (rows x K) block of logits for the softmax paths (IBQ, entropy loss). These do ~2d flops per
# element, so blocks must be tall enough for an efficient GEMM (128 rows at K = 2^18): 2^25 fp32 = 128 MiB.
SOFTMAX_CHUNK_ELEMS = 2**25


def _row_blocks(n_rows, n_codes, chunk_elems):
    """Row slices such that every (rows x n_codes) block holds at most chunk_elems elements (at least one row)."""
    rows = max(1, chunk_elems // n_codes)
    return [slice(s, min(s + rows, n_rows)) for s in range(0, n_rows, rows)]


@torch.no_grad()
def nearest_code(z, codebook, chunk_elems=CHUNK_ELEMS):
    """Eq. (1): codes_i = argmin_j ||z_i - c_j||^2 for z (N, d), codebook (K, d) -> (N,) int64, first index on ties.

    The distance is the official formula, (||c||^2 + ||z||^2) - 2 c.z (add first, then one addmm: -2 is a power of
    two, so this rounds like the official "sum + sum - 2 * einsum"), evaluated block by block: a (codes x tokens)
    block of at most chunk_elems floats is the only large temporary, whatever N and K are. Two things make it fast:
    the block is laid out codes-major (c @ z^T; MKL is ~1.5x faster on this shape than z @ c^T at d = 8), and the
    argmin is two-level, because torch's argmin is not vectorised (~15x slower than amin): the minimum of every group
    of GROUP codes (vectorised), the first group holding the overall minimum, then the argmin inside that group.
    The first minimum of the first minimal group is the first minimal index, so ties resolve exactly like argmin.
    NOTE: fp32 distances depend on the GEMM kernel MKL picks for a shape, so near-ties (< ~1e-6 apart) can resolve
    differently for different batch sizes or thread counts, in the official code as here.
    """
    n, k = z.shape[0], codebook.shape[0]
    z_sq = z.pow(2).sum(1)[None]                                  # (1, N)
    c_sq = codebook.pow(2).sum(1, keepdim=True)                   # (K, 1)
    z_t = z.t().contiguous()                                      # (d, N)
    cols = min(-(-k // GROUP), max(1, chunk_elems // GROUP)) * GROUP   # codes per block, whole groups
    rows = max(1, chunk_elems // cols)                            # tokens per block
    block = z.new_empty(cols * rows)
    codes = torch.empty(n, dtype=torch.long, device=z.device)
    best = z.new_empty(n)                                         # distance of codes[i], when K spans several blocks
    for c0 in range(0, k, cols):
        c_blk, c_sq_blk = codebook[c0:c0 + cols], c_sq[c0:c0 + cols]
        if c_blk.shape[0] < cols:                                 # pad the last block to whole groups with codes
            pad = -c_blk.shape[0] % GROUP                         # at distance +inf: never chosen
            c_blk = torch.cat([c_blk, c_blk.new_zeros(pad, c_blk.shape[1])])
            c_sq_blk = torch.cat([c_sq_blk, c_sq_blk.new_full((pad, 1), float("inf"))])
        kb = c_blk.shape[0]
        for r0 in range(0, n, rows):
            r = min(rows, n - r0)
            dist_ = torch.add(c_sq_blk, z_sq[:, r0:r0 + r], out=block[:kb * r].view(kb, r))   # (kb, r)
            dist_.addmm_(c_blk, z_t[:, r0:r0 + r], alpha=-2)
            groups = dist_.view(kb // GROUP, GROUP, r)            # (kb, r) -> (kb / GROUP, GROUP, r)
            d_min, g = groups.amin(1).min(0)                      # (r,) block minimum and its first group
            inner = groups[g, :, torch.arange(r, device=z.device)].argmin(1)   # (r, GROUP) -> (r,)
            idx = c0 + g * GROUP + inner
            if c0 == 0:
                codes[r0:r0 + r], best[r0:r0 + r] = idx, d_min
            else:                                                 # strictly better only: earlier blocks win ties
                better = d_min < best[r0:r0 + r]
                codes[r0:r0 + r] = torch.where(better, idx, codes[r0:r0 + r])
                best[r0:r0 + r] = torch.where(better, d_min, best[r0:r0 + r])
    return codes


class _CodeSoftmax(torch.autograd.Function):
    """Everything that needs softmax over all K codes, computed in row blocks of the logits A = z C^T (N, K).

    forward returns
      codes    argmax_j A_ij                                   (N,)
      z_q      onehot_ste(A) @ C, value C[codes]               (N, d)   IBQ's straight-through lookup
      h_sample mean_i H(softmax(A_i / T))                      ()       per-sample entropy (to minimise)
      h_code   H(mean_i softmax(A_i / T))                      ()       codebook entropy (to maximise)
    The backward recomputes each block of A instead of storing it, so memory is O(chunk + K d), never O(N K).
    Gradients are those of the unchunked formulas (tests/test_quantizer.py checks it against autograd):
      z_q:      onehot = hard - sg(soft) + soft  =>  dA = soft * (G - <soft, G>),  G = g_zq C^T,  dC += hard^T g_zq
      h_sample: dH_i/dA_i = -p * (log p + H_i) / T
      h_code:   dH/dA_i = p * (u - <p, u>) / (N T),  u = dH/dpbar = -log(pbar + eps) - pbar / (pbar + eps)
    """

    @staticmethod
    def forward(ctx, z, codebook, temperature, chunk_elems):
        n, k = z.shape[0], codebook.shape[0]
        codes = torch.empty(n, dtype=torch.long, device=z.device)
        h_sum = z.new_zeros(())
        p_sum = z.new_zeros(k)
        for rows in _row_blocks(n, k, chunk_elems):
            logits = z[rows] @ codebook.t()                           # (rows, K)
            codes[rows] = logits.argmax(1)
            logp = (logits / temperature).log_softmax(1)
            p = logp.exp()
            h_sum -= (p * logp).sum()
            p_sum += p.sum(0)
        p_mean = p_sum / n                                            # (K,) batch-average code distribution
        h_code = -(p_mean * (p_mean + 1e-5).log()).sum()             # the +1e-5 is the official one
        ctx.save_for_backward(z, codebook, codes, p_mean)
        ctx.temperature, ctx.chunk_elems = temperature, chunk_elems
        ctx.mark_non_differentiable(codes)
        return codes, codebook[codes], h_sum / n, h_code

    @staticmethod
    def backward(ctx, _g_codes, g_zq, g_hs, g_hc):
        z, codebook, codes, p_mean = ctx.saved_tensors
        t, n = ctx.temperature, z.shape[0]
        g_z, g_c = torch.zeros_like(z), torch.zeros_like(codebook)
        u = -(p_mean + 1e-5).log() - p_mean / (p_mean + 1e-5)         # (K,) dH_code / dp_mean
        for rows in _row_blocks(n, codebook.shape[0], ctx.chunk_elems):
            logits = z[rows] @ codebook.t()                           # (rows, K), recomputed
            # entropy terms, through softmax(logits / T)
            logp = (logits / t).log_softmax(1)
            p = logp.exp()
            h_i = -(p * logp).sum(1, keepdim=True)                    # (rows, 1)
            g_logits = (g_hs / (n * t)) * (-p * (logp + h_i))
            g_logits += (g_hc / (n * t)) * p * (u - (p * u).sum(1, keepdim=True))
            # straight-through one-hot, through softmax(logits) at temperature 1
            soft = logits.softmax(1)
            g_onehot = g_zq[rows] @ codebook.t()                      # (rows, K) dL/d(one-hot)
            g_logits += soft * (g_onehot - (soft * g_onehot).sum(1, keepdim=True))
            g_z[rows] = g_logits @ codebook                           # logits = z C^T
            g_c += g_logits.t() @ z[rows]
        g_c.index_add_(0, codes, g_zq)                                # the one-hot's value is hard: dC += hard^T g
        return g_z, g_c, None, None


def code_softmax(z, codebook, temperature=0.01, chunk_elems=SOFTMAX_CHUNK_ELEMS):
    """(codes, z_q, h_sample, h_code) for z (N, d) and codebook (K, d); see _CodeSoftmax. At least fp32."""
    dtype = torch.promote_types(z.dtype, torch.float32)             # bf16 -> fp32; fp64 stays (tests)
    return _CodeSoftmax.apply(z.to(dtype), codebook.to(dtype), temperature, chunk_elems)


class VectorQuantizer(nn.Module):
    """FQGAN / LlamaGen vector quantizer (Sec. 3.1, Eq. 1-2), used once per sub-codebook (Eq. 5).

    forward(z (B, d, h, w)) -> (z_q (B, d, h, w), losses {"codebook", "commit"[, "entropy"]}, codes (B, h, w))
    """

    def __init__(self, codebook_size, codebook_dim, l2_norm=True, beta=0.25, entropy_weight=0.0,
                 entropy_temperature=0.01, chunk_elems=CHUNK_ELEMS):
        super().__init__()
        self.codebook_size, self.codebook_dim = codebook_size, codebook_dim
        self.l2_norm, self.beta = l2_norm, beta
        self.entropy_weight, self.entropy_temperature = entropy_weight, entropy_temperature
        self.chunk_elems = chunk_elems
        # The official straight-through sum z + sg(z_q - z) differs from the codebook row z_q by float rounding
        # (~3e-8). Ours, z_q + (z - sg(z)), has the same gradient and is exactly z_q, so decode_codes(encode(x))
        # equals forward(x) bit for bit. load_tokenizer() turns this on for official checkpoints (parity tests).
        self.official_ste = False
        self.embedding = nn.Embedding(codebook_size, codebook_dim)
        # Official init: uniform(-1/K, 1/K), rows then l2-normalised. The stored rows are raw weights; they are
        # re-normalised on every use, so they need not stay unit-norm during training.
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
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
            codebook = self.codebook()
            codes = nearest_code(z.detach(), codebook.detach(), self.chunk_elems)   # Eq. (1)
            z_q = codebook[codes]                                     # (N, d); gradient reaches the chosen rows
            # Eq. (2), L_VQ = ||sg(z) - z_q||^2 + beta ||z - sg(z_q)||^2 (means over all N*d elements)
            losses = {"codebook": F.mse_loss(z_q, z.detach()),
                      "commit": self.beta * F.mse_loss(z, z_q.detach())}
            if self.training and self.entropy_weight > 0:
                # Entropy loss on softmax(-dist / T). -dist = 2 z.c - ||c||^2 - ||z||^2; the last term is constant
                # per row and cancels in the softmax, so append a column: [2z, -1] . [c, ||c||^2] = -dist + ||z||^2.
                z_aug = torch.cat([2 * z, -z.new_ones(z.shape[0], 1)], 1)           # (N, d+1)
                c_aug = torch.cat([codebook, codebook.pow(2).sum(1, keepdim=True)], 1)   # (K, d+1)
                _, _, h_sample, h_code = code_softmax(z_aug, c_aug, self.entropy_temperature)
                losses["entropy"] = self.entropy_weight * (h_sample - h_code)
            # Straight-through estimator (Sec. 3.1): value z_q, gradient identity to z.
            z_q = z + (z_q - z).detach() if self.official_ste else z_q.detach() + (z - z.detach())
        z_q = z_q.view(b, h, w, d).permute(0, 3, 1, 2)                # (N, d) -> (B, d, h, w)
        return z_q, losses, codes.view(b, h, w)


class IBQuantizer(nn.Module):
    """Index Backpropagation Quantization (IBQ, arXiv 2412.02692), same interface as VectorQuantizer.

    logits = z C^T (no normalisation), soft = softmax(logits), hard = one_hot(argmax), and the straight-through
    trick on the one-hot, one_hot = hard - sg(soft) + soft, z_q = one_hot C: every one of the K rows gets gradient
    through the softmax, which is what lets a 2^18 x 256 codebook train with high usage. The N x K softmax is never
    stored: code_softmax() works in row blocks with its own backward.
    losses: {"codebook": beta ||z_q - sg(z)||^2, "commit": ||sg(z_q) - z||^2, "double": ||z_q^ste - z||^2
    [, "entropy"]} (ibq_lfq_spec.md §1.2: beta sits on the codebook term there, the "legacy" VQGAN arrangement).
    """

    def __init__(self, codebook_size, codebook_dim, beta=0.25, entropy_weight=0.05, entropy_temperature=0.01,
                 chunk_elems=SOFTMAX_CHUNK_ELEMS):
        super().__init__()
        self.codebook_size, self.codebook_dim = codebook_size, codebook_dim
        self.beta, self.entropy_weight, self.entropy_temperature = beta, entropy_weight, entropy_temperature
        self.chunk_elems = chunk_elems
        self.embedding = nn.Embedding(codebook_size, codebook_dim)    # IBQ keeps nn.Embedding's N(0, 1) init

    def codebook(self):
        return self.embedding.weight.float()

    def forward(self, z):
        if z.dim() != 4 or z.shape[1] != self.codebook_dim:
            raise ValueError(f"IBQuantizer expects z of shape (B, {self.codebook_dim}, h, w), got {tuple(z.shape)}")
        b, d, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):
            z = z.float().permute(0, 2, 3, 1).reshape(-1, d)          # (B, d, h, w) -> (B*h*w, d)
            codebook = self.codebook()
            codes, z_q, h_sample, h_code = code_softmax(z, codebook, self.entropy_temperature, self.chunk_elems)
            z_hard = codebook[codes]                                  # = hard @ C, gradient to the chosen rows only
            losses = {"codebook": self.beta * F.mse_loss(z_hard, z.detach()),
                      "commit": F.mse_loss(z_hard.detach(), z),
                      "double": F.mse_loss(z_q, z)}                   # through the soft one-hot: reaches every row
            if self.entropy_weight > 0:
                losses["entropy"] = self.entropy_weight * (h_sample - h_code)
        z_q = z_q.view(b, h, w, d).permute(0, 3, 1, 2)                # (N, d) -> (B, d, h, w)
        return z_q, losses, codes.view(b, h, w)


@torch.no_grad()
def codebook_usage(codes, codebook_size):
    """Fraction of the K codes used at least once, and the perplexity exp(H(counts)), over all DDP ranks.

    codes: int tensor of any shape. Under torch.distributed every rank must call this (it all-reduces counts).
    """
    counts = torch.bincount(codes.flatten().long(), minlength=codebook_size).float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    p = counts / counts.sum().clamp(min=1)
    entropy = -(p * p.clamp(min=1e-30).log()).sum()                   # 0 log 0 = 0
    return {"usage": (counts > 0).float().mean(), "perplexity": entropy.exp()}


def disentangle_loss(z_qs):
    """Eq. (7): mean over patches of (z_q^a . z_q^b)^2 for l2-normalised sub-codes, averaged over all pairs.

    z_qs: list of k >= 2 tensors (B, d, h, w). For k = 2 this is Eq. (7) exactly; for k = 3 the official code
    averages the three pairs. Unweighted here: lambda_dis = 0.1 is applied in losses.py (Eq. 8).
    """
    pairs = [(F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1).pow(2).mean()   # (B, h, w) -> mean
             for a, b in itertools.combinations(z_qs, 2)]
    return torch.stack(pairs).mean()
