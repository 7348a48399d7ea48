"""Speed and memory of the quantizer lookup, IBQ, FAR sampling, the tokenizer training step and the tiny recipes.

Papers: FQGAN / FAR, arXiv 2411.16681 (Eq. 1 lookup, Sec. 3.3 sampling); IBQ, arXiv 2412.02692.
The "official" rows are written from the facts in docs/official_code.md (§1.5 quantizer, §8 IBQ, §6 FAR sampling),
not copied from the official code; the "reference" rows are quantizer.py's paper forms.

  python bench.py                  # every section but recipes, median of --repeats runs after one warm-up
  python bench.py --only lookup    # one section: lookup | ibq | far | train | train-dual | memory | recipes
  python bench.py --only lookup --threads 1,2 --busy 2   # the lookup on 1 and 2 threads, quiet and against 2
                                   # busy-loop processes (the default); other sections run on the last count
  python bench.py --only train-dual --profile            # FQGAN-Dual G step vs the official formulation
  python bench.py --only recipes   # time to quality: the tiny models' earlier recipes vs today's (~25 min; not in
                                   # the default run)
  python bench.py --only recipes --recipe tokenizer --seeds 0,1,2,3   # the tokenizer's, mean of four seeds (~37 min)
  python bench.py --quick          # every path once at small sizes (CI: tests/test_bench.py); no timing claims

Peak memory ("peak MiB") is the process's peak resident memory while the call runs minus its resident memory just
before (Linux VmHWM, reset through /proc/self/clear_refs): the extra memory the call needs, inputs excluded.
"""
import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import weakref

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

import far
import fast
import quantizer
import tokenizer
from checkpoints import keep_freed_memory, native_bf16, one_process_only, peak_mib
from fast import code_softmax, nearest_code
from losses import LPIPS, LossConfig, PatchGAN, generator_loss, info_nce
from quantizer import VectorQuantizer, distances, entropy_reference, ibq_reference, lookup_reference
from teachers import PhotoCNN
from tokenizer import PRESETS as TOKENIZER_PRESETS, Tokenizer, TokenizerConfig

SECTIONS = ("lookup", "ibq", "far", "train", "train-dual", "memory", "recipes")
LONG = ("recipes",)          # run by --only (and --quick) alone: tens of minutes


# ----------------------------------------------------------------------------------------------------------------
# Measuring

def machine():
    """'CPU model, cores, torch version, threads' for the table header."""
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    load = f", load {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads{load}"


def median_time(fn, repeats, warmup=True):
    """Median wall time of fn() over `repeats` runs after one warm-up run (unless done already), in seconds."""
    if warmup:
        fn()                                                          # first call: allocations, caches, lazy init
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gflops():
    """This machine's fp32 GEMM rate (2048^3 matmul), GFLOP/s: the compute bound of the lookup."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048**3 / median_time(lambda: a @ b, 3) / 1e9


ROWS = []  # (section, measurement, median seconds or None, result, peak MiB or None)


def row(section, what, seconds=None, result="", peak=None):
    """Record one table row and print it at once (long sections show progress)."""
    ROWS.append((section, what, seconds, result, peak))
    print(f"  {what}: {'' if seconds is None else f'{seconds:.4g} s '}{result}"
          f"{'' if peak is None else f' peak {peak:.0f} MiB'}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Lookup: one FQGAN sub-codebook per GPU batch (32 images x 16 x 16 tokens, K = 16384, d = 8), on each --threads
# count, on quiet cores and against --busy busy-loop processes

def official_vq_forward(vq, z):
    """The official quantizer's training forward (official_code.md §1.5) on a VectorQuantizer's weights, with
    its interface (z_q, losses, codes): the full N x K distances and their argmin (quantizer.lookup_reference), the
    entropy loss on softmax(-dist / T) over all K codes (quantizer.entropy_reference; the official log_softmax(A + 1e-5)
    equals log_softmax(A)), the official straight-through z + sg(z_q - z); autograd through all of it."""
    z = F.normalize(z.permute(0, 2, 3, 1).contiguous(), dim=-1)     # (B, d, h, w) -> (B, h, w, d)
    flat, e = z.view(-1, z.shape[-1]), F.normalize(vq.embedding.weight, dim=-1)   # (N, d), (K, d)
    dist = distances(flat, e)                                         # (N, K)
    codes = dist.argmin(1)                                            # lookup_reference, keeping dist for the entropy
    z_q = e[codes].view(z.shape)                                      # (N, d) -> (B, h, w, d)
    h_sample, h_code = entropy_reference(-dist, vq.entropy_temperature)
    losses = {"codebook": torch.mean((z_q - z.detach()) ** 2), "commit": vq.beta * torch.mean((z_q.detach() - z) ** 2),
              "entropy": vq.entropy_weight * (h_sample - h_code)}
    return (z + (z_q - z).detach()).permute(0, 3, 1, 2), losses, codes.view(z.shape[:-1])


class OfficialVQ(torch.nn.Module):
    """official_vq_forward on a VectorQuantizer's weights, to swap into a Tokenizer branch (same parameters)."""

    def __init__(self, vq):
        super().__init__()
        self.vq = vq

    def forward(self, z):
        return official_vq_forward(self.vq, z)                        # (z_q, losses, codes), as VectorQuantizer


SPIN = """import ctypes
try:
    ctypes.CDLL(None).prctl(1, 9)   # PR_SET_PDEATHSIG = 1, SIGKILL = 9: killed with bench.py, however it ends
except AttributeError:              # no prctl (not Linux)
    pass
while True: pass"""


@contextlib.contextmanager
def busy_loops(n, settle=2.0):
    """n other processes spinning `while True: pass`, as other jobs on a shared machine would: each in its own session,
    so that where the kernel shares CPU time per session (Linux autogroup) they take it from this one as jobs do.
    They end with the block, and on Linux with bench.py too, even when it is killed (SIGTERM, SIGKILL, a timeout)."""
    procs = [subprocess.Popen([sys.executable, "-c", SPIN], start_new_session=True) for _ in range(n)]
    try:
        time.sleep(settle if n else 0.0)                              # let them start and take the cores
        yield
    finally:
        for proc in procs:                                            # never leave a spinning process behind
            proc.kill()
            proc.wait()


def bench_lookup(args):
    b, grid, K, d = (2, 8, 1024, 8) if args.quick else (32, 16, 16384, 8)   # Tab. 1: K = 16384, d = 8
    n = b * grid * grid                                               # tokens per sub-codebook per batch
    print(f"lookup: N = {n} tokens, K = {K}, d = {d}, l2-normalised; threads {args.threads}, busy {args.busy}")
    torch.manual_seed(0)
    vq = VectorQuantizer(K, d).eval()
    vq.embedding.weight.data = F.normalize(torch.randn(K, d), dim=-1)   # spread codes (the init is near-uniform)
    z = torch.randn(b, d, grid, grid)
    flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, d), dim=-1)   # (B, d, h, w) -> (N, d), as vq does
    codebook = vq.codebook()                                          # (K, d), l2-normalised as in training
    with torch.no_grad():
        # the paper's form vs the fast one, on 1 and more threads, quiet and loaded (timed in turns: a change in the
        # machine's load slows both alike)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for busy in sorted({0, args.busy}):                       # quiet first, then against busy loops
                with busy_loops(busy, settle=0.2 if args.quick else 2.0):   # --quick: the code path, no timings
                    peak_full, full_codes = peak_mib(lambda: lookup_reference(flat, codebook))
                    peak_nc, _ = peak_mib(lambda: nearest_code(flat, codebook))
                    t_full, t_nc = interleaved_medians([lambda: lookup_reference(flat, codebook),
                                                        lambda: nearest_code(flat, codebook)], args.repeats)
                    at = f"{threads} thread{'s' * (threads > 1)}, {busy} busy-loop processes"
                    load = f"load {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
                row("lookup", f"quantizer.lookup_reference (N x K distances + argmin), {at}", t_full,
                    f"1.0x, {load}", peak_full)
                row("lookup", f"fast.nearest_code, {at}", t_nc, f"{t_full / t_nc:.1f}x, {load}", peak_nc)
                if busy == 0:
                    quiet = t_full, t_nc                              # kept for the rows below: the last count
        # on the last thread count, quiet: how far from the compute bound, and the training forward vs the official
        t_full, t_nc = quiet
        rate = gflops()                                               # the machine's fp32 matmul rate
        t_gemm = median_time(lambda: flat @ codebook.t(), args.repeats)
        row("lookup", "bare GEMM z @ C^T (N x K)", t_gemm, f"{t_full / t_gemm:.1f}x")
        bound = 2 * n * K * d / (rate * 1e9)                          # seconds for the 2NKd FLOPs of the distances
        row("lookup", f"compute bound 2NKd at {rate:.0f} GFLOP/s (2048^3 GEMM)", bound,
            f"{t_full / bound:.0f}x; nearest_code {t_nc / bound:.1f}x the bound")
        peak, (_, _, codes) = peak_mib(lambda: vq(z))
        t_vq = median_time(lambda: vq(z), args.repeats, warmup=False)
        same = torch.equal(codes.flatten(), full_codes)               # the module must agree with Eq. (1) exactly
        row("lookup", "VectorQuantizer forward (eval)", t_vq,
            f"{t_full / t_vq:.1f}x, indices {'identical' if same else 'DIFFERENT'}", peak)
        vq.train().entropy_weight = 0.03                             # the official scripts' entropy_loss_ratio
        t_off, t_vq_ent = interleaved_medians([lambda: official_vq_forward(vq, z), lambda: vq(z)], args.repeats)
        row("lookup", "official quantizer forward (training, entropy loss)", t_off, "1.0x")
        row("lookup", "VectorQuantizer forward (training, entropy loss)", t_vq_ent, f"{t_off / t_vq_ent:.1f}x official")


# ----------------------------------------------------------------------------------------------------------------
# IBQ: K = 2^18 codes of d = 256, forward + backward: quantizer.ibq_reference (autograd through N x K tensors) vs
# fast.code_softmax (row blocks, hand-written backward)

def ibq_step(fn, z, codebook, w):
    """Forward + backward of fn (ibq_reference or code_softmax) on tokens z (N, d): a fixed random "decoder" loss
    (z_q * w).sum() plus IBQ's entropy loss (weight 0.05). -> (dL/dz, dL/dC)."""
    z, codebook = z.detach().requires_grad_(), codebook.detach().requires_grad_()   # fresh leaves per call
    _, z_q, h_sample, h_code = fn(z, codebook)                        # (codes, z_q, entropy terms)
    ((z_q * w).sum() + 0.05 * (h_sample - h_code)).backward()
    return z.grad, codebook.grad


def bench_ibq(args):
    # IBQ's largest codebook (2^18 x 256); the reference compared at N = 256, where its N x K tensors still fit
    K, d, n_cmp, n_big = (2**12, 32, 64, 128) if args.quick else (2**18, 256, 256, 4096)
    print(f"ibq: K = {K}, d = {d}; reference vs code_softmax at N = {n_cmp}, code_softmax alone at N = {n_big}")
    torch.manual_seed(0)
    codebook, z, w = torch.randn(K, d), torch.randn(n_big, d), torch.randn(n_big, d)   # IBQ's N(0, 1) init
    fns = {"quantizer.ibq_reference (N x K tensors, autograd)": ibq_reference, "fast.code_softmax": code_softmax}
    # gradients of both at N/2, and the reference's peak there (for the extrapolation below)
    half, g_ref = peak_mib(lambda: ibq_step(ibq_reference, z[:n_cmp // 2], codebook, w[:n_cmp // 2]))
    g_ours = ibq_step(code_softmax, z[:n_cmp // 2], codebook, w[:n_cmp // 2])
    err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(g_ours, g_ref))   # both gradients
    peaks = [peak_mib(lambda: ibq_step(fn, z[:n_cmp], codebook, w[:n_cmp]))[0] for fn in fns.values()]
    times = interleaved_medians([lambda fn=fn: ibq_step(fn, z[:n_cmp], codebook, w[:n_cmp]) for fn in fns.values()],
                                args.repeats)
    for name, t, peak in zip(fns, times, peaks):                      # the reference row is the 1.0x
        result = "1.0x" if t is times[0] else f"{times[0] / t:.1f}x, grads: max rel. diff {err:.1e}"
        row("ibq", f"fwd+bwd N = {n_cmp}, {name}", t, result, peak)
    # the reference's peak grows linearly in N (all its big tensors are N x K): fit it from N/2 and N, extrapolate
    start = time.perf_counter()
    big, _ = peak_mib(lambda: ibq_step(code_softmax, z, codebook, w))
    if None not in (half, big, peaks[0]):
        extrapolated = peaks[0] + (peaks[0] - half) * (n_big - n_cmp) / (n_cmp // 2)
        row("ibq", f"fwd+bwd N = {n_big}, ibq_reference (extrapolated from N = {n_cmp // 2}, {n_cmp})", None, "",
            extrapolated)
        result = f"1 run, peak 1/{extrapolated / big:.0f} of the reference"
    else:
        result = "1 run"
    row("ibq", f"fwd+bwd N = {n_big}, fast.code_softmax", time.perf_counter() - start, result, big)


# ----------------------------------------------------------------------------------------------------------------
# FAR sampling: far.generate (static KV cache; eager and torch.compile) vs the official formulation, same weights

def official_block(block, x, rope, cache, pos, mask):
    """One block of the official KV-cached decode step (official_code.md §5.2, §6.1) on a far.Block's weights: k, v
    written at pos into the full-length cache, attention over every slot under the per-row boolean mask."""
    attn, (B, S, C) = block.attention, x.shape
    q, k, v = attn.wqkv(block.attention_norm(x)).split(C, -1)                  # q | k | v along the output dim
    q, k, v = (t.view(B, S, attn.n_head, C // attn.n_head) for t in (q, k, v))  # (B, S, dim) -> (B, S, H, D)
    q, k = far.apply_rope(q, rope), far.apply_rope(k, rope)                    # 2-D RoPE on q and k only
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))                           # (B, S, H, D) -> (B, H, S, D)
    cache[0][:, :, pos], cache[1][:, :, pos] = k, v                            # write this step's slot
    y = F.scaled_dot_product_attention(q, cache[0], cache[1], attn_mask=mask)
    x = x + attn.wo(y.transpose(1, 2).contiguous().view(B, S, C))             # (B, H, S, D) -> (B, S, dim)
    return x + block.feed_forward(block.ffn_norm(x))


@torch.no_grad()
def official_generate(model, labels, cfg_scale=2.0, temperature=1.0, generator=None):
    """FAR sampling as the official sampler formulates it (from official_code.md §6, not copied), on the weights
    of a far.FAR with the "ar" head; codes (n, k, h, w). §4.1 CFG batch [labels; null]. §4.2 backbone caches
    (2n, H, 1 + h*w rounded up to a multiple of 8, D) with a (2n, S, S) causal mask indexed at every step, and
    fresh zeroed full-length caches for every head block at every position. §4.3 logits in the model dtype,
    l_u + (l_c - l_u) s, / T, softmax, one multinomial per sub-code; eval defaults: no top-k / top-p."""
    cfg, n, dev = model.cfg, labels.shape[0], labels.device
    k, L, H, D = cfg.num_codebooks, cfg.grid[0] * cfg.grid[1], cfg.n_head, cfg.dim // cfg.n_head
    assert cfg_scale > 1.0 and cfg.head == "ar", "the official sampler needs CFG (official_code §6.2) and an AR head"
    model.eval()
    y = torch.cat([labels, torch.full_like(labels, cfg.num_classes)])       # (2n,): cond first, then null
    slots = -(-(1 + L) // 8) * 8                                              # max_seq, e.g. 257 -> 264
    zeros = lambda: torch.zeros(2 * n, H, slots, D, dtype=model.norm.weight.dtype, device=dev)
    caches = [(zeros(), zeros()) for _ in model.layers]
    causal = torch.tril(torch.ones(slots, slots, dtype=torch.bool, device=dev))[None].repeat(2 * n, 1, 1)
    rope = far.rope_2d(cfg.grid, D, cfg.rope_base).to(dev)                   # (1 + L, D/2, 2), rebuilt per setup
    codes = torch.zeros(n, k, L, dtype=torch.long, device=dev)               # filled position by position
    for t in range(L):                                                        # raster order over the h x w grid
        pos = torch.tensor([t], device=dev)
        if t == 0:
            x = model.cls_embedding(y)[:, None]                               # (2n, 1, dim)
        else:                                                                 # the previous step's codes, both halves
            prev = codes[:, :, t - 1].repeat(2, 1)                            # (n, k) -> (2n, k)
            x = model.aggregation_layer(torch.cat([e(prev[:, j]) for j, e in enumerate(model.tok_embeddings)],
                                                  -1))[:, None]              # (2n, k*dim) -> (2n, 1, dim)
        for block, cache in zip(model.layers, caches):
            x = official_block(block, x, rope[pos], cache, pos, causal[:, None, pos])  # mask (2n, 1, 1, slots)
        head_caches = [(zeros(), zeros()) for _ in model.ar_head]           # reallocated at every position
        z = x                                                                 # the backbone output starts the head
        for j in range(k):                                                    # sub-code j sees those < j (Sec. 3.3)
            jpos = torch.tensor([j], device=dev)
            if j > 0:
                z = model.tok_embeddings[j - 1](codes[:, j - 1, t].repeat(2))[:, None]  # (2n, 1, dim)
            for block, cache in zip(model.ar_head, head_caches):
                z = official_block(block, z, rope[jpos], cache, jpos, causal[:, None, jpos])
            cond, uncond = model.output[j](model.norm(z)).split(n)            # (2n, 1, V) -> 2 x (n, 1, V)
            probs = ((uncond + (cond - uncond) * cfg_scale)[:, -1] / temperature).softmax(-1)
            codes[:, j, t] = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return codes.view(n, k, *cfg.grid)                                        # (n, k, L) -> (n, k, h, w)


def interleaved_medians(fns, repeats):
    """Median wall times of each of fns after one warm-up each, timed in turns (f1, f2, ..., f1, f2, ...), so that
    a load that other processes put on the machine for a while slows every candidate alike."""
    for fn in fns:
        fn()                                                          # warm-up of every candidate first
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def bench_far_preset(args, preset, grid, batch, compile_, recompute):
    """Rows for one FAR preset: official formulation, generate eager, compiled, and without the cache."""
    from torch._dynamo.utils import counters                          # counts the graphs dynamo traces
    cfg = far.FARConfig(**{**far.PRESETS[preset], "grid": grid})
    torch.manual_seed(0)
    model = far.FAR(cfg).eval()
    for out in model.output:  # random classifiers: non-uniform logits, so that equal codes mean something
        torch.nn.init.normal_(out.weight, std=0.02)
    labels = torch.arange(batch) % cfg.num_classes                    # a mix of classes, like a sample grid
    tokens = batch * grid[0] * grid[1]                                # one token = one position, all k sub-codes
    gen = lambda: torch.Generator().manual_seed(0)                    # same seed: every candidate, same codes
    sample = lambda **kw: far.generate(model, labels, cfg_scale=2.0, generator=gen(), **kw)
    what = (f"{preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M), {grid[0]}x{grid[1]}, "
            f"batch {batch} + CFG, {tokens} tokens")
    official = lambda: official_generate(model, labels, generator=gen())
    # generate(compile=...): weights as graph inputs (True), or folded in as constants ("frozen", sample.py's CPU
    # --compile: fast.compiled)
    modes = [True, "frozen"] if compile_ else []
    compile_info = {}
    for mode in modes:  # compile first: the first call traces and compiles the two decode graphs
        graphs, start = counters["stats"]["unique_graphs"], time.perf_counter()
        codes = sample(compile=mode)
        compile_info[mode] = (time.perf_counter() - start, counters["stats"]["unique_graphs"] - graphs, codes)
    graphs = counters["stats"]["unique_graphs"]
    candidates = ([official, sample] + [lambda mode=mode: sample(compile=mode) for mode in modes]
                  + [lambda: sample(use_cache=False)] * recompute)
    t_off, t_cache, *rest = interleaved_medians(candidates, args.repeats)
    recompiles = counters["stats"]["unique_graphs"] - graphs         # graphs traced during the timed runs: 0
    ref = official()                                                  # codes to compare every variant with
    same = lambda codes: "identical" if torch.equal(codes, ref) else "DIFFERENT"
    row("far", f"{what}, official formulation", t_off, f"{tokens / t_off:.1f} tokens/s, 1.0x")
    row("far", f"{what}, generate (static KV cache)", t_cache,
        f"{tokens / t_cache:.1f} tokens/s, {t_off / t_cache:.2f}x official, codes {same(sample())}")
    for mode, t in zip(modes, rest):
        compile_s, n_graphs, codes = compile_info[mode]
        row("far", f"{what}, generate(compile={mode!r})", t,
            f"{tokens / t:.1f} tokens/s, {t_off / t:.2f}x official, {t_cache / t:.2f}x eager, codes {same(codes)}; "
            f"first call {compile_s:.0f} s, {n_graphs} graphs, {recompiles} recompiles after it")
    if recompute:
        row("far", f"{what}, generate(use_cache=False)", rest[-1],
            f"{tokens / rest[-1]:.1f} tokens/s, {t_off / rest[-1]:.2f}x official")


def bench_packed_linear(args, dims, blocks):
    """Rows: the Linears of `blocks` FAR blocks (q|k|v, out, the SwiGLU three) at each width, on the 16 rows of a
    decode step (batch 8 + CFG), F.linear against fast.packed_linears (its size limit PACK_MIN_ELEMS from these)."""
    for dim in dims:
        cfg = far.FARConfig(**{**far.PRESETS["tiny"], "dim": dim, "n_head": dim // 64 or 1, "n_layer": blocks})
        layers = torch.nn.ModuleList(far.Block(cfg) for _ in range(blocks))
        linears = [m for m in layers.modules() if isinstance(m, torch.nn.Linear)]
        xs = [torch.randn(16, 1, m.in_features) for m in linears]
        run = lambda: [m(x) for m, x in zip(linears, xs)]
        with torch.no_grad():
            t_plain = median_time(run, args.repeats)
            limit, fast.PACK_MIN_ELEMS = fast.PACK_MIN_ELEMS, 0          # pack every size, to see where it pays
            try:
                with fast.packed_linears(layers, 16):
                    t_packed = median_time(run, args.repeats)
            finally:
                fast.PACK_MIN_ELEMS = limit
        row("far", f"{len(linears)} Linears of {blocks} blocks at dim {dim} ({dim * dim:,} to {3 * dim * dim:,} "
            f"elements), 16 rows, packed", t_packed, f"{t_plain / t_packed:.2f}x F.linear ({t_plain * 1e3:.2f} ms)")


def bench_far(args):
    """FAR sampling rows: tiny at its own grid, FAR-B at full size on a short grid; packed Linears by width."""
    print("far: sampling with CFG (scale 2), random weights, fp32; official = official_code.md §6 on the same weights")
    if args.quick:
        bench_far_preset(args, "tiny", (2, 2), 2, args.compile, True)
        bench_packed_linear(args, (64,), 1)
        return
    bench_packed_linear(args, (128, 256, 512, 1024), 8)
    bench_far_preset(args, "tiny", (8, 8), 8, args.compile, True)
    # FAR-B at full width and depth; a 4 x 4 grid = the first 16 positions of a 16 x 16 image at the same cost,
    # except attention over the longer cache (small next to the GEMMs of 24 + 3 blocks at 1024 wide)
    bench_far_preset(args, "far-b", (4, 4), 8, args.compile, False)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer training step (tiny): forward + generator_loss + backward + Adam, eager (fp32, bf16) vs torch.compile

def bench_train(args):
    """The tiny tokenizer's training step (forward, losses, backward, Adam): eager in fp32 and under bf16 autocast,
    and compiled; and in fp32 on tiny64, the 64-channel trunk the tiny preset had until 2026-12-06."""
    batch = 2 if args.quick else 16                                   # 16: the tiny recipe's batch
    cfg = TokenizerConfig(**TOKENIZER_PRESETS["tiny"])
    print(f"train: tiny tokenizer, batch {batch} at {cfg.image_size} px, G step (D forward inside the G loss)")
    torch.manual_seed(0)
    raw, disc = Tokenizer(cfg), PatchGAN()
    opt = torch.optim.Adam(raw.parameters(), lr=2e-4, betas=(0.9, 0.95), fused=True)   # as train_tokenizer.py
    loss_cfg = LossConfig(perceptual_weight=0.0, gan_start=400)      # train_tokenizer.py's tiny defaults
    x = torch.rand(batch, 3, cfg.image_size, cfg.image_size) * 2 - 1   # random images in [-1, 1]

    def step(model, bf16=False, optimizer=opt):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):   # the forward only, as train_tokenizer.py
            x_rec, aux = model(x)
            g = generator_loss(x, x_rec, aux, 0, disc=disc, cfg=loss_cfg)
        optimizer.zero_grad(set_to_none=True)
        g["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    t_eager = median_time(lambda: step(raw), args.repeats)
    row("train", "tiny tokenizer step, eager", t_eager, f"{batch / t_eager:.1f} images/s")
    # the optimizer step alone (the gradients of the last step): torch's default on a CPU updates one tensor at a time
    # (foreach and fused are its CUDA defaults); train_tokenizer.py asks for fused, one kernel over all tensors
    opts = [torch.optim.Adam(raw.parameters(), lr=0.0, betas=(0.9, 0.95), **kw) for kw in ({}, {"fused": True})]
    t_loop, t_fused = interleaved_medians([o.step for o in opts], max(args.repeats, 21))   # lr 0: weights stay
    row("train", f"tiny tokenizer Adam step alone ({len(opts[0].param_groups[0]['params'])} tensors), torch's CPU "
        "default (one tensor at a time)", t_loop, "1.00x")
    row("train", "tiny tokenizer Adam step alone, fused=True (train_tokenizer.py)", t_fused,
        f"{t_loop / t_fused:.2f}x the default, {t_fused / t_eager:.1%} of the step")
    old = Tokenizer(TokenizerConfig(**TOKENIZER_PRESETS["tiny64"]))  # 64 channels: the shipped weights' trunk
    old_opt = torch.optim.Adam(old.parameters(), lr=2e-4, betas=(0.9, 0.95), fused=True)
    t_old = median_time(lambda: step(old, optimizer=old_opt), args.repeats)
    row("train", "tiny64 tokenizer step, eager", t_old, f"{batch / t_old:.1f} images/s; tiny takes "
        f"{t_eager / t_old:.2f}x its time")
    # bf16 autocast costs what the CPU's instructions make of it: the tiny recipes' --precision auto takes it only
    # where checkpoints.native_bf16 finds AVX512-BF16 or AMX (elsewhere oneDNN converts every operand to fp32 and back)
    t_bf16 = median_time(lambda: step(raw, bf16=True), args.repeats)
    auto = "bf16" if native_bf16(torch.device("cpu")) else "fp32"
    row("train", "tiny tokenizer step, eager, bf16 autocast", t_bf16,
        f"{batch / t_bf16:.1f} images/s, {t_eager / t_bf16:.2f}x fp32; this CPU's --precision auto: {auto}")
    if args.compile:
        model = torch.compile(raw)                                    # raw stays the uncompiled module
        start = time.perf_counter()
        step(model)
        compile_s = time.perf_counter() - start
        t_comp = median_time(lambda: step(model), args.repeats)
        row("train", "tiny tokenizer step, torch.compile", t_comp,
            f"{batch / t_comp:.1f} images/s, {t_eager / t_comp:.2f}x eager, compile {compile_s:.0f} s")


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer generator step of FQGAN-Dual f16 (Tab. 1) at batch 2, 256 px: ours against the official formulation on the
# same model and weights, i.e. the official quantizer (official_vq_forward) swapped into each branch, swish as two
# ops, x * sigmoid(x) (official_code.md §1.3; tokenizer.swish is the fused F.silu) and the decoder's up-sampling as
# nearest 2x then the 3x3 conv (tokenizer.upsample_conv: four 2x2 convs of the input on a CPU), every activation in
# the layout it comes in (tokenizer.conv_layout: channels-last under bf16 on a CPU with AMX). Losses: MSE +
# quantizer terms + Eq. (7) (no LPIPS, D or teacher: their weights are not available offline); forward + backward,
# no optimizer step.
# Precision: the official scripts' autocast is torch.cuda.amp's, which does nothing on a CPU, so the official step runs
# fp32 here; ours runs fp32 and under CPU bf16 autocast (train_tokenizer.py --precision bf16, the tiny recipes' setting
# on a CPU with bf16 instructions), and the official formulation under the same bf16 autocast is timed too, for the
# like-for-like ratio.
# Allocator: our scripts keep freed memory on a CPU (checkpoints.keep_freed_memory), the official ones run on glibc's
# default; the variants are timed in one child process per allocator, the ratios against the official
# formulation on glibc's default, as it runs.

# With --compile (the default), the kept-memory child also times ours under torch.compile of the tokenizer (what
# train_tokenizer.py --compile does), interleaved with the eager steps; its first call (the compile) is reported apart.
# The decoder's up-sampling convs are also timed alone, plain against regrouped (fast.upsample_conv), on NCHW input.
# "ours, bf16 autocast, without conv_layout": ours as before 2026-12-07, every activation in the layout it comes in
# (NCHW, but for the decoder's 16-px blocks, channels-last from the quantizer's permute) and the up-sampling always
# regrouped: what tokenizer.conv_layout's channels-last activations (on a CPU with AMX) give under bf16.
DUAL_VARIANTS = ("official formulation, fp32", "ours, fp32", "official formulation, bf16 autocast",
                 "ours, bf16 autocast", "ours, bf16 autocast, without conv_layout")
DUAL_COMPILED = ("ours, fp32, torch.compile", "ours, bf16 autocast, torch.compile")


def plain_upsample_conv(x, conv):
    """The decoder's up-sampling as the official code writes it: nearest 2x, then the 3x3 conv on the 4x tensor."""
    return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def regrouped_upsample_conv(x, conv):
    """The decoder's up-sampling as four 2x2 convs of the input (fast.upsample_conv) in any layout: ours before
    2026-12-07, and the form tokenizer.upsample_conv takes on a CPU but for channels-last bf16 on AMX."""
    return fast.upsample_conv(x, conv.weight, conv.bias)


def dual_times(args):
    """{variant: median seconds} of FQGAN-Dual's G step in this process (bench_train_dual's child)."""
    preset, batch, size = ("tiny", 1, 64) if args.quick else ("fqgan-dual-16", 2, 256)
    cfg = TokenizerConfig(**{**TOKENIZER_PRESETS[preset], "image_size": size})
    torch.manual_seed(0)
    tok = Tokenizer(cfg).train()
    x = torch.rand(batch, 3, size, size) * 2 - 1
    ours = [branch.quantize for branch in tok.branches]
    as_is = lambda t: t                                                                    # (quantizers, swish,
    official = ([OfficialVQ(q) for q in ours], lambda t: t * torch.sigmoid(t), plain_upsample_conv, as_is)
    mine = (ours, tokenizer.swish, tokenizer.upsample_conv, tokenizer.conv_layout)      # upsample conv, layout)
    variants = dict(zip(DUAL_VARIANTS, [(official, False), (mine, False), (official, True), (mine, True),
                                        ((ours, tokenizer.swish, regrouped_upsample_conv, as_is), True)]))

    def step(parts, bf16, model=tok):
        forms = ("swish", "upsample_conv", "conv_layout")            # the blocks look the names up at every call
        quantizers, fast_forms = parts[0], [getattr(tokenizer, name) for name in forms]
        for branch, q in zip(tok.branches, quantizers):              # swap the quantizers, keep every weight
            branch.quantize = q
        for name, form in zip(forms, parts[1:]):
            setattr(tokenizer, name, form)
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                x_rec, aux = model(x)
                loss = generator_loss(x, x_rec, aux, 0, cfg=LossConfig())["total"]
            tok.zero_grad(set_to_none=True)
            loss.backward()
        finally:
            for name, form in zip(forms, fast_forms):
                setattr(tokenizer, name, form)
    first_calls = {}
    if args.compile:                 # the compiled module shares tok's weights and only ever runs ours (mine)
        compiled = torch.compile(tok)
        variants.update(zip(DUAL_COMPILED, [(mine, False, compiled), (mine, True, compiled)]))
        for name in DUAL_COMPILED:
            start = time.perf_counter()
            step(*variants[name])                                     # the compile, timed apart from the medians
            first_calls[name] = time.perf_counter() - start
    times = dict(zip(variants, interleaved_medians([lambda v=v: step(*v) for v in variants.values()], args.repeats)))
    upsample = upsample_times(tok, x, args.repeats)
    if args.profile:                                                  # where the time goes: top ops by self CPU time
        for name, variant in variants.items():
            with torch.profiler.profile() as prof:
                step(*variant)
            print(f"{name}:\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return {"preset": preset, "batch": batch, "size": size, "times": times, "first_calls": first_calls,
            "upsample": upsample}


def upsample_times(tok, x, repeats):
    """{precision: [(C, side in, plain s, regrouped s)]}: forward + backward of each up-sampling conv of tok's decoder
    alone, at the input it gets from x (caught by a forward hook), the plain form against the regrouped one."""
    shapes, hooks = [], [m.register_forward_hook(lambda m, inputs, out: shapes.append((m, inputs[0].shape)))
                         for m in tok.modules() if isinstance(m, tokenizer.Resample) and m.kind == "upsample"]
    with torch.no_grad():
        tok(x)
    for h in hooks:
        h.remove()

    def run(up, resample, t, bf16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = up(t, resample.conv)
        y.backward(torch.ones_like(y))
    res = {}
    for precision, bf16 in (("fp32", False), ("bf16 autocast", True)):
        res[precision] = []
        for resample, shape in shapes:
            t = torch.randn(shape, requires_grad=True)
            pair = interleaved_medians([lambda up=up: run(up, resample, t, bf16)
                                        for up in (plain_upsample_conv, regrouped_upsample_conv)], repeats)
            res[precision].append((shape[1], shape[2], *pair))
    tok.zero_grad(set_to_none=True)
    return res


def bench_train_dual(args):
    """FQGAN-Dual's G step: ours vs the official formulation swapped into the same model, fp32 and bf16 autocast,
    on glibc's default allocator and with freed memory kept (one child process each)."""
    res = {}
    for keep in ("0", "1"):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "times.json")
            subprocess.run([sys.executable, os.path.abspath(__file__), "--dual-child", out, "--repeats",
                            str(args.repeats), "--threads", str(args.threads[-1])] + ["--quick"] * args.quick
                           + ["--profile"] * args.profile + ["--compile" if args.compile and keep == "1"
                                                             else "--no-compile"], check=True,
                           env={**os.environ, "FQGAN_KEEP_FREED_MEMORY": keep})
            res[keep] = json.load(open(out))
    info = res["0"]
    print(f"train-dual: {info['preset']}, batch {info['batch']} at {info['size']} px, G step (forward + "
          f"MSE/quantizer/Eq. 7 + backward)")
    base = res["0"]["times"]
    for keep, label in (("0", "glibc's default allocator"), ("1", "freed memory kept (our scripts)")):
        t = res[keep]["times"]
        for name in DUAL_VARIANTS:
            same = ""
            if name.startswith("ours"):                               # like for like: the same precision and allocator
                other = t["official formulation, " + ("bf16 autocast" if "bf16" in name else "fp32")]
                same = f", {other / t[name]:.2f}x official at the same precision and allocator"
            row("train-dual", f"{info['preset']} G step, {name}, {label}", t[name],
                f"{base['official formulation, fp32'] / t[name]:.2f}x official fp32 on glibc's default{same}")
    for precision, convs in res["1"]["upsample"].items():             # the up-sampling convs alone, memory kept
        plain, ours = (sum(c[i] for c in convs) for i in (2, 3))
        per = " / ".join(f"{c[2] / c[3]:.2f}x at {c[0]} ch {c[1]}->{2 * c[1]}" for c in convs)
        row("train-dual", f"{info['preset']} decoder's {len(convs)} up-sampling convs (fwd + bwd), nearest 2x + 3x3 "
            f"conv, {precision}", plain, "1.00x")
        row("train-dual", f"{info['preset']} decoder's {len(convs)} up-sampling convs (fwd + bwd), "
            f"four 2x2 convs (fast.upsample_conv), {precision}", ours, f"{plain / ours:.2f}x ({per})")
    t = res["1"]["times"]
    for name, first in res["1"]["first_calls"].items():              # with --compile: ours compiled, kept memory
        eager = t[name.replace(", torch.compile", "")]
        row("train-dual", f"{info['preset']} G step, {name}, freed memory kept (our scripts)", t[name],
            f"{base['official formulation, fp32'] / t[name]:.2f}x official fp32 on glibc's default, "
            f"{eager / t[name]:.2f}x ours eager; first call (the compile) {first:.0f} s")


# ----------------------------------------------------------------------------------------------------------------
# Time to quality of the tiny models (only with --only recipes: ~25 min on 2 cores): the README's two training commands
# with today's recipes against the recipes before 2026-12-05 (the tokenizer's on the 64-channel trunk it had then,
# --preset tiny64), restored by flags, one run after the other in fresh folders, as subprocesses: wall clock from
# start to exit (the wait of a user), and the final held-out number from log.jsonl, the tokenizer's val_psnr_ema (dB,
# bundled val strips) and FAR's held-out NLL in bits per sub-code. With --seeds each command runs once per seed (its
# --seed) and the row gives the means, every seed's number beside them. Code speed-ups that no flag can undo
# (tokenizer.swish as one fused op, tokenizer.upsample_conv, fast.sdpa_backend, the tokenizer's fused Adam) are in both
# rows.

RECIPES = {  # model -> (script, flags that restore the recipe before 2026-12-05)
    "tiny tokenizer": ("train_tokenizer.py", ["--preset", "tiny64", "--precision", "bf16", "--max-steps", "600",
                                              "--low-res-steps", "0", "--ema-decay", "0.99", "--cache-mib", "0"]),
    "tiny FAR": ("train_far.py", ["--precision", "fp32", "--lr", "1e-3", "--warmup-steps", "0", "--max-steps", "600"]),
}
# --quick: today's recipe alone, a few steps (the earlier one runs the same code with other flags, which
# tests/test_bench.py parses)
QUICK_FLAGS = {"tiny tokenizer": ["--max-steps", "2", "--low-res-steps", "1", "--global-batch-size", "4"],
               "tiny FAR": ["--max-steps", "2", "--augment", "none", "--global-batch-size", "4"]}


def final_number(log_path, model):
    """The last held-out number of a run's log.jsonl: val_psnr_ema (tokenizer) or the mean of val_bits/j (FAR)."""
    with open(log_path) as f:
        records = [json.loads(line) for line in f]
    if model == "tiny tokenizer":
        return next(r["val_psnr_ema"] for r in reversed(records) if "val_psnr_ema" in r), "dB"
    bits = next(r for r in reversed(records) if "val_bits/0" in r and r["step"] > 0)
    return statistics.mean(v for k, v in bits.items() if k.startswith("val_bits/")), "bits"


def train_once(model, script, flags, seed):
    """One run of a training command in a fresh folder: (wall-clock seconds, final held-out number, its unit)."""
    with tempfile.TemporaryDirectory() as out:
        argv = [sys.executable, script, "--out-dir", out, "--seed", str(seed), *flags]
        start = time.perf_counter()
        with open(os.path.join(out, "stdout.txt"), "w") as log:         # tqdm and prints, kept out of the table
            subprocess.run(argv, cwd=os.path.dirname(os.path.abspath(__file__)), check=True, stdout=log,
                           stderr=subprocess.STDOUT)
        return (time.perf_counter() - start, *final_number(os.path.join(out, "log.jsonl"), model))


def bench_recipes(args):
    """Each tiny model trained with the earlier recipe and with today's, once per --seeds seed: mean minutes and mean
    held-out quality (a tiny run's final PSNR spreads over 0.6-0.7 dB from seed to seed: docs/results.md)."""
    print("recipes: the README's training commands, " + ("today's recipe for a few steps (--quick)" if args.quick else
          "the recipe before 2026-12-05 (restored by flags) vs today's") + f", seeds {','.join(map(str, args.seeds))}")
    for model, (script, before) in RECIPES.items():
        if args.recipe and not model.lower().endswith(args.recipe):
            continue
        means = []
        for name, flags in (("today", QUICK_FLAGS[model]),) if args.quick else (("before", before), ("today", [])):
            runs = []                                                   # (seconds, value, unit) per seed
            for seed in args.seeds:
                runs.append(train_once(model, script, flags, seed))
                print(f"    {model}, recipe {name}, seed {seed}: {runs[-1][0]:.1f} s, held-out {runs[-1][1]:.2f} "
                      f"{runs[-1][2]}", flush=True)                       # progress: a run takes minutes
            seconds, value = statistics.mean(r[0] for r in runs), statistics.mean(r[1] for r in runs)
            means.append(seconds)
            each = f" (seeds: {' / '.join(f'{r[1]:.2f}' for r in runs)})" if len(runs) > 1 else ""
            faster = f", {means[0] / seconds:.2f}x faster" if len(means) == 2 else ""
            row("recipes", f"{model}, recipe {name}: python {script} {' '.join(flags)}".rstrip(), seconds,
                f"{seconds / 60:.1f} min, held-out {value:.2f} {runs[0][2]}{each}{faster}")


# ----------------------------------------------------------------------------------------------------------------
# Peak GPU memory of each paper preset's training step at the paper's per-GPU batch (Sec. 4.1: 256 images on 8 GPUs),
# estimated on the CPU: the step runs on fake tensors (shapes and dtypes, no data, no compute) under bf16 autocast, with
# the quantizers' paper forms (what a compiled CUDA run takes), and torch's MemTracker counts the bytes of the tensors
# alive at the peak: weights, EMA, activations saved for backward, gradients. What the fake step does not hold is added
# from the parameter counts: Adam / AdamW moments (8 bytes per trained parameter), DDP's gradient buckets (4) and the
# frozen teachers in bf16 (2). Not counted: the CUDA context and the caching allocator's slack (~1-3 GB), cuDNN
# workspaces, and inductor's fusion (compiled runs need less activation memory than this eager count).

GPU_GB, BATCH_PER_GPU = (80, 40, 24), 256 // 8


class PeakBytes(TorchDispatchMode):
    """Counts the bytes of every storage an op creates until it is freed, and the peak of their sum (fake tensors
    too: a storage's size is known without its data). Module-agnostic, unlike torch's MemTracker, which hooks the
    parameters of every module it sees and fails on frozen ones (LPIPS, the EMA)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.seen = 0, 0, WeakIdKeyDictionary()

    def _free(self, n):
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (x for x in torch.utils._pytree.tree_leaves(out) if isinstance(x, torch.Tensor)):
            storage = t.untyped_storage()
            if storage not in self.seen:                              # new storage: in-place ops and views are not
                self.seen[storage] = n = storage.nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, n)
        return out


def fake_peak_bytes(build):
    """build() -> step: both run on fake tensors; the peak bytes of all tensors alive, from build() through step()."""
    with FakeTensorMode(), PeakBytes() as tracker:                    # every allocation, the weights' included
        build()()
    return tracker.peak


def teacher_params(spec):
    """Parameter count of a frozen teacher spec (teachers.py), built on the meta device: no weights needed."""
    import open_clip                                                  # here, not at the top: 4 s per bench process
    import timm
    kind, _, name = spec.partition(":")
    if kind == "openclip":
        return sum(p.numel() for p in open_clip.create_model(name.partition(":")[0], device="meta").visual.parameters())
    with torch.device("meta"):                                        # cnn: the offline stand-in (teachers.py)
        net = PhotoCNN() if kind == "cnn" else timm.create_model(name, pretrained=False, num_classes=0)
    return sum(p.numel() for p in net.parameters())


def tokenizer_step(cfg, batch):
    """The generator step of train_tokenizer.py at the paper recipe (LPIPS, GAN on, Eq. 7, L_rep with a stand-in
    teacher feature), forward + backward; the EMA copy is alive throughout."""
    def build():
        # every module a training process holds on its GPU (the teachers are counted from their sizes below)
        tok, ema, disc, lpips = Tokenizer(cfg), Tokenizer(cfg), PatchGAN(), LPIPS(pretrained=False)
        ema.requires_grad_(False)

        def step():
            x = torch.randn(batch, 3, *cfg.image_shape)                 # one GPU's share of the global batch
            with torch.autocast("cpu", dtype=torch.bfloat16):           # CPU autocast: CUDA's bf16 lists, nearly
                x_rec, aux = tok(x)
                # at gan_start the GAN term is on: D's forward on x_rec is part of the G step's graph
                g = generator_loss(x, x_rec, aux, LossConfig().gan_start, lpips=lpips, disc=disc)
                # the teacher's CLS feature: a stand-in of its width (a frozen forward adds only transient memory)
                rep = [info_nce(f[:, 0], torch.randn(batch, f.shape[-1])) for f in aux["features"].values()]
            (g["total"] + 0.5 * sum(rep)).backward()                    # the peak: activations + gradients
        return step
    trained = sum(p.numel() for p in Tokenizer(cfg).parameters()) + sum(p.numel() for p in PatchGAN().parameters())
    frozen = sum(teacher_params(t) for t in cfg.teachers if t)
    return fake_peak_bytes(build), trained, 2 * frozen


def far_step(cfg, batch):
    """train_far.py's step: forward (teacher forcing), mean CE over the k sub-codes, backward."""
    def build():
        model = far.FAR(cfg)                                             # fp32 weights; autocast computes in bf16

        def step():
            codes = torch.randint(0, cfg.codebook_size, (batch, cfg.num_codebooks, *cfg.grid))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = far.far_loss(model(codes, torch.randint(0, cfg.num_classes, (batch,))), codes)["loss"]
            loss.backward()
        return step
    with torch.device("meta"):
        trained = sum(p.numel() for p in far.FAR(cfg).parameters())
    return fake_peak_bytes(build), trained, 0


def bench_memory(args):
    """Estimated peak GPU memory per GPU of every paper preset's training step (see the section comment)."""
    batch = 2 if args.quick else BATCH_PER_GPU
    tok_presets = ["tiny-dual"] if args.quick else [p for p in TOKENIZER_PRESETS if not p.startswith("tiny")]
    far_presets = [("tiny", 11)] if args.quick else [("far-b", 1000), ("far-l", 1000)]
    print(f"memory: training step per GPU at batch {batch}, bf16 autocast, fake tensors (estimate, no GPU used)")
    quantizer.FAST = False                                         # a compiled run takes the paper's forms
    try:
        steps = [(f"tokenizer {p}", lambda p=p: tokenizer_step(TokenizerConfig(**TOKENIZER_PRESETS[p]), batch))
                 for p in tok_presets]
        steps += [(f"FAR {p}, {c} classes", lambda p=p, c=c: far_step(far.FARConfig(**{**far.PRESETS[p],
                   "num_classes": c}), batch)) for p, c in far_presets]
        for preset, fn in steps:
            start = time.perf_counter()
            peak, trained, frozen = fn()
            total = (peak + 12 * trained + frozen) / 2**30              # + moments (8 B) and DDP buckets (4 B)
            fits = " ".join(f"{gb}:{'yes' if total < gb else 'no'}" for gb in GPU_GB)
            row("memory", f"{preset} train step, batch {batch}/GPU", time.perf_counter() - start,
                f"{total:.1f} GiB = {peak / 2**30:.1f} step + {12 * trained / 2**30:.1f} Adam/DDP + "
                f"{frozen / 2**30:.1f} teachers; fits {fits} GB")
    finally:
        quantizer.FAST = True


# ----------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=SECTIONS, default=None,
                   help=f"run one section (default: all but {', '.join(LONG)})")
    p.add_argument("--quick", action="store_true", help="every path once at small sizes (CI); no timing claims")
    p.add_argument("--repeats", type=int, default=None, help="timed runs after the warm-up (default 5; quick 1)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile (FAR decode step, tokenizer step); default on, off with --quick")
    p.add_argument("--threads", default=f"1,{os.cpu_count()}",
                   help="comma-separated torch.set_num_threads counts: the lookup runs on each, the other sections "
                        "on the last (default: 1 and all cores)")
    p.add_argument("--busy", type=int, default=None,
                   help="also time the lookup against this many busy-loop processes (default 2; quick 0)")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of each train-dual step")
    p.add_argument("--seeds", default="0", help="comma-separated --seed values of the recipes section: each recipe "
                   "runs once per seed, its row gives the means (default: %(default)s)")
    p.add_argument("--recipe", choices=("tokenizer", "far"), default=None,
                   help="the recipes section times only this model (default: both)")
    p.add_argument("--dual-child", metavar="JSON", help=argparse.SUPPRESS)   # bench_train_dual's child: times -> JSON
    args = p.parse_args(argv)
    one_process_only(p)
    # --quick: one run of each path, no compile, no busy loops (CI checks the code runs, not its speed)
    args.repeats = (1 if args.quick else 5) if args.repeats is None else args.repeats
    args.compile = (not args.quick) if args.compile is None else args.compile
    args.busy = (0 if args.quick else 2) if args.busy is None else args.busy
    try:
        args.threads = sorted({int(t) for t in args.threads.split(",")})
    except ValueError:
        p.error(f"--threads must be a comma-separated list of integers, got {args.threads!r}")
    try:
        args.seeds = list(dict.fromkeys(int(s) for s in args.seeds.split(",")))   # in the given order, no repeats
    except ValueError:
        p.error(f"--seeds must be a comma-separated list of integers, got {args.seeds!r}")
    if args.repeats < 1 or args.threads[0] < 1 or args.busy < 0:
        p.error(f"--repeats and --threads must be positive and --busy >= 0, got {args.repeats}, {args.threads} and "
                f"{args.busy}")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads[-1])
    if args.dual_child:                                               # one allocator's train-dual timings
        keep_freed_memory()                                           # as our scripts do, unless the env says 0
        with open(args.dual_child, "w") as f:
            json.dump(dual_times(args), f)
        return []
    ROWS.clear()                                                      # main() may be called twice (tests)
    header = machine()
    print(header, flush=True)
    for name in (args.only,) if args.only else [s for s in SECTIONS if args.quick or s not in LONG]:
        torch.set_num_threads(args.threads[-1])                       # the lookup section changes it
        globals()[f"bench_{name.replace('-', '_')}"](args)
    timed = (f"recipes: mean of seeds {','.join(map(str, args.seeds))}" if args.only == "recipes" else
             f"median of {args.repeats} runs after 1 warm-up")
    print(f"\n{header}; {timed}{' (--quick)' if args.quick else ''}\n")
    # the Markdown table that docs/results.md quotes
    print("| section | measurement | median | result | peak MiB |\n|---|---|---|---|---|")
    for section, what, seconds, result, peak in ROWS:
        print(f"| {section} | {what} | {'' if seconds is None else f'{seconds:.3g} s'} | {result} | "
              f"{'' if peak is None else f'{peak:.0f}'} |")
    return list(ROWS)


if __name__ == "__main__":
    main()
