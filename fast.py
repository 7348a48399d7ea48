"""The fast forms: what quantizer.py, far.py and tokenizer.py compute in the paper's form, in bounded memory and
less time.

Paper: "Factorized Visual Tokenization and Generation", Bai et al., arXiv 2411.16681; IBQ, arXiv 2412.02692.
Each function here equals a paper form of the model files, and a test checks it:
  nearest_code        Eq. (1), quantizer.lookup_reference, in cache-sized (codes x tokens) blocks with a two-level
                      argmin, one block run per core on a private thread pool   (tests/test_quantizer.py)
  code_softmax        IBQ's soft one-hot and the entropy terms, quantizer.ibq_reference / entropy_reference, in row
                      blocks with a hand-written backward that recomputes each block (tests/test_quantizer.py)
  distance_entropy    the VQ entropy term on softmax(-dist / T) through code_softmax
  max_inner_product   IBQ's codes at evaluation: the argmax of the logits, no softmax
  upsample_conv       the decoder's nearest 2x + 3x3 conv as four 2x2 convs of the input (tokenizer.upsample_conv,
                      on a CPU; tests/test_tokenizer.py)
  conv_layout         channels-last activations for oneDNN's bf16 convolutions on a CPU with AMX (tokenizer.py;
                      tests/test_tokenizer.py)
  sdpa_backend        the math attention kernel for the AR head's short training sequences on a CPU (far.py)
  decode              far.generate with static KV caches, one position per step, optionally compiled (with the
                      weights as graph inputs, or folded in as constants for sampling a fixed model); eager on a CPU,
                      on weight copies packed once for oneDNN (packed_linears)
                      (far.generate(use_cache=False) is the paper's form; tests/test_far_cache.py)
Why they exist: on a CPU the paper forms' N x K matrices miss every cache (the blocked lookup is ~9x faster,
python bench.py --only lookup), IBQ's N x K softmax at K = 16384 holds GBs, sampling by recompute costs a pass
over the whole prefix per token, a 3x3 conv after nearest 2x up-sampling applies 9 taps to an output pixel that
sees only 4 distinct input pixels (python bench.py --only train-dual), and a matmul of a few rows against a large
weight repacks the weight at every call (python bench.py --only far). The switches: quantizer.FAST (the paper's
forms run under torch.compile anyway, which fuses them), far.generate(use_cache=..., compile=...) and the device
(tokenizer.upsample_conv takes the fast form on a CPU only). This file imports no other file of the project.
"""
import contextlib
import functools
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# CPU blocks hold CPU_ELEMS_PER_DIM * d elements: 2^20 (4 MiB, cache-sized) for the d = 8 lookup, 2^25 for IBQ's
# d = 256, whose 2d flops per element need tall GEMMs. On a GPU a block is the whole N x K matrix if it fits
# GPU_BLOCK_BYTES (FQGAN_BLOCK_MB, default 1024). code_softmax's forward + backward hold up to ~8.5 blocks at once
# (IBQ's straight-through; 5 for the entropy term alone), so eager GPU runs (--no-compile) need up to 8.5 GiB for it:
# FQGAN_BLOCK_MB=256 on 24 GB cards. Compiled runs take the paper's forms, without blocks.
CPU_ELEMS_PER_DIM, GPU_BLOCK_BYTES = 2**17, int(float(os.environ.get("FQGAN_BLOCK_MB", 1024)) * 2**20)
GROUP = 64                      # codes per group in nearest_code's two-level argmin
# code_softmax keeps log-probabilities >= LOG_P_MIN (p >= e^-60 ~ 1e-26 of the row's largest; no fp32 sum over
# K <= 2^18 codes can see it): below, exp() and GEMMs take x86's slow paths for subnormal floats.
LOG_P_MIN = -60.0
_POOLS = {}                     # (process id, threads) -> the thread pool of _in_shards


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
    """quantizer.lookup_reference(z, codebook) for z (N, d), codebook (K, d) -> (N,) int64, in (codes x tokens)
    blocks of block_elems distances (default lookup_block_elems), each (||c||^2 + ||z||^2) - 2 c.z as the released
    code rounds it (add, addmm: -2 is a power of two; # parity: §1.5), codes-major (c @ z^T). torch's argmin is not
    vectorised, so it is two-level: the min of each group of GROUP codes, the first group holding the block minimum,
    the argmin inside it (the first minimum of the first minimal group is argmin's index, ties included).
    NOTE: fp32 distances depend on the GEMM kernel MKL picks for a shape, so near-ties (< ~1e-6 apart) can resolve
    differently for different batch sizes or thread counts, in the released code as here."""
    (n, d), K = z.shape, codebook.shape[0]
    elems = block_elems or lookup_block_elems(z.device, n, K, d)
    pad = -K % GROUP                                                  # whole groups: pad with codes at distance +inf
    c_sq = F.pad(codebook.pow(2).sum(1, keepdim=True), (0, 0, 0, pad), value=float("inf"))   # (K + pad, 1)
    codebook, z_sq, z_t = F.pad(codebook, (0, 0, 0, pad)), z.pow(2).sum(1)[None], z.t().contiguous()   # (1, N), (d, N)
    cols = min(K + pad, max(1, elems // GROUP) * GROUP)               # codes per block, whole groups
    rows = min(n, max(1, elems // cols))                              # tokens per block
    codes, best = torch.empty(n, dtype=torch.long, device=z.device), z.new_empty(n)   # best: distance of codes[i]
    tokens = torch.arange(rows, device=z.device)                     # a block's token positions, for the gather

    def shard(blocks):
        block = z.new_empty(cols * rows)
        for o in blocks:                                              # tokens o against every block of codes
            r = o.stop - o.start
            for c0 in range(0, K + pad, cols):                        # one block unless K > elems (2^20 codes at d 8)
                c_blk = codebook[c0:c0 + cols]
                dist_ = torch.add(c_sq[c0:c0 + cols], z_sq[:, o], out=block[:c_blk.shape[0] * r].view(-1, r))
                groups = dist_.addmm_(c_blk, z_t[:, o], alpha=-2).view(-1, GROUP, r)  # (kb, r) -> (kb/GROUP, GROUP, r)
                d_min, g = groups.amin(1).min(0)                      # (r,) block minimum and its first group
                idx = groups[g, :, tokens[:r]].argmin(1).add_(g, alpha=GROUP).add_(c0)   # (r, GROUP) -> (r,) code
                if c0 == 0:
                    codes[o], best[o] = idx, d_min
                else:                                                 # earlier blocks win ties
                    better = d_min < best[o]
                    codes[o], best[o] = torch.where(better, idx, codes[o]), torch.where(better, d_min, best[o])
    _in_shards(shard, n, rows, z.device)
    return codes


def _softmax(logits, temperature):
    """softmax(logits / T) per row as (p, x, log_s), log p = x - log_s: x = logits / T - row max >= LOG_P_MIN."""
    x = logits.sub(logits.amax(1, keepdim=True)).div_(temperature).clamp_(min=LOG_P_MIN)
    p = x.exp()
    s = p.sum(1, keepdim=True)
    return p.div_(s), x, s.log_()


class _CodeSoftmax(torch.autograd.Function):
    """quantizer.ibq_reference in row blocks of the logits A = z C^T (N, K), never storing A; the backward recomputes
    each block. forward -> (codes = argmax_j A_ij, z_q = onehot_ste(A) @ C, h_sample, h_code), codes and z_q None
    without straight_through. NOTE: the reference (and released) codes are argmax softmax(A): the same unless fp32
    rounds the two largest probabilities equal. Gradients, as autograd gives them for the reference (tested):
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
    """quantizer.ibq_reference(z, codebook, temperature) for z (N, d), codebook (K, d), in blocks of block_elems logits
    (default lookup_block_elems); straight_through=False returns (None, None, h_sample, h_code). In >= fp32."""
    dtype = torch.promote_types(z.dtype, torch.float32)             # bf16 -> fp32; fp64 stays (tests)
    elems = block_elems or lookup_block_elems(z.device, z.shape[0], codebook.shape[0], z.shape[1])
    return _CodeSoftmax.apply(z.to(dtype), codebook.to(dtype), temperature, straight_through, elems)


def distance_entropy(z, codebook, temperature, block_elems=None):
    """The VQ entropy terms (h_sample, h_code) on softmax(-||z - c||^2 / T), as
    quantizer.entropy_reference(-distances(z, codebook), T). -dist = 2 z.c - ||c||^2 - ||z||^2, whose last term is
    constant per row and cancels in the softmax, so one product of augmented rows: [2z, -1] . [c, ||c||^2]."""
    z_aug = torch.cat([2 * z, -z.new_ones(z.shape[0], 1)], 1)                # (N, d+1)
    c_aug = torch.cat([codebook, codebook.pow(2).sum(1, keepdim=True)], 1)   # (K, d+1)
    return code_softmax(z_aug, c_aug, temperature, False, block_elems)[2:]


# ----------------------------------------------------------------------------------------------------------------
# The decoder's upsampling (tokenizer.upsample_conv): nearest 2x, then a 3x3 conv, as four 2x2 convs on the input
# before it is enlarged. Output row 2i + a of conv3x3(nearest2x(x)) sees enlarged rows 2i + a - 1 .. 2i + a + 1, which
# are input rows (i - 1, i, i) for a = 0 and (i, i, i + 1) for a = 1: two of the three kernel rows fall on the same
# input row and add up. The same holds for columns, so each of the 4 output phases (a, b) is a 2x2 conv of x.

def _fold_taps(w, dim):
    """The 3 kernel taps of w along dim -> (phase 0: taps (0, 1 + 2) on input (i - 1, i); phase 1: (0 + 1, 2) on
    (i, i + 1)), each with 2 taps along dim."""
    t0, t1, t2 = w.unbind(dim)
    return torch.stack([t0, t1 + t2], dim), torch.stack([t0 + t1, t2], dim)


def upsample_conv(x, weight, bias):
    """conv2d(nearest2x(x), weight (Co, C, 3, 3), bias, padding=1) for x (B, C, H, W) -> (B, Co, 2H, 2W).

    One conv of x with the 4 phases' 2x2 kernels stacked (4 Co outputs, padding 1: window r covers input rows r - 1
    and r), then each phase's H x W window is written to its interleaved pixels. 4/9 of the multiply-adds of the
    3x3 conv on the enlarged input, which is never built (nor kept for the backward). The kernels are summed in the
    weights' dtype before autocast casts them, so the result equals the plain form up to rounding (~1e-6 relative in
    fp32; gradients too: tests/test_tokenizer.py). Its time against the plain form, conv by conv for FQGAN-Dual's
    decoder and in the whole training step: python bench.py --only train-dual (docs/results.md "Speed")."""
    B, _, H, W = x.shape
    co = weight.shape[0]
    rows = _fold_taps(weight, 2)                                     # 2 x (Co, C, 2, 3), phase a = 0, 1
    kernels = torch.cat([k for r in rows for k in _fold_taps(r, 3)])  # (4 Co, C, 2, 2), phases (a, b) a-major
    y = F.conv2d(x, kernels, None if bias is None else bias.repeat(4), padding=1)   # (B, 4 Co, H + 1, W + 1)
    y = y.unflatten(1, (2, 2, co))                                   # (B, a, b, Co, H + 1, W + 1)
    out = y.new_empty(B, co, H, 2, W, 2)                             # pixel (2i + a, 2j + b) at [:, :, i, a, j, b]
    for a in (0, 1):            # phase a = 0 reads conv rows 0..H-1 (input rows i - 1, i), a = 1 rows 1..H
        for b in (0, 1):
            out[:, :, :, a, :, b] = y[:, a, b, :, a:a + H, b:b + W]
    return out.view(B, co, 2 * H, 2 * W)                             # (B, Co, H, 2, W, 2) -> (B, Co, 2H, 2W)


CHANNELS_LAST_MIN_SIDE = 32     # conv_layout: channels-last from 32 x 32 px on (at 16 px NCHW is the faster one)


@functools.cache
def _amx():
    return bool(torch.cpu.get_capabilities().get("amx_bf16"))       # cpuinfo's flags


def _amx_bf16(x):
    """x is on a CPU with AMX, under bf16 autocast, in eager mode (torch.compile picks layouts itself)."""
    return (x.device.type == "cpu" and not torch.compiler.is_compiling() and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and _amx())


def channels_last_at(x, side):
    """Whether conv_layout keeps activations like x at side x side px channels-last."""
    return _amx_bf16(x) and side >= CHANNELS_LAST_MIN_SIDE


def conv_layout(x):
    """x (B, C, H, W) in the memory layout that the convolutions reading it run fastest in. On a CPU with AMX,
    oneDNN's bf16 convolutions run far faster on channels-last (NHWC) data than on NCHW (an NCHW call copies its
    operands inside, in the profile), so there, under bf16 autocast, activations are channels-last from
    CHANNELS_LAST_MIN_SIDE px on, and NCHW below, where channels-last is the slower layout for 256-512 channels.
    Elsewhere x as it is: fp32 and CPUs without AMX (no faster channels-last there, docs/results.md), a GPU (not yet
    timed), torch.compile. Same values up to rounding (the order of the convolutions' sums). Its effect on
    FQGAN-Dual's step: python bench.py --only train-dual."""
    if not _amx_bf16(x):
        return x
    return x.contiguous(memory_format=torch.channels_last if min(x.shape[-2:]) >= CHANNELS_LAST_MIN_SIDE
                        else torch.contiguous_format)


# ----------------------------------------------------------------------------------------------------------------
# FAR training: the attention kernel for the AR head's short sequences

def sdpa_backend(q):
    """The kernel choice for F.scaled_dot_product_attention on q (B, H, S, D): on a CPU, sequences of at most 8 slots
    (the AR head in training: one sequence [h_t, E_1(q^1), ...] of k slots per position, B*L of them) take the plain
    math kernel (two batched matmuls and a softmax), whose forward + backward at S = 2 takes 0.4x the time of the flash
    kernel's per-sequence tiling in bf16 (0.7x in fp32); everything else keeps torch's choice. Same result up to
    rounding."""
    if q.device.type == "cpu" and q.shape[2] <= 8:
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------------
# FAR sampling with static KV caches (gpt-fast / LlamaGen style): one position through the backbone, then one slot
# per sub-code through the AR head. Both steps are plain functions of (model, x, pos, caches) with fixed shapes, so
# torch.compile traces each once.

def decode_backbone(model, x, pos, caches):
    """x (N, 1, dim) at backbone slot pos (1,) int64 -> h_t (N, dim) before the final norm; writes the caches."""
    return model.run_blocks(model.layers, x, pos, caches)[:, -1]


def decode_head(model, x, pos, caches):
    """Sec. 3.3 AR-head slot pos (1,) = j: x (N, 1, dim) (h_t or E_j(c_j)) -> normed z (N, dim) for sub-code j."""
    return model.norm(model.run_blocks(model.ar_head, x, pos, caches)[:, -1])


@functools.cache
def compiled(step, frozen=False):
    """torch.compile(step), made once per process (so sample.py's batches reuse the traced graph). fullgraph: a graph
    break would be a bug; dynamic=False: one specialised graph per (batch, config), never recompiled per position.

    frozen=True, for sampling a model whose weights no longer change (sample.py --compile on a CPU): inductor's
    freezing folds the weights into the graph as constants, so they can be packed once for its own CPU GEMM kernels,
    which max_autotune times against ATen's at the first call and keeps where faster. Decode steps are matmuls of a
    few rows (2 x batch) against every weight: FAR-B's frozen step is 1.19x the plain compiled one on 2 cores,
    but the eager step on packed weights (packed_linears) beats both (python bench.py --only far). The price: one
    graph per model (weights are no longer inputs), a longer first call, and a weight changed in place after it
    would go unseen (decode refuses such a model)."""
    # options make the frozen graphs a backend of their own (a compile=True graph of the same model is not reused);
    # decode also sets them while it calls the graphs (FROZEN), since torch.compile's options alone did not turn
    # freezing on here (torch 2.14.1, CPU)
    return torch.compile(step, fullgraph=True, dynamic=False, options=dict(FROZEN) if frozen else None)


FROZEN = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}   # inductor's config


# packed_linears packs a weight of at least this many elements: below, F.linear on cache-resident weights is as fast
# or faster (python bench.py --only far: its packed-Linear rows by width; docs/results.md "Speed")
PACK_MIN_ELEMS = 2**17
_PACKED = weakref.WeakKeyDictionary()   # model -> (its weights' data_ptr and _version, the packed copies)


def _packed_forward(packed, bias, x):
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [None], "")   # x (..., in) -> (..., out)


@contextlib.contextmanager
def packed_linears(model, rows):
    """Eager CPU sampling: every nn.Linear of model with a weight of PACK_MIN_ELEMS or more runs on a copy of its
    weight packed once into oneDNN's blocked layout (torch.ops.mkldnn's prepacked linear, no compiling).
    A plain F.linear of a few rows (rows = 2 x batch per decode step) repacks its whole weight at every call; FAR-B's
    decode step is weight-bound, so this is most of its matmul time. Same fp32 math up to summation order (~1e-6
    relative). The packed copies are kept for the model while its weights are unchanged (each tensor's data_ptr and
    _version, which an in-place write bumps) and dropped with it: a second copy of the Linear weights (1.5 GB for
    FAR-B). Elsewhere (a GPU, autocast, non-fp32 weights, a torch without oneDNN or its packing op) this does
    nothing."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.numel() >= PACK_MIN_ELEMS]
    weights = [t for m in linears for t in (m.weight, m.bias) if t is not None]
    if not (torch.backends.mkldnn.is_available() and all(t.device.type == "cpu" and t.dtype == torch.float32
                                                          for t in weights) and not torch.is_autocast_enabled("cpu")):
        yield
        return
    key = [(t.data_ptr(), t._version) for t in weights]
    cached, copies = _PACKED.get(model, (None, []))   # kept beside the model, not on it: deepcopy never sees them
    if cached != key:
        try:
            copies = [torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), rows) for m in linears]
            _PACKED[model] = key, copies
        except (RuntimeError, NotImplementedError):    # a oneDNN build without the op (not x86?): plain F.linear
            linears = []
    for m, packed in zip(linears, copies):           # an instance attribute shadows Linear.forward for the call
        m.forward = functools.partial(_packed_forward, packed, m.bias)
    try:
        yield
    finally:
        for m in linears:
            del m.forward


def kv_caches(cfg, n_blocks, batch, slots, dtype, device):
    """One zeroed static (k_cache, v_cache) pair of shape (batch, n_head, slots, head_dim) per block."""
    shape = (batch, cfg.n_head, slots, cfg.dim // cfg.n_head)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(n_blocks)]


@torch.no_grad()
def decode(model, y, codes, both, pick, compile=False):
    """far.generate's loop with static caches: fills codes (B, k, L) in place for the (CFG) class batch y; both(t)
    repeats sampled codes for the CFG halves, pick(logits) draws one sub-code per row (CFG and sampling, far.py).

    The caches are allocated once per call: backbone (len(y), H, L, head_dim), the L slots being [class token,
    positions 0..L-2] (the last position is sampled, never fed back); AR head (len(y), H, k, head_dim). Each position
    runs one token. Head slots 0..j-1 were written by this position's earlier sub-codes and the slots above j are
    masked (Attention.forward), so the head caches need no reset between positions. The caches take autocast's
    dtype when it is on (bf16 keys under torch.autocast), else the weights'. compile=True: the first call traces two
    graphs (tens of seconds for tiny, minutes for FAR-B on a CPU); later positions, calls and models of the same
    batch and config reuse them (weights are graph inputs, so training updates are seen). compile="frozen": the
    weights are folded in (compiled(frozen=True)): two graphs per model, and a model whose weights changed in place
    since its first frozen call is refused rather than sampled with the old ones."""
    if compile == "frozen":   # every in-place write (optimizer step, load_state_dict) bumps a tensor's _version
        versions = [p._version for p in model.parameters()]
        if getattr(model, "_frozen_versions", versions) != versions:
            raise RuntimeError("this model's weights changed in place after compile='frozen' folded them into its "
                               "decode graphs; sample it with compile=True (weights as graph inputs), or load the "
                               "new weights into a new model")
        model._frozen_versions = versions
    backbone, head = (compiled(f, compile == "frozen") if compile else f for f in (decode_backbone, decode_head))
    with (torch._inductor.config.patch(FROZEN) if compile == "frozen" else contextlib.nullcontext() if compile
          else packed_linears(model, len(y))):
        _decode_loop(model, y, codes, both, pick, backbone, head)


def _decode_loop(model, y, codes, both, pick, backbone, head):
    """decode's positions: one token per position through the backbone step, then the head's k slots."""
    cfg, dev, (k, L) = model.cfg, y.device, codes.shape[1:]
    dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else model.norm.weight.dtype
    caches = kv_caches(cfg, cfg.n_layer, len(y), L, dtype, dev)
    head_caches = kv_caches(cfg, cfg.ar_head_layers, len(y), k, dtype, dev) if cfg.head == "ar" else None
    model.rope(dev)                                                   # built eagerly: the compiled graphs only read it
    slot = lambda i: torch.full((1,), i, dtype=torch.long, device=dev)   # a tensor: one graph serves every slot
    for t in range(L):   # feed only slot t: the class token at t = 0, else the codes sampled at position t - 1
        x = model.cls_embedding(y)[:, None] if t == 0 else model.embed(both(codes[:, :, t - 1:t]))   # (nB, 1, dim)
        # the residual stream in the weights' dtype (embed gives bf16 under autocast): the compiled step sees one dtype
        h = backbone(model, x.to(model.norm.weight.dtype), slot(t), caches)                              # (nB, dim)
        for j in range(k):   # head slot j: h_t, then E_j(c_j) alone; Tab. 4 baselines: the classifiers on h_t
            if cfg.head != "ar":
                logits = model.classify(model.norm(h), j)
            else:
                x = h if j == 0 else model.tok_embeddings[j - 1](both(codes[:, j - 1, t]))
                logits = model.classify(head(model, x[:, None], slot(j), head_caches), j)   # (nB, dim) -> (nB, V)
            codes[:, j, t] = pick(logits)


if __name__ == "__main__":   # `python fast.py --help` says what is here; the file itself is a library
    import argparse
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
