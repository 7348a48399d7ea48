"""The FQGAN tokenizer: a VQGAN encoder/decoder with k factorized sub-codebooks, in one code path for any k.

Paper: "Factorized Visual Tokenization and Generation", Bai et al., arXiv 2411.16681.
  Sec. 3.1      VQGAN backbone (LlamaGen's VQ-16/VQ-8 encoder and decoder)
  Sec. 3.2      factorized quantization: Eq. (3) shared trunk, Eq. (4) one adapter per sub-codebook,
                Eq. (5) one quantizer per sub-codebook, Eq. (6) decode the channel-wise concatenation
  Sec. 3.2.1-2  the z_q that Eq. (7) compares, and the feature-prediction heads (both losses: losses.py)
  Tab. 1, 3     presets fqgan-dual-16/-8, fqgan-triple-16/-8, the vqgan-16 baseline; IBQ (arXiv 2412.02692): ibq-16

Data flow (k branches, concatenated in branch order: [vis, sem] / [vis, sem_mid, sem_high]):

  x (B,3,H,W) -> Encoder trunk -> z (B,C,h,w) -+-> branch i: adapter A_i -> GroupNorm -> swish -> conv_out
                                               |     -> quant_conv -> quantizer Q_i -> z_q^i (B,d,h,w)
                                               |     [-> feature head P_i (teacher-supervised branches only)]
                                               +-> ... ; concat z_q^1..z_q^k -> post_quant_conv -> Decoder -> x_rec

Names and numerics follow the released code where checkpoint parity needs them (bmm attention
with the scale after the matmul, asymmetric padding before the stride-2 conv, nearest upsampling, exact GELU, eps
1e-5 / 1e-6); a `# parity: §n` tag marks such a line, and docs/official_code.md §n says what the released code does.

Usage:
  from tokenizer import Tokenizer, TokenizerConfig, PRESETS
  tok = Tokenizer(TokenizerConfig(**PRESETS["tiny"]))
  codes = tok.encode(x)                 # (B, k, h, w) int64, x in [-1, 1]
  x_rec = tok.decode_codes(codes)       # (B, 3, H, W); keep=[i] decodes from sub-codebook i alone (Fig. 3)
"""
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import fast
from quantizer import IBQuantizer, VectorQuantizer


@dataclass
class TokenizerConfig:
    image_size: int | tuple = 256           # int or (H, W); sizes the adapters' and heads' position tables
    # encoder / decoder (Sec. 3.1, LlamaGen VQ-16: ch_mult (1,1,2,2,4) -> downsample 16; VQ-8: (1,2,2,4))
    ch: int = 128
    ch_mult: tuple = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2                 # the decoder uses num_res_blocks + 1 per level
    z_channels: int = 256
    dropout: float = 0.0
    norm_groups: int = 32                   # GroupNorm groups everywhere (tiny: see its preset)
    attn: bool = True                       # self-attention blocks at the lowest resolution and in the mid blocks
    # quantization (Sec. 3.1-3.2; Tab. 1: K = 16384, d = 8)
    quantizer: str = "vq"                   # "vq" (FQGAN) or "ibq"
    num_codebooks: int = 2                  # k
    codebook_size: int = 16384              # K, per sub-codebook
    codebook_dim: int = 8                   # d
    l2_norm: bool = True                    # vq only: cosine-similarity lookup (FQGAN default)
    beta: float = 0.25                      # commitment weight (Eq. 2)
    entropy_weight: float = 0.03            # keeps code usage spread (# parity: §3.1)
    entropy_temperature: float = 0.01
    # adapters, Eq. (4): a pre-LN transformer over the h*w latent tokens, width = ch * ch_mult[-1]
    adapter_layers: int = 6                 # 0: no adapter (a plain VQGAN branch)
    adapter_heads: int = 8
    adapter_residual: bool = False          # z_i = z + A_i(z) instead of Eq. (4)'s A_i(z) (tiny: see its preset)
    # branches and representation learning (Sec. 3.2.2); one entry per sub-codebook, in concatenation order
    branch_names: tuple = ("vis", "sem")
    teachers: tuple = (None, "openclip:ViT-L-14:openai")   # frozen teacher per branch (teachers.py)
    head_dims: tuple = (0, 1024)            # feature-head width per branch = teacher feature width; 0: no head
    head_layers: int = 3
    head_heads: int = 8

    def __post_init__(self):
        k = self.num_codebooks
        for name in ("branch_names", "teachers", "head_dims"):
            if len(getattr(self, name)) != k:
                raise ValueError(f"{name} must have one entry per sub-codebook (num_codebooks={k}), "
                                 f"got {getattr(self, name)}")
        if self.quantizer not in ("vq", "ibq"):
            raise ValueError(f"quantizer must be 'vq' or 'ibq', got {self.quantizer!r}")

    downsample = property(lambda self: 2 ** (len(self.ch_mult) - 1))    # f: one stride-2 step per level but the last
    # (H, W) of the images the configured grid comes from: grid * downsample
    image_shape = property(lambda self: (self.grid[0] * self.downsample, self.grid[1] * self.downsample))

    @property
    def grid(self):
        """(h, w) of the latent grid for the configured image size: grid = image_size // downsample."""
        size = (self.image_size,) * 2 if isinstance(self.image_size, int) else tuple(self.image_size)
        if any(s % self.downsample for s in size):
            raise ValueError(f"image size {size} is not divisible by the downsample factor {self.downsample}")
        return size[0] // self.downsample, size[1] // self.downsample


# Every preset (the TokenizerConfig defaults above fill the rest). Tab. 1's branches: DUAL (CLIP ViT-L/14 on the
# semantic branch), TRIPLE (DINOv2 S/14, CLIP B/16); ONE, a single plain VQ branch (a VQGAN).
DUAL = dict(num_codebooks=2, branch_names=("vis", "sem"), head_dims=(0, 1024),
            teachers=(None, "openclip:ViT-L-14:openai"))
TRIPLE = dict(num_codebooks=3, branch_names=("vis", "sem_mid", "sem_high"), head_dims=(0, 384, 768),
              teachers=(None, "timm:vit_small_patch14_dinov2.lvd142m", "openclip:ViT-B-16:openai"))
ONE = dict(num_codebooks=1, adapter_layers=0, branch_names=("vis",), teachers=(None,), head_dims=(0,))
# TINY, the CPU-sized trunk of the default tiny: 64 px, 48 channels, 8 per GroupNorm group (one per group is an
# instance norm, where a decoder grew a spike). TINY64, the same at 64 channels: the shipped weights' and the 16x16
# ablation presets' trunk. Why 48 channels and 8 per group: docs/results.md.
TINY = dict(image_size=64, ch=48, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=64, norm_groups=6)   # 16x16 tokens
TINY64 = {**TINY, "ch": 64, "norm_groups": 8}                        # 64 channels, 8 per group
TINY8 = {**TINY64, "ch_mult": (1, 1, 2, 2)}                          # one more level: 8x8 tokens (downsample 8)
# the tiny FQ branches: two 512-entry sub-codebooks, residual adapters, no teacher; +rep: the stand-in on branch 2
TINY_FQ = dict(codebook_size=512, adapter_layers=2, adapter_heads=4, adapter_residual=True, teachers=(None, None),
               head_dims=(0, 0))
TINY_REP = dict(teachers=(None, "cnn:tiny_teacher.pt"), head_dims=(0, 128), head_layers=1)
# paper-map: Tab. 1
PRESETS = {
    # Tab. 1: FQGAN-Dual / -Triple at downsample 16 (16x16 tokens at 256 px) and 8 (32x32 tokens), K = 16384, d = 8
    "fqgan-dual-16": dict(ch_mult=(1, 1, 2, 2, 4), **DUAL),
    "fqgan-triple-16": dict(ch_mult=(1, 1, 2, 2, 4), **TRIPLE),
    "fqgan-dual-8": dict(ch_mult=(1, 2, 2, 4), **DUAL),
    "fqgan-triple-8": dict(ch_mult=(1, 2, 2, 4), **TRIPLE),
    # Tab. 3 baseline: LlamaGen's VQ-16, one 16384 x 8 codebook, no adapter
    "vqgan-16": dict(**ONE),
    # IBQ (arXiv 2412.02692): one 16384 x 256 codebook, raw inner-product logits, 4 res blocks per level.
    # NOTE(paper≠code): IBQ's own encoder is taming's (attention at 16x16 in every block); we reuse ours.
    "ibq-16": dict(quantizer="ibq", codebook_dim=256, l2_norm=False, entropy_weight=0.05, num_res_blocks=4, **ONE),
    # CPU size: 64 px, downsample 4 -> 16x16 tokens, two 512-entry sub-codebooks, no teacher (no weights offline).
    # NOTE(paper≠code): residual tiny adapters, z_i = z + A_i(z), train faster at this size (docs/results.md).
    "tiny": {**TINY, **TINY_FQ},
    "tiny64": {**TINY64, **TINY_FQ},    # tiny at 64 channels: weights/tiny_tokenizer.pt (fine-tune: --preset tiny64)
    # tiny64's trunk, one plain 1024-entry VQ branch (VQ(2K)): the plain AR baseline's codes (ablate.py --table ar),
    # against FAR on the shipped tiny64 codes
    "tiny-vq": dict(**TINY64, codebook_size=1024, **ONE),
    # tiny64 + Sec. 3.2.2 ("+rep"): the offline stand-in teacher (teachers.PhotoCNN) on branch 2, where Dual has CLIP
    # (weights/tiny_dual.pt, beside the shipped tiny64).
    "tiny-dual": {**TINY64, **TINY_FQ, **TINY_REP},
    # Tab. 3 at CPU size (ablate.py), on the cheaper 8x8 grid (downsample 8) where the quantizer limits reconstruction:
    # tiny8(-dual) = tiny64(-dual) there; tiny8-vq: one plain branch, as vqgan-16 is to fqgan-dual-16 (VQ(2K): add
    # --codebook-size 1024); tiny8-ibq as ibq-16: d = z_channels, raw logits, K = 1024 = the 2 x 512 codes FQ stores.
    "tiny8": {**TINY8, **TINY_FQ},
    "tiny8-dual": {**TINY8, **TINY_FQ, **TINY_REP},
    "tiny8-vq": dict(**TINY8, codebook_size=512, **ONE),
    "tiny8-ibq": dict(**TINY8, quantizer="ibq", codebook_size=1024, codebook_dim=64, l2_norm=False, entropy_weight=0.05,
                      **ONE),
}


# --------------------------------------------------------------------------------------------------------------
# Building blocks (LlamaGen / taming VQGAN)

def swish(x):   # x * sigmoid(x) fused: half the time, ~1e-7 apart, within parity tolerance (# parity: §1.3)
    return F.silu(x)


def group_norm(channels, groups=32):
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, dropout=0.0, groups=32):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin, groups), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = group_norm(cout, groups), nn.Conv2d(cout, cout, 3, 1, 1)
        self.dropout = nn.Dropout(dropout)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention at the lowest resolution, with a residual connection."""

    def __init__(self, c, groups=32):
        super().__init__()
        self.norm = group_norm(c, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q = self.q(y).reshape(b, c, h * w).permute(0, 2, 1)          # (B, C, h, w) -> (B, hw, C)
        k = self.k(y).reshape(b, c, h * w)                            # (B, C, hw)
        v = self.v(y).reshape(b, c, h * w)                            # (B, C, hw)
        # bmm, then scale, softmax over keys, bmm with the transposed weights (# parity: §1.3, bit for bit)
        attn = (torch.bmm(q, k) * c ** -0.5).softmax(dim=2)           # (B, hw_q, hw_k)
        out = torch.bmm(v, attn.permute(0, 2, 1)).reshape(b, c, h, w)  # (B, C, hw_q) -> (B, C, h, w)
        return x + self.proj_out(out)


class Resample(nn.Module):
    """Resample by 2: kind "downsample" pads right/bottom by 1, then a stride-2 conv; "upsample": nearest, conv."""

    def __init__(self, c, kind):
        super().__init__()
        self.kind, self.conv = kind, nn.Conv2d(c, c, 3, *((2, 0) if kind == "downsample" else (1, 1)))

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1))) if self.kind == "downsample" else upsample_conv(x, self.conv)


def upsample_conv(x, conv):
    """conv(nearest2x(x)) for x (B, C, H, W) -> (B, Co, 2H, 2W). On a CPU as four 2x2 convs of x (fast.upsample_conv:
    4/9 of the multiply-adds, equal up to rounding), except where conv_layout makes the output's level channels-last:
    there the plain form is the faster one. Elsewhere the plain form (not yet timed on a GPU)."""
    if x.device.type == "cpu" and not fast.channels_last_at(x, 2 * min(x.shape[-2:])):
        return fast.upsample_conv(x, conv.weight, conv.bias)
    return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def conv_layout(x):
    """x in the memory layout its convolutions run fastest in: channels-last from 32 px on under bf16 autocast on a
    CPU with AMX (fast.conv_layout); x as it is elsewhere."""
    return fast.conv_layout(x)


class Level(nn.Module):
    """One resolution level: res blocks, attention after each of them (lowest resolution only), resampling."""

    def __init__(self, cin, cout, n_res, attn, resample, dropout, groups):
        super().__init__()
        self.res = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, dropout, groups) for i in range(n_res))
        self.attn = nn.ModuleList(AttnBlock(cout, groups) for _ in range(n_res)) if attn else nn.ModuleList()
        if resample is not None:    # registered as "downsample" / "upsample" (# parity: §1.7, the names)
            setattr(self, resample, Resample(cout, resample))
        self.resample = resample

    def forward(self, x):
        x = conv_layout(x)                                            # the level's resolution decides
        for i, res in enumerate(self.res):
            x = self.attn[i](res(x)) if len(self.attn) else res(x)
        return getattr(self, self.resample)(x) if self.resample else x


def mid_blocks(c, cfg):
    """res -> attention -> res at the lowest resolution (mid.0, mid.1, mid.2); res -> res if no attention."""
    attn = [AttnBlock(c, cfg.norm_groups)] if cfg.attn else []
    return nn.Sequential(ResnetBlock(c, c, cfg.dropout, cfg.norm_groups), *attn,
                         ResnetBlock(c, c, cfg.dropout, cfg.norm_groups))


class Encoder(nn.Module):
    """Eq. (3): the shared trunk E(x) = z (B, ch*ch_mult[-1], h, w). LlamaGen's encoder minus norm_out/conv_out,
    which become per-branch layers (Branch.norm_out / conv_out)."""

    def __init__(self, cfg):
        super().__init__()
        chs = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, 1, 1)
        self.conv_blocks = nn.Sequential(*(
            Level(([cfg.ch] + chs)[i], chs[i], cfg.num_res_blocks, attn=cfg.attn and i == len(chs) - 1,
                  resample="downsample" if i < len(chs) - 1 else None, dropout=cfg.dropout, groups=cfg.norm_groups)
            for i in range(len(chs))))
        self.mid = mid_blocks(chs[-1], cfg)

    def forward(self, x):
        return self.mid(self.conv_blocks(self.conv_in(conv_layout(x))))   # (B, 3, H, W) -> (B, C, h, w)


class Decoder(nn.Module):
    """x_rec = D(post_quant_conv([z_q^1; ...; z_q^k])), Eq. (6). conv_blocks.0 is the deepest level."""

    def __init__(self, cfg):
        super().__init__()
        chs = [cfg.ch * m for m in cfg.ch_mult][::-1]                 # deepest first
        self.conv_in = nn.Conv2d(cfg.z_channels, chs[0], 3, 1, 1)
        self.mid = mid_blocks(chs[0], cfg)
        self.conv_blocks = nn.Sequential(*(
            Level(chs[max(i - 1, 0)], chs[i], cfg.num_res_blocks + 1, attn=cfg.attn and i == 0,
                  resample="upsample" if i < len(chs) - 1 else None, dropout=cfg.dropout, groups=cfg.norm_groups)
            for i in range(len(chs))))
        self.norm_out = group_norm(chs[-1], cfg.norm_groups)
        self.conv_out = nn.Conv2d(chs[-1], 3, 3, 1, 1)

    def forward(self, z):
        h = self.conv_blocks(self.mid(self.conv_in(conv_layout(z))))  # (B, z_channels, h, w) -> (B, ch, H, W)
        return self.conv_out(swish(self.norm_out(h)))                 # no tanh, no clamp (# parity: §1.3)


# --------------------------------------------------------------------------------------------------------------
# Transformers of the adapters (Eq. 4) and feature heads (Sec. 3.2.2). CLIP-style names for checkpoint loading.

class SelfAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names (packed q|k|v projection)."""

    def __init__(self, width, heads):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by the number of heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)                  # nn.MultiheadAttention's init
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))  # (B,H,n,c/H)
        out = F.scaled_dot_product_attention(q, k, v)                 # bidirectional: no mask
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))    # (B, H, n, c/H) -> (B, n, c)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(width), SelfAttention(width, heads), nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(),
                                             c_proj=nn.Linear(4 * width, width)))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def _grid_pos(pos, grid, new_grid, window=False):
    """Position table (h*w, C) for another grid (identity when it matches). window=True and a smaller grid: a random
    window of the table (the input is a window of a full-size one, as train_tokenizer.py --low-res-steps cuts them;
    drawn by the global generator of pos' device: a resume draws the same); else bicubic interpolation."""
    if tuple(new_grid) == tuple(grid):
        return pos
    (h, w), (new_h, new_w) = grid, new_grid
    if window and new_h <= h and new_w <= w:
        top, left = (torch.randint(0, n + 1, (1,), device=pos.device) for n in (h - new_h, w - new_w))
        rows, cols = (start + torch.arange(n, device=pos.device) for start, n in ((top, new_h), (left, new_w)))
        return pos[(rows[:, None] * w + cols[None, :]).flatten()]       # table rows x cols -> (new_h*new_w, C)
    pos = pos.reshape(1, *grid, -1).permute(0, 3, 1, 2)              # (h*w, C) -> (1, C, h, w)
    pos = F.interpolate(pos, size=tuple(new_grid), mode="bicubic", align_corners=False)
    return pos.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], -1)


# paper-map: Adapter
class Adapter(nn.Module):
    """Eq. (4), z_i = A_i(z): a pre-LN transformer over the h*w latent tokens, bidirectional, learned positions.
    The output replaces z, as Eq. (4) writes it (no skip around the adapter); residual=True adds it to z."""

    def __init__(self, width, layers, heads, grid, residual=False):
        super().__init__()
        self.grid, self.residual = grid, residual
        self.positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(grid[0] * grid[1], width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))
        self.ln_post = nn.LayerNorm(width)

    def forward(self, z):
        b, c, h, w = z.shape
        x = z.reshape(b, c, h * w).permute(0, 2, 1)                   # (B, C, h, w) -> (B, h*w, C), row-major
        x = self.ln_pre(x + _grid_pos(self.positional_embedding, self.grid, (h, w), window=self.training))
        for block in self.transformer:
            x = block(x)
        x = self.ln_post(x).permute(0, 2, 1).reshape(b, c, h, w)      # (B, h*w, C) -> (B, C, h, w)
        return z + x if self.residual else x


# paper-map: Feature heads
class FeatPredHead(nn.Module):
    """Sec. 3.2.2: predicts a frozen teacher's feature from one branch's quantized codes z_q^i (B, d, h, w).

    Linear-ReLU-Linear lift to the teacher width, a class token, learned positions, a small transformer.
    Returns (B, 1 + h*w, width); token 0 is compared with the teacher's CLS feature (teachers.py).
    """

    def __init__(self, codebook_dim, width, layers, heads, grid):
        super().__init__()
        self.grid = grid
        self.upscale = nn.Sequential(nn.Linear(codebook_dim, width), nn.ReLU(), nn.Linear(width, width))
        self.class_embedding = nn.Parameter(width ** -0.5 * torch.randn(1, width))
        self.positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(1 + grid[0] * grid[1], width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))
        self.ln_post = nn.LayerNorm(width)

    def forward(self, z_q):
        b, d, h, w = z_q.shape
        x = self.upscale(z_q.reshape(b, d, h * w).permute(0, 2, 1))  # (B, d, h, w) -> (B, h*w, d) -> (B, h*w, W)
        x = torch.cat([self.class_embedding.expand(b, 1, -1).to(x.dtype), x], dim=1)   # (B, 1 + h*w, W)
        pos = self.positional_embedding
        pos = torch.cat([pos[:1], _grid_pos(pos[1:], self.grid, (h, w))])
        x = self.ln_pre(x + pos)
        for block in self.transformer:
            x = block(x)
        return self.ln_post(x)


class Branch(nn.Module):
    """One sub-codebook's path, Eq. (4)-(5): adapter -> GroupNorm -> swish -> conv_out -> quant_conv -> quantizer,
    plus its feature head when a teacher supervises it."""

    def __init__(self, cfg, i):
        super().__init__()
        width = cfg.ch * cfg.ch_mult[-1]
        self.adapter = (Adapter(width, cfg.adapter_layers, cfg.adapter_heads, cfg.grid, cfg.adapter_residual)
                        if cfg.adapter_layers else None)
        self.norm_out = group_norm(width, cfg.norm_groups)
        self.conv_out = nn.Conv2d(width, cfg.z_channels, 3, 1, 1)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_dim, 1)
        self.quantize = (VectorQuantizer(cfg.codebook_size, cfg.codebook_dim, cfg.l2_norm, cfg.beta, cfg.entropy_weight,
                                         cfg.entropy_temperature) if cfg.quantizer == "vq" else
                         IBQuantizer(cfg.codebook_size, cfg.codebook_dim, cfg.beta, cfg.entropy_weight,
                                     cfg.entropy_temperature))
        self.feat_head = (FeatPredHead(cfg.codebook_dim, cfg.head_dims[i], cfg.head_layers, cfg.head_heads, cfg.grid)
                          if cfg.head_dims[i] else None)

    def forward(self, z):
        # paper-map: Eq. (4)
        z_i = self.adapter(z) if self.adapter is not None else z     # every branch adapts the shared z
        z_i = self.quant_conv(self.conv_out(swish(self.norm_out(z_i))))   # (B, C, h, w) -> (B, d, h, w)
        # paper-map: Eq. (5)
        return self.quantize(z_i)                                     # z_q^i, its losses, its codes


# --------------------------------------------------------------------------------------------------------------

class Tokenizer(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.branches = nn.ModuleList(Branch(cfg, i) for i in range(cfg.num_codebooks))
        self.post_quant_conv = nn.Conv2d(cfg.num_codebooks * cfg.codebook_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)

    def _check_images(self, x):
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W) in [-1, 1], got {tuple(x.shape)}")
        if x.shape[2] % self.cfg.downsample or x.shape[3] % self.cfg.downsample:
            raise ValueError(f"image size {tuple(x.shape[2:])} is not divisible by the downsample factor "
                             f"{self.cfg.downsample}")

    def forward(self, x, features=True):
        """x (B, 3, H, W) in [-1, 1] -> (x_rec (B, 3, H, W), aux): aux["codes"] (B, k, h, w), aux["z_q"] k x (B, d, h,
        w) (Eq. 7 compares them, losses.py), aux["losses"] {"codebook/i", "commit/i", ...}, aux["features"] {i: (B, 1
        + h*w, width)} of the teacher-supervised branches; features=False skips the heads (no teacher to use them)."""
        self._check_images(x)
        # paper-map: Eq. (3)
        z = self.encoder(x)                                           # shared by the k branches
        z_qs, codes, losses, heads = [], [], {}, {}
        for i, branch in enumerate(self.branches):
            z_q, branch_losses, branch_codes = branch(z)              # Eq. (4)-(5)
            z_qs, codes = z_qs + [z_q], codes + [branch_codes]
            losses.update({f"{name}/{i}": v for name, v in branch_losses.items()})
            if branch.feat_head is not None and features:
                heads[i] = branch.feat_head(z_q)                      # Sec. 3.2.2
        x_rec = self.decode(torch.cat(z_qs, dim=1))                   # Eq. (6): k x (B, d, h, w) -> (B, k*d, h, w)
        aux = {"codes": torch.stack(codes, dim=1), "z_q": z_qs, "losses": losses, "features": heads}
        return x_rec, aux

    def decode(self, z_q):
        """Eq. (6): (B, k*d, h, w) concatenated sub-codes -> image (B, 3, H, W)."""
        # paper-map: Eq. (6)
        return self.decoder(self.post_quant_conv(z_q))

    @torch.no_grad()
    def encode(self, x):
        """Images (B, 3, H, W) in [-1, 1] -> codes (B, k, h, w) int64, one index map per sub-codebook."""
        self._check_images(x)
        z = self.encoder(x)                                           # Eq. (3)
        return torch.stack([branch(z)[2] for branch in self.branches], dim=1)   # k x (B, h, w) -> (B, k, h, w)

    def decode_codes(self, codes, keep=None):
        """Codes (B, k, h, w) -> images (B, 3, H, W). With keep=[i, ...], only those sub-codebooks contribute and
        the other branches' embeddings are zeroed (Fig. 3: what each sub-codebook encodes on its own)."""
        k, size = self.cfg.num_codebooks, self.cfg.codebook_size
        if codes.dim() != 4 or codes.shape[1] != k:
            raise ValueError(f"expected codes of shape (B, {k}, h, w), got {tuple(codes.shape)}")
        if codes.dtype.is_floating_point or codes.min() < 0 or codes.max() >= size:
            raise ValueError(f"codes must be integers in [0, {size}), got dtype {codes.dtype} and range "
                             f"[{codes.min().item()}, {codes.max().item()}]")
        keep = range(k) if keep is None else keep
        if any(not 0 <= i < k for i in keep):
            raise ValueError(f"keep must list sub-codebook indices in [0, {k}), got {list(keep)}")
        z_qs = [branch.quantize.codebook()[codes[:, i]].permute(0, 3, 1, 2) * (1.0 if i in keep else 0.0)
                for i, branch in enumerate(self.branches)]           # (B, h, w) -> (B, h, w, d) -> (B, d, h, w)
        return self.decode(torch.cat(z_qs, dim=1))


if __name__ == "__main__":  # the parameter count of every preset (meta tensors: instant, no memory)
    import argparse
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="Prints every preset's parameter count (the teachers not counted: they are frozen "
                            "and loaded beside it), its k sub-codebooks K x d and its token grid.").parse_args()
    for name, preset in PRESETS.items():
        with torch.device("meta"):
            tok = Tokenizer(TokenizerConfig(**preset))
        c = tok.cfg
        print(f"{name:16s} {sum(p.numel() for p in tok.parameters()):>12,} parameters, k={c.num_codebooks} x "
              f"{c.codebook_size} x {c.codebook_dim}, {c.grid[0]}x{c.grid[1]} tokens at {c.image_shape[0]} px")
