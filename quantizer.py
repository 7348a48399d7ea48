"""Quantizers of FQGAN and IBQ in the papers' forms, one screen each.

FQGAN ("Factorized Visual Tokenization and Generation", arXiv 2411.16681): Sec. 3.1 (Eq. 1, the VQ part of Eq. 2),
Sec. 3.2 (Eq. 5: the tokenizer runs one VectorQuantizer per sub-codebook). IBQ (arXiv 2412.02692): the soft one-hot
that gives every code a gradient. Eq. (7), which compares the sub-codebooks, is in losses.py with its weight.
lookup_reference, entropy_reference and ibq_reference write the equations out on N x K matrices; they are what runs
under torch.compile (inductor fuses them). In eager mode the quantizers call their fast forms in fast.py instead
(blocked, bounded memory, several times faster on a CPU; tested equal): the switch is FAST.
Tests: pytest tests/test_quantizer.py. Speed: python bench.py --only lookup

Glossary (shared by all files): z encoder features, z_q quantized, codes indices, k sub-codebooks,
codebook_size K, codebook_dim d, beta commitment weight, N = number of tokens (B*h*w).
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import fast

FAST = True   # eager mode: fast.py's forms; False: the paper's forms below everywhere (bench.py's memory estimate)


def use_fast():
    """FAST, except under torch.compile: the paper's forms compile without graph breaks, the fast ones do not."""
    return FAST and not torch.compiler.is_compiling()


def distances(z, codebook):
    """||z_i - c_j||^2 for z (N, d), codebook (K, d) -> (N, K), expanded as ||z||^2 + ||c||^2 - 2 z.c."""
    return z.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * z @ codebook.t()   # parity: §1.5, op order


def lookup_reference(z, codebook, _block_elems=None):
    """Eq. (1): codes_i = argmin_j ||z_i - c_j||^2 -> (N,) int64, the first index on ties (fast.nearest_code's
    signature)."""
    return distances(z, codebook).argmin(1)                           # paper-map: Eq. (1)


def entropy_reference(logits, temperature):
    """Entropy loss terms, p_i = softmax(logits_i / T): mean_i H(p_i) (minimised), H(mean_i p_i) (maximised)."""
    p, logp = (logits / temperature).softmax(1), (logits / temperature).log_softmax(1)
    p_mean = p.mean(0)
    return -(p * logp).sum(1).mean(), -(p_mean * (p_mean + 1e-5).log()).sum()


def ibq_reference(z, codebook, temperature=0.01):
    """IBQ -> (codes, z_q, h_sample, h_code): codes = argmax softmax(z C^T); the one-hot hard - sg(soft) + soft has the
    value of hard (so z_q = C[codes]) and the gradient of soft, so every code row learns. The entropy terms on
    softmax(logits / T) keep the code distribution spread (docs/official_code.md §8)."""
    logits = z @ codebook.t()                                         # (N, K), raw inner products
    soft = logits.softmax(1)
    codes = soft.argmax(1)
    hard = F.one_hot(codes, codebook.shape[0]).to(soft)               # (N, K)
    z_q = (hard - soft.detach() + soft) @ codebook                    # paper-map: IBQ
    return codes, z_q, *entropy_reference(logits, temperature)


class VectorQuantizer(nn.Module):
    """FQGAN / LlamaGen vector quantizer (Sec. 3.1, Eq. 1-2), used once per sub-codebook (Eq. 5).
    forward(z (B, d, h, w)) -> (z_q (B, d, h, w), losses {"codebook", "commit"[, "entropy"]}, codes (B, h, w))"""

    def __init__(self, codebook_size, codebook_dim, l2_norm=True, beta=0.25, entropy_weight=0.0,
                 entropy_temperature=0.01, block_elems=None):
        super().__init__()
        self.codebook_size, self.codebook_dim, self.l2_norm, self.beta = codebook_size, codebook_dim, l2_norm, beta
        self.entropy_weight, self.entropy_temperature = entropy_weight, entropy_temperature
        self.block_elems = block_elems                                # fast.py's block size; None: by device
        self.paper_ste = False                                        # the straight-through form, see forward()
        self.embedding = nn.Embedding(codebook_size, codebook_dim)
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)   # parity: §1.5 (re-normed)
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
            codebook, T = self.codebook(), self.entropy_temperature
            # paper-map: Eq. (1)
            codes = (fast.nearest_code if use_fast() else lookup_reference)(z.detach(), codebook.detach(),
                                                                           self.block_elems)
            # F.embedding(codes, C) is C[codes] with a backward that sums each row's gradient in a fixed order
            # (indexing's backward sums in thread order on a multi-core CPU: runs were not reproducible)
            z_q = F.embedding(codes, codebook)                        # (N, d); gradient reaches the chosen rows
            # Eq. (2), L_VQ = ||sg(z) - z_q||^2 + beta ||z - sg(z_q)||^2 (means over all N*d elements)
            losses = {"codebook": F.mse_loss(z_q, z.detach()), "commit": self.beta * F.mse_loss(z, z_q.detach())}
            if self.training and self.entropy_weight > 0:             # entropy loss on p = softmax(-dist / T)
                h_sample, h_code = (fast.distance_entropy(z, codebook, T, self.block_elems) if use_fast() else
                                    entropy_reference(-distances(z, codebook), T))
                losses["entropy"] = self.entropy_weight * (h_sample - h_code)
            # Straight-through estimator (Sec. 3.1): the value of z_q, the gradient of z (identity). The paper's
            # z + sg(z_q - z) equals z_q only up to float rounding; z_q + (z - sg(z)) equals it exactly, so
            # decode_codes(encode(x)) is forward(x) bit for bit. NOTE(paper≠code): ours by default; load_tokenizer
            # sets paper_ste for official checkpoints (# parity: their reconstructions to 1e-4).
            # paper-map: Eq. (1) straight-through
            z_q = z + (z_q - z).detach() if self.paper_ste else z_q.detach() + (z - z.detach())
        z_q = z_q.view(b, h, w, d).permute(0, 3, 1, 2)                # (N, d) -> (B, d, h, w)
        return z_q, losses, codes.view(b, h, w)


class IBQuantizer(nn.Module):
    """IBQ with VectorQuantizer's interface: every code row gets gradient through the soft one-hot (ibq_reference).
    Losses (beta on the codebook term; docs/official_code.md §8.2): beta |z_q - sg(z)|^2, |sg(z_q) - z|^2,
    |z_q^ste - z|^2, entropy. In eval mode the codes are the argmax of the logits, with no softmax."""

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
            if self.training:                                         # the soft one-hot and the entropy terms
                codes, z_q, h_sample, h_code = (fast.code_softmax(z, codebook, T, True, self.block_elems) if use_fast()
                                                else ibq_reference(z, codebook, T))
            else:                                                     # the codes only: argmax of the logits
                codes = (fast.max_inner_product(z, codebook, self.block_elems) if use_fast()
                         else (z @ codebook.t()).argmax(1))
                z_q = F.embedding(codes, codebook)
            z_hard = F.embedding(codes, codebook)                     # = hard @ C, gradient to the chosen rows only
            losses = {"codebook": self.beta * F.mse_loss(z_hard, z.detach()), "commit": F.mse_loss(z_hard.detach(), z),
                      "double": F.mse_loss(z_q, z)}                   # via the soft one-hot: reaches every row
            if self.training and self.entropy_weight > 0:
                losses["entropy"] = self.entropy_weight * (h_sample - h_code)
        return z_q.view(b, h, w, d).permute(0, 3, 1, 2), losses, codes.view(b, h, w)   # (N, d) -> (B, d, h, w)


@torch.no_grad()
def codebook_usage(codes, codebook_size):
    """Fraction of the K codes used, the perplexity exp(H(counts)) and the tokens counted, over all DDP ranks (every
    rank must call it)."""
    return usage_of_counts(torch.bincount(codes.flatten().long(), minlength=codebook_size).float())


@torch.no_grad()
def usage_of_counts(counts):
    """codebook_usage of a histogram (K,) of codes, summed over all DDP ranks first (every rank must call it).
    Usage counts the codes seen at least once: over T tokens it cannot exceed T / K (report T beside it)."""
    counts = counts.float().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    p = counts / counts.sum().clamp(min=1)
    entropy = -(p * p.clamp(min=1e-30).log()).sum()                   # 0 log 0 = 0
    return {"usage": (counts > 0).float().mean(), "perplexity": entropy.exp(), "tokens": counts.sum()}


if __name__ == "__main__":   # `python quantizer.py --help` says what is here; the file itself is a library
    import argparse
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
