"""Speed and memory of the quantizer lookup, IBQ, FAR sampling and the tokenizer training step (one table).

Papers: FQGAN / FAR, arXiv 2411.16681 (Eq. 1 lookup, Sec. 3.3 sampling); IBQ, arXiv 2412.02692.
The "official" and "full-matrix" rows are written from the specifications in ../shared/reference/
(fqgan_tokenizer_spec.md §1.6, ibq_lfq_spec.md §1.6), not copied from the official code.

  python bench.py                  # every section, median of --repeats runs after one warm-up
  python bench.py --only lookup    # one section: lookup | ibq | far | train
  python bench.py --quick          # every path once at small sizes (CI: tests/test_bench.py); no timing claims

Peak memory ("peak MiB") is the process's peak resident memory while the call runs minus its resident memory just
before (Linux VmHWM, reset through /proc/self/clear_refs): the extra memory the call needs, inputs excluded.
"""
import argparse
import ctypes
import os
import platform
import re
import statistics
import time

import torch
import torch.nn.functional as F

import far
from losses import LossConfig, PatchGAN, generator_loss
from quantizer import IBQuantizer, VectorQuantizer, nearest_code
from tokenizer import PRESETS as TOKENIZER_PRESETS, Tokenizer, TokenizerConfig

SECTIONS = ("lookup", "ibq", "far", "train")


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
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _status_mib(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) / 1024


def peak_mib(fn):
    """(extra peak resident memory in MiB, return value) of one fn() call; the peak is None where /proc cannot
    measure it (not Linux). Used as the warm-up run of median_time."""
    try:
        # hand freed heap pages back first, so that memory reused from an earlier call counts as new
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                              # resets the peak (VmHWM) to the current RSS
        before = _status_mib("VmRSS")
    except (OSError, AttributeError):
        return None, fn()
    out = fn()
    return _status_mib("VmHWM") - before, out


def gflops():
    """This machine's fp32 GEMM rate (2048^3 matmul), GFLOP/s: the compute bound of the lookup."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048**3 / median_time(lambda: a @ b, 3) / 1e9


ROWS = []  # (section, measurement, median seconds or None, result, peak MiB or None)


def row(section, what, seconds=None, result="", peak=None):
    ROWS.append((section, what, seconds, result, peak))
    print(f"  {what}: {'' if seconds is None else f'{seconds:.4g} s '}{result}"
          f"{'' if peak is None else f' peak {peak:.0f} MiB'}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Lookup: one FQGAN sub-codebook per GPU batch (32 images x 16 x 16 tokens, K = 16384, d = 8)

def full_matrix_codes(z, codebook):
    """Eq. (1) as the official code writes it: the whole N x K distance matrix, then argmin."""
    return (z.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * z @ codebook.t()).argmin(1)


def official_vq_forward(z, weight, beta=0.25, entropy_ratio=0.03, tau=0.01):
    """The official quantizer's training forward (fqgan_tokenizer_spec.md §1.6): full distances, argmin, losses,
    the entropy loss on softmax(-dist / tau) over all K codes, straight-through."""
    z = F.normalize(z.permute(0, 2, 3, 1).contiguous(), dim=-1)     # (B, d, h, w) -> (B, h, w, d)
    flat, e = z.view(-1, z.shape[-1]), F.normalize(weight, dim=-1)   # (N, d), (K, d)
    dist_ = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * torch.einsum("bd,dn->bn", flat, e.t())
    codes = dist_.argmin(1)
    z_q = e[codes].view(z.shape)
    losses = [torch.mean((z_q - z.detach()) ** 2), beta * torch.mean((z_q.detach() - z) ** 2)]
    logits = -dist_ / tau
    p, logp = logits.softmax(-1), (logits + 1e-5).log_softmax(-1)
    p_mean = p.mean(0)
    losses.append(entropy_ratio * (-(p * logp).sum(-1).mean() + (p_mean * (p_mean + 1e-5).log()).sum()))
    return (z + (z_q - z).detach()).permute(0, 3, 1, 2), losses, codes


def bench_lookup(args):
    b, grid, k, d = (2, 8, 1024, 8) if args.quick else (32, 16, 16384, 8)
    n = b * grid * grid
    print(f"lookup: N = {n} tokens, K = {k}, d = {d}, l2-normalised")
    torch.manual_seed(0)
    vq = VectorQuantizer(k, d).eval()
    vq.embedding.weight.data = F.normalize(torch.randn(k, d), dim=-1)   # spread codes (the init is near-uniform)
    z = torch.randn(b, d, grid, grid)
    flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, d), dim=-1)   # (B, d, h, w) -> (N, d), as vq does
    codebook = vq.codebook()
    rate = gflops()
    with torch.no_grad():
        t_off = median_time(lambda: official_vq_forward(z, vq.embedding.weight), args.repeats)
        row("lookup", "official quantizer forward (training, entropy loss)", t_off)
        peak, full_codes = peak_mib(lambda: full_matrix_codes(flat, codebook))
        t_full = median_time(lambda: full_matrix_codes(flat, codebook), args.repeats, warmup=False)
        row("lookup", "full N x K distance matrix + argmin", t_full, "1.0x", peak)
        t_gemm = median_time(lambda: flat @ codebook.t(), args.repeats)
        row("lookup", "bare GEMM z @ C^T (N x K)", t_gemm, f"{t_full / t_gemm:.1f}x")
        bound = 2 * n * k * d / (rate * 1e9)
        row("lookup", f"compute bound 2NKd at {rate:.0f} GFLOP/s (2048^3 GEMM)", bound, f"{t_full / bound:.0f}x")
        peak, _ = peak_mib(lambda: nearest_code(flat, codebook))
        t_nc = median_time(lambda: nearest_code(flat, codebook), args.repeats, warmup=False)
        row("lookup", "quantizer.nearest_code", t_nc, f"{t_full / t_nc:.1f}x, {t_nc / bound:.1f}x the bound", peak)
        peak, (_, _, codes) = peak_mib(lambda: vq(z))
        t_vq = median_time(lambda: vq(z), args.repeats, warmup=False)
        same = torch.equal(codes.flatten(), full_codes)
        row("lookup", "VectorQuantizer forward (eval)", t_vq,
            f"{t_full / t_vq:.1f}x, indices {'identical' if same else 'DIFFERENT'}", peak)
        vq.train().entropy_weight = 0.03                             # the official scripts' entropy_loss_ratio
        peak, _ = peak_mib(lambda: vq(z))
        t_vq_ent = median_time(lambda: vq(z), args.repeats, warmup=False)
        row("lookup", "VectorQuantizer forward (training, entropy loss)", t_vq_ent,
            f"{t_off / t_vq_ent:.1f}x vs official", peak)


# ----------------------------------------------------------------------------------------------------------------
# IBQ: K = 2^18 codes of d = 256, forward + backward

def unchunked_ibq(z, codebook, beta=0.25, entropy_weight=0.05, tau=0.01):
    """IBQ with full N x K tensors and plain autograd (ibq_lfq_spec.md §1.6): z_q and the loss terms."""
    logits = z @ codebook.t()
    soft = logits.softmax(-1)
    hard = F.one_hot(soft.argmax(-1), codebook.shape[0]).to(soft)
    z_q, z_q2 = (hard - soft.detach() + soft) @ codebook, hard @ codebook
    quant = F.mse_loss(z_q, z) + F.mse_loss(z_q2.detach(), z) + beta * F.mse_loss(z_q2, z.detach())
    p, logp = (logits / tau).softmax(-1), (logits / tau).log_softmax(-1)
    p_mean = p.mean(0)
    return z_q, quant + entropy_weight * (-(p * logp).sum(-1).mean() + (p_mean * (p_mean + 1e-5).log()).sum())


def ibq_step(ibq, z, w, chunked):
    """Forward + backward of IBQ on tokens z (N, d) with a fixed random "decoder" loss (z_q * w).sum()."""
    ibq.zero_grad(set_to_none=True)
    z = z.detach().requires_grad_()
    if chunked:
        z_q, losses, _ = ibq(z.t()[None, :, :, None])                 # (N, d) -> (1, d, N, 1)
        loss = (z_q[0, :, :, 0].t() * w).sum() + sum(losses.values())
    else:
        z_q, quant = unchunked_ibq(z, ibq.codebook())
        loss = (z_q * w).sum() + quant
    loss.backward()
    return z.grad, ibq.embedding.weight.grad


def bench_ibq(args):
    k, d, n_cmp, n_big = (2**12, 32, 64, 128) if args.quick else (2**18, 256, 256, 4096)
    print(f"ibq: K = {k}, d = {d}; chunked vs unchunked at N = {n_cmp}, chunked alone at N = {n_big}")
    torch.manual_seed(0)
    ibq = IBQuantizer(k, d)
    z, w = torch.randn(n_big, d), torch.randn(n_big, d)
    # gradients of both formulations at N/2, and the unchunked peak there (for the extrapolation below)
    half, g_ref = peak_mib(lambda: ibq_step(ibq, z[:n_cmp // 2], w[:n_cmp // 2], False))
    g_ours = ibq_step(ibq, z[:n_cmp // 2], w[:n_cmp // 2], True)
    err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(g_ours, g_ref))
    peaks = {}
    for chunked in (False, True):
        name = "chunked (quantizer.IBQuantizer)" if chunked else "unchunked formulation"
        peaks[chunked], _ = peak_mib(lambda: ibq_step(ibq, z[:n_cmp], w[:n_cmp], chunked))
        t = median_time(lambda: ibq_step(ibq, z[:n_cmp], w[:n_cmp], chunked), args.repeats, warmup=False)
        row("ibq", f"fwd+bwd N = {n_cmp}, {name}", t, f"grads: max rel. diff {err:.1e}" if chunked else "",
            peaks[chunked])
    # the unchunked peak grows linearly in N (all its big tensors are N x K): fit it from N/2 and N, extrapolate
    start = time.perf_counter()
    big, _ = peak_mib(lambda: ibq_step(ibq, z, w, True))
    if None not in (half, big, peaks[False]):
        extrapolated = peaks[False] + (peaks[False] - half) * (n_big - n_cmp) / (n_cmp // 2)
        row("ibq", f"fwd+bwd N = {n_big}, unchunked (extrapolated from N = {n_cmp // 2}, {n_cmp})", None, "",
            extrapolated)
        result = f"1 run, peak 1/{extrapolated / big:.0f} of unchunked"
    else:
        result = "1 run"
    row("ibq", f"fwd+bwd N = {n_big}, chunked (quantizer.IBQuantizer)", time.perf_counter() - start, result, big)


# ----------------------------------------------------------------------------------------------------------------
# FAR sampling: KV cache vs full recompute, eager vs torch.compile of the decode step

def bench_far_preset(args, preset, grid, batch, compile_):
    cfg = far.FARConfig(**{**far.PRESETS[preset], "grid": grid})
    torch.manual_seed(0)
    model = far.FAR(cfg).eval()
    labels = torch.arange(batch) % cfg.num_classes
    tokens = batch * grid[0] * grid[1]                                # one token = one position, all k sub-codes

    def sample(use_cache):
        return far.generate(model, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(0),
                            use_cache=use_cache)
    what = f"{preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M), batch {batch} + CFG, {tokens} tokens"
    t_cache = median_time(lambda: sample(True), args.repeats)
    row("far", f"{what}, KV cache", t_cache, f"{tokens / t_cache:.1f} tokens/s")
    t_full = median_time(lambda: sample(False), args.repeats)
    row("far", f"{what}, full recompute", t_full, f"{tokens / t_full:.1f} tokens/s, cache {t_full / t_cache:.1f}x")
    if compile_:
        # the decode step: backbone and AR-head blocks with their KV caches; dynamic shapes for the growing cache
        model.run_blocks = torch.compile(model.run_blocks, dynamic=True)
        start = time.perf_counter()
        sample(True)
        compile_s = time.perf_counter() - start
        t_comp = median_time(lambda: sample(True), args.repeats)
        row("far", f"{what}, KV cache, torch.compile", t_comp,
            f"{tokens / t_comp:.1f} tokens/s, {t_cache / t_comp:.2f}x eager, compile {compile_s:.0f} s")


def bench_far(args):
    print("far: generate() with CFG (scale 2), random weights")
    if args.quick:
        bench_far_preset(args, "tiny", (2, 2), 2, args.compile)
        return
    bench_far_preset(args, "tiny", (8, 8), 8, args.compile)
    # FAR-B at full width and depth; a 4 x 4 grid times the first 16 positions of a 16 x 16 image at the same cost
    bench_far_preset(args, "far-b", (4, 4), 1, False)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer training step (tiny): forward + generator_loss + backward + Adam, eager vs torch.compile

def bench_train(args):
    batch = 2 if args.quick else 16
    cfg = TokenizerConfig(**TOKENIZER_PRESETS["tiny"])
    print(f"train: tiny tokenizer, batch {batch} at {cfg.image_size} px, G step (D forward inside the G loss)")
    torch.manual_seed(0)
    raw, disc = Tokenizer(cfg), PatchGAN()
    opt = torch.optim.Adam(raw.parameters(), lr=2e-4, betas=(0.9, 0.95))
    loss_cfg = LossConfig(perceptual_weight=0.0, disc_start=400)     # train_tokenizer.py's tiny defaults
    x = torch.rand(batch, 3, cfg.image_size, cfg.image_size) * 2 - 1

    def step(model):
        x_rec, aux = model(x)
        g = generator_loss(x, x_rec, aux, 0, disc=disc, cfg=loss_cfg)
        opt.zero_grad(set_to_none=True)
        g["total"].backward()
        torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
        opt.step()
    t_eager = median_time(lambda: step(raw), args.repeats)
    row("train", "tiny tokenizer step, eager", t_eager, f"{batch / t_eager:.1f} images/s")
    if args.compile:
        model = torch.compile(raw)                                    # raw stays the uncompiled module
        start = time.perf_counter()
        step(model)
        compile_s = time.perf_counter() - start
        t_comp = median_time(lambda: step(model), args.repeats)
        row("train", "tiny tokenizer step, torch.compile", t_comp,
            f"{batch / t_comp:.1f} images/s, {t_eager / t_comp:.2f}x eager, compile {compile_s:.0f} s")


# ----------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=SECTIONS, default=None, help="run one section (default: all)")
    p.add_argument("--quick", action="store_true", help="every path once at small sizes (CI); no timing claims")
    p.add_argument("--repeats", type=int, default=None, help="timed runs after the warm-up (default 5; quick 1)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile (FAR decode step, tokenizer step); default on, off with --quick")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
    args = p.parse_args(argv)
    args.repeats = (1 if args.quick else 5) if args.repeats is None else args.repeats
    args.compile = (not args.quick) if args.compile is None else args.compile
    if args.repeats < 1 or args.threads < 1:
        p.error(f"--repeats and --threads must be positive, got {args.repeats} and {args.threads}")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ROWS.clear()
    header = machine()
    print(header, flush=True)
    for name in (args.only,) if args.only else SECTIONS:
        globals()[f"bench_{name}"](args)
    print(f"\n{header}; median of {args.repeats} runs after 1 warm-up{' (--quick)' if args.quick else ''}\n")
    print("| section | measurement | median | result | peak MiB |\n|---|---|---|---|---|")
    for section, what, seconds, result, peak in ROWS:
        print(f"| {section} | {what} | {'' if seconds is None else f'{seconds:.3g} s'} | {result} | "
              f"{'' if peak is None else f'{peak:.0f}'} |")
    return list(ROWS)


if __name__ == "__main__":
    main()
