"""FAR: the Factorized Auto-Regressive generator of FQGAN, one file.

Paper: "Factorized Visual Tokenization and Generation", Bai et al., arXiv 2411.16681.
  Sec. 3.3  factorized AR model: k sub-code embeddings aggregated by one linear layer (Sec. 4 setup), a
            Llama-style class-conditional backbone giving h_t, and a factorized AR head
            p(q_t^1..q_t^k | h_t) = prod_i p(q_t^i | h_t, q_t^1..q_t^{i-1}); CFG on every sub-code's logits.
  Tab. 2    the FAR-Base / FAR-Large configurations (PRESETS "far-b", "far-l").
  Tab. 4    the two baseline heads: k independent linear classifiers, and MLP classifiers, on h_t.

What is here
  FARConfig, PRESETS     model shape; sizes derived from it (grid, codebook_size, num_classes), never hard-coded.
  FAR                    forward(codes (B, k, h, w), labels (B,)) -> logits (B, k, h*w, codebook_size), fp32;
                         head_logits, the factorized AR head at one position, serves training and sampling.
  far_loss               mean cross-entropy over the k sub-codes, a dict for logging.
  generate               class-conditional sampling, CFG, temperature, top-k / top-p. use_cache=False is the
                         paper's form (each token recomputes the prefix); use_cache=True (default) runs the same
                         loop with static KV caches, optionally compiled: fast.decode, tested to give the same codes.
Loading our and the official checkpoints is checkpoints.load_far. Codes are (B, k, h, w) int64 with sub-code 1 = the
tokenizer's visual branch first (Dual: vis, sem; Triple: vis, sem_mid, sem_high), the layout decode_codes takes.
A `# parity: §n` tag marks a line that follows the released code so that its checkpoints load and give the same
logits; docs/official_code.md §n says what it does (tests/test_checkpoints.py checks the logits).
Parameter counts: `python far.py`. Tests: `python -m pytest tests/test_far.py tests/test_far_cache.py -q`.
Sampling speed: `python bench.py --only far`.
"""
import argparse
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import fast


@dataclass
class FARConfig:
    dim: int = 1024                 # backbone and head width
    n_layer: int = 24               # backbone blocks
    n_head: int = 16                # head_dim = dim // n_head (64 in every paper config)
    ar_head_layers: int = 3         # blocks of the factorized AR head (Sec. 3.3); unused by the Tab. 4 baselines
    head: str = "ar"                # "ar" (Sec. 3.3) | "linear" | "mlp" (Tab. 4 baselines)
    num_codebooks: int = 2          # k sub-codes per position (2 = Dual, 3 = Triple)
    codebook_size: int = 16384      # entries per sub-codebook
    grid: tuple = (16, 16)          # (h, w) token grid = image_size // downsample
    num_classes: int = 1000         # class id num_classes is the null (unconditional) class for CFG
    multiple_of: int = 256          # SwiGLU hidden rounding (Llama)
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    token_dropout: float = 0.1      # on the whole backbone input, class token included (# parity: §5.4)
    resid_dropout: float = 0.1      # after attention's output projection
    ffn_dropout: float = 0.1        # after the SwiGLU down projection
    attn_dropout: float = 0.0
    class_dropout_prob: float = 0.1  # label -> null class, for classifier-free guidance (Sec. 3.3)
    init_std: float = 0.02

    def __post_init__(self):
        self.grid = tuple(self.grid)  # a config read back from JSON has a list here
        assert self.head in ("ar", "linear", "mlp"), f"head must be ar | linear | mlp, got {self.head!r}"
        assert self.dim % self.n_head == 0, f"dim {self.dim} not divisible by n_head {self.n_head}"
        # 2-D RoPE splits each head's dim/2 rotation pairs into a row half and a column half.
        assert (self.dim // self.n_head) % 4 == 0, f"head_dim {self.dim // self.n_head} must be a multiple of 4"


# Keyword arguments for FARConfig; k, codebook_size, grid, num_classes are overridden by the data, e.g.
# FARConfig(**{**PRESETS["far-b"], "num_codebooks": 3}). Totals: far-b 417,104,896 (k=2) / 451,707,904 (k=3); far-l
# 901,195,520 / 944,776,960 (# parity: the released models' exactly). The recipes are train_far.RECIPES.
# NOTE(paper≠code): Tab. 2 reports 415M / 898M: exactly these totals minus the aggregation layer.
# paper-map: Tab. 2
PRESETS = {
    # Tab. 2, FAR-Base: the backbone is LlamaGen GPT-L (24 x 1024), 3 full-width head blocks.
    "far-b": dict(dim=1024, n_layer=24, n_head=16, ar_head_layers=3),
    # Tab. 2, FAR-Large: the backbone is LlamaGen GPT-XL (36 x 1280), 4 head blocks.
    "far-l": dict(dim=1280, n_layer=36, n_head=20, ar_head_layers=4),
    # CPU-sized (1.6M params): the 16x16 codes of the tiny tokenizer (k = 2 x 512) and the 11 bundled photo classes;
    # trains in minutes on 2 cores (train_far.py takes k, codebook_size, grid and num_classes from the data anyway).
    "tiny": dict(dim=128, n_layer=4, n_head=2, ar_head_layers=2, codebook_size=512, grid=(16, 16),
                 num_classes=11, multiple_of=64),
}


# ----------------------------------------------------------------------------------------------------------------
# Llama-style building blocks (the backbone and the AR head share them; # parity: names and op order, §5.2)

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32, cast back to x's dtype, *then* scale (matters in bf16; # parity: §5.2)
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_2d(grid, head_dim, base):
    """2-D rotary table (1 + h*w, head_dim/2, 2) of (cos, sin), fp32, for [class token, raster grid]
    (# parity: §5.3).

    Pair p of a head rotates by row*w_p for p < head_dim/4 and by col*w_p after, w_p = base^(-2p / (head_dim/2)).
    NOTE(paper≠code): row 0 (class slot) is all zeros, not the identity, so the class token's q and k are
    multiplied by 0: its key scores exactly 0 against every query. An inherited LlamaGen quirk that we keep
    because the official checkpoints were trained with it.
    """
    h, w = grid
    half = head_dim // 2
    freqs = 1.0 / base ** (torch.arange(0, half, 2)[: half // 2].float() / half)  # (half/2,)
    rows = torch.outer(torch.arange(h), freqs)[:, None].expand(h, w, -1)  # (h, w, half/2): row angles
    cols = torch.outer(torch.arange(w), freqs)[None].expand(h, w, -1)     # (h, w, half/2): column angles
    angles = torch.cat([rows, cols], -1).flatten(0, 1)                     # (h, w, half) -> (h*w, half)
    table = torch.stack([angles.cos(), angles.sin()], -1)                  # (h*w, half, 2)
    return torch.cat([torch.zeros(1, half, 2), table])                     # (1 + h*w, half, 2)


def apply_rope(x, rope):
    """Rotate adjacent pairs (2i, 2i+1) of x (B, S, H, D) by rope (S, D/2, 2), in fp32, cast back."""
    xp = x.float().unflatten(-1, (-1, 2))      # (B, S, H, D) -> (B, S, H, D/2, 2)
    cos, sin = rope[None, :, None, :, 0], rope[None, :, None, :, 1]  # (1, S, 1, D/2)
    a, b = xp[..., 0], xp[..., 1]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(3).type_as(x)  # -> (B, S, H, D)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.attn_dropout = cfg.n_head, cfg.attn_dropout
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)  # fused q | k | v, no biases anywhere
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.resid_dropout = nn.Dropout(cfg.resid_dropout)

    def forward(self, x, rope, cache=None, pos=None):
        """x (B, S, dim) at sequence slots pos (S,) int64, whose rotary rows are rope (S, D/2, 2).

        cache=None: causal self-attention among the S slots (training, full recompute).
        cache=(k_cache, v_cache), each (B, H, slots, D), preallocated by fast.decode: this step's keys and values
        are written at slots pos, and each query attends to every slot <= its own (a mask hides the rest)."""
        B, S, C = x.shape
        q, k, v = self.wqkv(x).view(B, S, 3, self.n_head, C // self.n_head).unbind(2)  # 3 x (B, S, H, D)
        q, k = apply_rope(q, rope), apply_rope(k, rope)                                # v is not rotated
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                               # (B, S, H, D) -> (B, H, S, D)
        if cache is None:
            with fast.sdpa_backend(q):                                                 # short sequences: math kernel
                y = F.scaled_dot_product_attention(q, k, v, is_causal=S > 1,
                                                   dropout_p=self.attn_dropout if self.training else 0.0)
        else:
            # written at a position *tensor*: the same shapes at every step, so a compiled step is traced once
            k_cache, v_cache = cache
            k_cache[:, :, pos], v_cache[:, :, pos] = k, v
            mask = pos[:, None] >= torch.arange(k_cache.shape[2], device=x.device)    # (S, slots), True = visible
            y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)   # eval only: no dropout
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, S, C)))  # (B, H, S, D) -> (B, S, dim)


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        # Llama SwiGLU width: 2/3 of 4*dim, rounded up to multiple_of (1024 -> 2816, 1280 -> 3584).
        hidden = -(-int(2 * 4 * cfg.dim / 3) // cfg.multiple_of) * cfg.multiple_of
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)  # down
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    """Pre-norm block: x + Attn(norm(x)), then + FFN(norm(.)). Attribute names are the official ones."""

    def __init__(self, cfg):
        super().__init__()
        self.attention, self.feed_forward = Attention(cfg), FeedForward(cfg)
        self.attention_norm, self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps), RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, rope, cache=None, pos=None):
        x = x + self.attention(self.attention_norm(x), rope, cache, pos)
        return x + self.feed_forward(self.ffn_norm(x))


class ClassEmbedding(nn.Module):
    """Class label -> one prefix token (not AdaLN). Row num_classes is the null class used for CFG."""

    def __init__(self, cfg):
        super().__init__()
        self.num_classes, self.p = cfg.num_classes, cfg.class_dropout_prob
        # NOTE(paper≠code): the official table has the null row only when class_dropout_prob > 0; we always
        # add it so that guided sampling works for any config (same shape for every official checkpoint).
        self.embedding_table = nn.Embedding(cfg.num_classes + 1, cfg.dim)

    def forward(self, labels):
        if self.training and self.p > 0:  # Sec. 3.3: drop labels independently so the model also learns p(x)
            drop = torch.rand(labels.shape, device=labels.device) < self.p
            # paper-map: CFG
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)  # (B,) -> (B, dim)


# ----------------------------------------------------------------------------------------------------------------
# The model

class FAR(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg, k, V = cfg, cfg.num_codebooks, cfg.codebook_size
        self.cls_embedding = ClassEmbedding(cfg)
        # Sec. 3.3 / Sec. 4 input side: one table per sub-code, concatenated, mapped back by one Linear (with bias).
        self.tok_embeddings = nn.ModuleList(nn.Embedding(V, cfg.dim) for _ in range(k))
        self.aggregation_layer = nn.Linear(k * cfg.dim, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        if cfg.head == "ar":  # Sec. 3.3: full-width blocks, same dropouts, shared across positions
            self.ar_head = nn.ModuleList(Block(cfg) for _ in range(cfg.ar_head_layers))
        if cfg.head == "mlp":  # Tab. 4 "MLP classifiers": Linear -> GELU in front of each classifier
            # NOTE(paper≠code): the paper gives no MLP sizes (and no released code has this head); we use one
            # dim-wide hidden layer, i.e. each classifier becomes a 2-layer MLP.
            # paper-map: Tab. 4 heads
            self.mlp_head = nn.ModuleList(nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.GELU()) for _ in range(k))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)  # one final norm shared by all sub-codes (# parity: §5.5)
        self.output = nn.ModuleList(nn.Linear(cfg.dim, V, bias=False) for _ in range(k))  # untied from inputs
        self._rope = None  # plain attribute, not a buffer: stays fp32 under .to(bf16), absent from state_dict
        self.apply(self._init_weights)
        for out in self.output:  # zero classifiers: every sub-code starts at the uniform distribution
            nn.init.zeros_(out.weight)

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.cfg.init_std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def rope(self, device):
        """The (1 + h*w, head_dim/2, 2) rotary table, built once per device (on the CPU in fp32, # parity: §5.3)."""
        if self._rope is None or self._rope.device != device:
            self._rope = rope_2d(self.cfg.grid, self.cfg.dim // self.cfg.n_head, self.cfg.rope_base).to(device)
        return self._rope

    def run_blocks(self, blocks, x, pos=None, caches=None):
        """Run x (B, S, dim) through blocks. pos (S,) int64 = the sequence slots of x: its rotary rows and, with
        caches (one static (k_cache, v_cache) pair per block, fast.decode), where its keys and values are written.
        pos=None: slots 0..S-1, no cache (training and the paper's sampling form)."""
        rope = self.rope(x.device)
        rope = rope[:x.shape[1]] if pos is None else rope[pos]  # (S, D/2, 2): a gather, so compiled once for all pos
        for block, cache in zip(blocks, caches or [None] * len(blocks)):
            x = block(x, rope, cache, pos)
        return x

    # paper-map: FAR input
    def embed(self, codes):
        """Sec. 3.3 input aggregation: codes (B, k, S) -> W [E_1(c_1); ...; E_k(c_k)] + b, (B, S, dim)."""
        e = torch.cat([emb(codes[:, j]) for j, emb in enumerate(self.tok_embeddings)], -1)  # (B, S, k*dim)
        return self.aggregation_layer(e)

    def classify(self, z, j):
        """Logits of sub-code j (0-based) from normed features z (N, dim)."""
        return self.output[j](self.mlp_head[j](z) if self.cfg.head == "mlp" else z)

    # paper-map: Factorized AR head
    def head_logits(self, h, prev):
        """Sec. 3.3, the factorized AR head at one position: h (N, dim) = h_t, prev (N, j) = the sub-codes before ->
        logits (N, 1 + j, V); slot i is p(q^i | h_t, q^1..q^{i-1}). The head is a causal transformer over
        [h_t, E_1(q^1), ..., E_j(q^j)]: the input tables without the aggregation layer, so slot i sees exactly what
        precedes it. Tab. 4 baselines: each classifier reads the normed h_t alone, blind to the other sub-codes."""
        if self.cfg.head == "ar":
            embs = [self.tok_embeddings[i](prev[:, i]) for i in range(prev.shape[1])]   # j x (N, dim)
            x = torch.stack([h] + embs, 1)                            # (N, 1 + j, dim)
            # NOTE(paper≠code): the head takes rotary rows 0..j of the backbone table, so slot 0 (h_t) gets the class
            # token's zero row and slot 2 grid cell (0, 1). # parity: §5.5
            z = self.norm(self.run_blocks(self.ar_head, x))          # (N, 1 + j, dim)
        else:
            z = self.norm(h)[:, None].expand(-1, prev.shape[1] + 1, -1)
        return torch.stack([self.classify(z[:, i], i) for i in range(z.shape[1])], 1)   # (N, 1 + j, V)

    def forward(self, codes, labels):
        """Teacher-forced logits. codes (B, k, h, w) int64, labels (B,) -> logits (B, k, h*w, codebook_size) fp32.

        logits[:, j, t] is p(code_j at raster position t | class, all codes before t, codes 1..j-1 at t)."""
        B, k, h, w = codes.shape
        assert (k, (h, w)) == (self.cfg.num_codebooks, self.cfg.grid), \
            f"codes {tuple(codes.shape)} do not match k={self.cfg.num_codebooks}, grid={self.cfg.grid}"
        codes = codes.flatten(2)                                       # (B, k, h, w) -> (B, k, L)
        L = h * w
        # Backbone input [cls, e_0, ..., e_{L-2}]: slot t predicts position t; the last token is never fed.
        x = torch.cat([self.cls_embedding(labels)[:, None], self.embed(codes[:, :, :-1])], 1)  # (B, L, dim)
        hid = self.run_blocks(self.layers, self.tok_dropout(x)).reshape(B * L, -1)   # h_t: (B, L, dim) -> (B*L, dim)
        # the head at every position at once, teacher-forced with the true sub-codes 1..k-1 of that position
        prev = codes[:, :k - 1].transpose(1, 2).reshape(B * L, k - 1)  # (B, k-1, L) -> (B*L, k-1)
        logits = self.head_logits(hid, prev)                          # (B*L, k, V)
        return logits.view(B, L, k, -1).transpose(1, 2).float()       # -> (B, k, L, V)


def far_loss(logits, codes):
    """Sec. 3.3: the mean over sub-codes of the token-averaged cross-entropy. logits (B, k, L, V), codes (B, k, h, w).

    Returns {"loss": mean, "ce/0": ..., "ce/{k-1}": ...} (tensors; the training loop logs them)."""
    B, k, L, V = logits.shape
    ce = [F.cross_entropy(logits[:, j].reshape(B * L, V), codes[:, j].reshape(B * L)) for j in range(k)]
    return {"loss": torch.stack(ce).mean(), **{f"ce/{j}": c.detach() for j, c in enumerate(ce)}}


# ----------------------------------------------------------------------------------------------------------------
# Sampling

def filter_logits(logits, top_k=0, top_p=1.0):
    """Set logits outside the top_k / the top_p nucleus to -inf (N, V). At least one token always survives."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]  # (N, 1) k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        drop = sorted_logits.softmax(-1).cumsum(-1) > top_p
        drop[:, 1:] = drop[:, :-1].clone()   # shift right: keep the token that crosses top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))  # back to vocabulary order
    return logits


@torch.no_grad()
def generate(model, labels, cfg_scale=2.0, temperature=1.0, top_k=0, top_p=1.0, generator=None, use_cache=True,
             compile=False):
    """Sample codes (B, k, h, w) int64 for class labels (B,): raster order, sub-codes 1..k at each position (Sec. 3.3).

    cfg_scale s: guidance l = l_u + s (l_c - l_u) on every sub-code's logits (the null class gives l_u); s == 1 runs
    the conditional batch only. Random numbers come from `generator` only: one multinomial per sub-code.
    use_cache=False is the paper's form below: every position reruns the backbone over the whole prefix and the AR
    head over the sub-codes sampled so far. use_cache=True (fast.decode) runs one token per position through static
    KV caches; compile=True also compiles that step, compile="frozen" with the weights folded in (faster on a CPU;
    for a model that is not trained further: fast.compiled). Same draws, same codes (tests/test_far_cache.py)."""
    assert temperature > 0, f"temperature must be > 0, got {temperature}"
    assert use_cache or not compile, "compile compiles the cached decode step; it needs use_cache=True"
    cfg, was_training = model.cfg, model.training
    model.eval()  # no dropout while sampling; the caller's mode is restored at the end
    B, k, L, guided = labels.shape[0], cfg.num_codebooks, cfg.grid[0] * cfg.grid[1], cfg_scale != 1.0
    # CFG batch: first half conditional, second half the null class num_classes; both halves get the sampled codes
    y = torch.cat([labels, torch.full_like(labels, cfg.num_classes)]) if guided else labels
    both = (lambda t: torch.cat([t, t])) if guided else (lambda t: t)
    codes = torch.zeros(B, k, L, dtype=torch.long, device=labels.device)

    def pick(logits):   # (nB, V) -> one sub-code per image (B,)
        logits = logits.float()
        if guided:  # NOTE(paper≠code): in fp32 (the released sampler: bf16), for any finite s (there: only s > 1)
            cond, uncond = logits.chunk(2)
            # paper-map: CFG
            logits = uncond + cfg_scale * (cond - uncond)
        probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    if use_cache:
        fast.decode(model, y, codes, both, pick, compile)
    else:   # the paper's form
        for t in range(L):
            x = torch.cat([model.cls_embedding(y)[:, None], model.embed(both(codes[:, :, :t]))], 1)   # (nB, t+1, dim)
            h = model.run_blocks(model.layers, x)[:, -1]               # h_t
            for j in range(k):  # Sec. 3.3: sub-code j conditions on the sub-codes < j just sampled here
                codes[:, j, t] = pick(model.head_logits(h, both(codes[:, :j, t]))[:, -1])
    model.train(was_training)
    return codes.view(B, k, *cfg.grid)  # (B, k, L) -> (B, k, h, w)


if __name__ == "__main__":  # the parameter count of every preset (meta tensors: instant, no memory)
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="Prints the parameter count of every FAR preset for k = 2 and 3 sub-codes (Tab. 2: "
                            "far-b, far-l) and the tiny config.").parse_args()
    for name, preset in PRESETS.items():
        for k in (2, 3):
            with torch.device("meta"):
                model = FAR(FARConfig(**{**preset, "num_codebooks": k}))
            print(f"{name:6s} k={k}: {sum(p.numel() for p in model.parameters()):,} parameters")
    print(asdict(FARConfig(**PRESETS["tiny"])))
