"""Small-scale analogs of the paper's ablations, Tab. 3 (tokenizer) and Tab. 4 (FAR head), on the bundled photos.

Paper: "Factorized Visual Tokenization and Generation", Bai et al., arXiv 2411.16681.
  Tab. 3  VQ(K), VQ(2K), FQ(K x 2), + disentanglement (Eq. 7), + representation learning (Sec. 3.2.2); we add IBQ
          (arXiv 2412.02692). Paper: ImageNet, 10 epochs, rFID / PSNR / usage. Here: held-out PSNR, SSIM, LPIPS
          (null without its weights) and the usage and perplexity of each sub-codebook, mean +- std over seeds.
  Tab. 4  FAR with k linear heads, k MLP heads or the factorized AR head (Sec. 3.3). Paper: gFID. Here: held-out
          NLL in bits per sub-code, and of samples drawn with CFG 2.0 the stand-in teacher's acc_teacher (is a
          sample of class c classified as c?) and fd_teacher (the FID formula on its features, against real
          held-out crops), evaluate.py's generation mode without a download.
  ar      the claim of Tab. 2 (FAR beats AR models with one code per position): FAR with the AR head on the shipped
          FQ(K x 2) codes against LlamaGen's plain AR (FAR with k = 1 and a linear head) on a VQ(2K) tokenizer
          (preset tiny-vq, trained here by the same recipe): 1024 stored codes each, 18 vs 10 bits per position.
  ibq     IBQ's claim (arXiv 2412.02692) and FQGAN's answer to the same problem: codebook usage, perplexity and held-out
          PSNR as the codebook grows (K = 2^10 .. 2^16 codes stored), VQ vs IBQ vs FQ (2 sub-codebooks of K/2), at
          d = 8 with l2-normalised codes (FQGAN / LlamaGen) and d = 64 raw (IBQ's setting); the usage curve over
          training, time per step and peak memory per run, and a figure (--figure).
  cfg     not a table of the paper (it samples at s = 2.0, Sec. 4.1): acc_teacher / fd_teacher of a trained FAR
          (default: the shipped one) at several CFG scales s (Sec. 3.3: l = l_u + s (l_c - l_u)), one row per
          scale, one run per sampling seed, and a figure (--figure).
Every run goes through train_tokenizer.main / train_far.main with equal steps, batch and data per row; the
tokenizer metrics come from evaluate.evaluate_tokenizer on the EMA weights.

  python ablate.py --table 3 --precision bf16 --steps 600 --out results/ablation_tab3.json   # results/: ~3 h, 21 runs
  python ablate.py --table 4 --out results/ablation_tab4.json                                 # the shipped tokenizer
  python ablate.py --table 3 --quick --out /tmp/t3.json                                        # smoke run, seconds
  python ablate.py --table ar --out results/far_vs_ar.json                                     # after Tab. 4
  python ablate.py --table cfg --out results/cfg_sweep.json --figure docs/cfg_sweep.png      # the shipped FAR
  python ablate.py --table ibq --seeds 0 1 --out results/ablation_ibq.json --figure docs/ablation_ibq.png   # ~6 h
The JSON is rewritten after every run, each run with the command that made it; rerunning the same command skips the
runs it already holds. Several processes on one machine may fill one JSON with disjoint --rows or --seeds (their
runs are merged under a lock); on the 2 cores of docs/results.md two 1-thread processes were slower than one
2-thread one.
Tests: python -m pytest tests/test_ablate.py -q
"""
import argparse
import datetime
import fcntl
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import asdict

import torch

import evaluate
import train_far
import train_tokenizer
from checkpoints import (CheckpointError, check_flags, check_writable, keep_freed_memory, load_far, load_pair,
                         load_tokenizer, one_process_only, peak_mib)
from far import generate
from figures import line_plot
from images import BUNDLED, ImageFolder, to_uint8
from metrics import teacher_metrics
from quantizer import codebook_usage
from teachers import stand_in_teacher, teacher_file
from tokenizer import PRESETS, Tokenizer, TokenizerConfig

ROOT = os.path.dirname(os.path.abspath(__file__))
K = PRESETS["tiny"]["codebook_size"]     # 512 entries per sub-codebook
# Tab. 3 rows: name -> (preset, extra train_tokenizer flags), on the 8x8-token tiny8 trunk (tokenizer.PRESETS).
# Every row trains without GAN, LPIPS loss or teacher unless named; dis/rep weights are set explicitly so a row
# differs from the one above it in one term only.
# paper-map: Tab. 3
TAB3 = {
    "VQ(K)": ("tiny8-vq", []),                                             # paper: VQGAN, 16384
    "VQ(2K)": ("tiny8-vq", ["--codebook-size", str(2 * K)]),                # paper: VQGAN, 32768
    "FQ(Kx2)": ("tiny8", []),                                              # paper: FQ 16384 x 2
    "FQ(Kx2)+dis": ("tiny8", ["--disentangle-weight", "0.1"]),             # Eq. (7), lambda_dis = 0.1
    "FQ(Kx2)+rep": ("tiny8-dual", ["--rep-weight", "0.5"]),                # Sec. 3.2.2, lambda_rep = 0.5
    "FQ(Kx2)+dis+rep": ("tiny8-dual", ["--disentangle-weight", "0.1", "--rep-weight", "0.5"]),
    "IBQ(2K)": ("tiny8-ibq", []),                                          # one 1024-code IBQ codebook
}
# The paper's numbers for the same rows (Tab. 3: rFID, PSNR, usage; Tab. 4: gFID at top-k 4096 / 8192)
PAPER = {"3": {"VQ(K)": [3.71, 20.56, 0.98], "VQ(2K)": [3.60, 20.56, 0.84], "FQ(Kx2)": [2.00, 22.21, 0.97],
               "FQ(Kx2)+dis": [1.84, 22.04, 0.98], "FQ(Kx2)+rep": [1.73, 21.61, 0.98],
               "FQ(Kx2)+dis+rep": [1.66, 21.62, 0.98], "columns": ["rFID", "PSNR", "usage"]},
         "4": {"linear": [5.19, 6.90], "mlp": [5.59, 8.88], "ar": [4.37, 3.74], "columns": ["gFID@4096", "gFID@8192"]},
         "ibq": "IBQ (arXiv 2412.02692): VQ's codebook usage falls as K grows, IBQ's stays high up to 2^18 x 256; "
                "FQGAN (Tab. 3): FQ(K x 2) 0.97 usage where VQ(2K) has 0.84",
         "cfg": "no sweep in the paper: every FAR sample there is drawn at CFG scale 2.0 (Tab. 2)",
         "ar": {"FAR-B": [3.38, 248.26], "FAR-L": [3.08, 272.52], "columns": ["gFID", "IS"],
                "claim": "Tab. 2 sets FAR on FQGAN codes against AR models with one code per position"}}
# --table ibq, IBQ's claim (arXiv 2412.02692: plain VQ's codebook collapses as it grows, IBQ's soft one-hot keeps every
# code in use) against FQGAN's answer (Sec. 3.2: k sub-codebooks): one row per method, dimension regime and size K =
# the codes a row stores. VQ and IBQ: one K-entry codebook, log2 K bits per token; FQ: k = 2 sub-codebooks of K/2
# entries each (as Tab. 3's FQ(K x 2) against VQ(2K)), 2 log2(K/2) bits per token. Same tiny8 trunk and budget for all.
IBQ_SIZES = (2**16, 2**10, 2**14, 2**12)           # run order: the ends of the curve first
IBQ_METHODS = {"VQ": "tiny8-vq", "IBQ": "tiny8-ibq", "FQ": "tiny8"}
# d = 8 with l2-normalised z and codes (FQGAN / LlamaGen), d = 64 raw (IBQ's own setting; it never normalises, so its
# d = 8 row differs from d = 64 in d only)
IBQ_REGIMES = {"d8": ("8", "--l2-norm"), "d64": ("64", "--no-l2-norm")}
IBQ = {f"{m}-{r}-{K}": (preset, ["--codebook-size", str(K // 2 if m == "FQ" else K), "--codebook-dim", dim,
                                 *([norm] if m != "IBQ" else [])])
       for K in IBQ_SIZES for m, preset in IBQ_METHODS.items() for r, (dim, norm) in IBQ_REGIMES.items()}
# The budget of the stored tables (results/): the tiny recipes as they were before 2026-12-05, when they became faster
# (train_tokenizer / train_far RECIPES: 32 px windows first, bf16, FAR's higher lr). Every run passes these flags, so
# that rerunning a command adds runs comparable with those already in its JSON.
TOKENIZER_FLAGS = ["--low-res-steps", "0", "--lr", "1e-3", "--ema-decay", "0.99", "--max-steps", "600"]
FAR_FLAGS = ["--lr", "1e-3", "--lr-decay", "constant", "--warmup-steps", "0", "--max-steps", "600"]
# --table ar, the claim of Tab. 2 at CPU scale: FAR (AR head) on the shipped FQ(K x 2) codes against the standard
# one-code-per-position AR (FAR with k = 1 and a linear head: LlamaGen's GPT) on a VQ(2K) tokenizer trained by the same
# recipe: as many stored codes (1024), 18 against 10 bits per position; the same trunk, budget and seeds.
AR_ROWS = {"FAR-FQ(Kx2)": ("fq", "ar"), "AR-VQ(2K)": ("vq", "linear")}   # row -> (tokenizer, FAR head)


def teacher_missing(preset):
    """None if every teacher of the preset has its weight file in $FQGAN_WEIGHTS (teachers.teacher_file), else why."""
    for spec in filter(None, PRESETS[preset]["teachers"]):
        found, expected = teacher_file(spec)            # (local file or None, where it is looked for)
        if found is None:                               # a row that needs CLIP offline: reported, not faked
            return f"teacher {spec} needs pretrained weights, absent here ({expected}); not substituted"
    return None


def mean_std(runs):
    """{metric: mean} and {metric: sample std (None for one seed)} over seeds; lists (one value per sub-codebook)
    element-wise; a metric that is None in any run (LPIPS without weights) stays None."""
    def agg(f, values):
        if isinstance(values[0], list):                  # per sub-codebook: aggregate position by position
            return [agg(f, list(v)) for v in zip(*values)]
        if None in values or (f is statistics.stdev and len(values) < 2):   # unknown, or one seed: no spread
            return None
        return f(values)
    keys = [k for k, v in runs[0].items() if (isinstance(v, (int, float, list)) or v is None)   # numbers only, and
            and all(k in r for r in runs)]                                                    # in every run
    return ({k: agg(statistics.mean, [r[k] for r in runs]) for k in keys},
            {k: agg(statistics.stdev, [r[k] for r in runs]) for k in keys})


# --------------------------------------------------------------------------------------------------------------
# Tab. 3: one tokenizer run = train, then held-out metrics of the EMA weights

def tokenizer_run(preset, extra, seed, args, out):
    """Tab. 3 / ibq: train one tokenizer (preset + extra flags), then the held-out metrics of its EMA weights."""
    argv = ["--preset", preset, "--data-path", os.path.join(BUNDLED, "train"),   # every row: the bundled photos
            "--val-path", os.path.join(BUNDLED, "val"),                           # and their held-out strips
            "--image-size", str(args.image_size), "--global-batch-size", str(args.batch_size),
            *TOKENIZER_FLAGS, "--max-steps", str(args.steps), "--seed", str(seed), "--out-dir", out,   # later wins
            "--num-workers", "0",                                                 # in-process
            # every tiny-* preset trains with the tiny recipe (train_tokenizer.RECIPES); a row adds one term at a time
            "--disentangle-weight", "0", "--rep-weight", "0", "--eval-every", str(args.steps),
            "--sample-every", str(args.steps), "--ckpt-every", str(args.steps), "--log-every", str(args.log_every),
            *(["--precision", args.precision] if args.precision else []),
            *(["--val-path", ""] if args.quick else [])] + extra   # --quick: no held-out PSNR while training (below)
    # what train_tokenizer's set-up does on a CPU (FQGAN_KEEP_FREED_MEMORY=0: glibc's default); the time per step
    # and the peak depend on it, so each run records it
    allocator = "freed memory kept" if keep_freed_memory() else "glibc default"
    t0 = time.time()                                # train_seconds: the run's wall time (threads in the JSON)
    peak, _ = peak_mib(lambda: train_tokenizer.main(argv))   # later flags win: extra re-sets dis / rep weights
    seconds = time.time() - t0
    ckpt = os.path.join(out, "checkpoints", "last.pt")   # the run's final step
    tok = load_tokenizer(ckpt)                      # EMA weights, eval mode
    size = (args.image_size,) * 2                   # the held-out strips at the training resolution
    res = evaluate.evaluate_tokenizer(evaluate.parse_args(["--tokenizer-ckpt", ckpt, "--num-workers", "0",
                                                           "--out-json", os.path.join(out, "eval.json")])[0], tok,
                                      ImageFolder(os.path.join(BUNDLED, "val"), size, train=False), "cpu", 0, 1)
    # Usage over more tokens than the 40 centre crops give: `crops` random crops of every held-out image.
    crops = ImageFolder(os.path.join(BUNDLED, "val"), size, train=True, seed=seed)
    with torch.no_grad():
        codes = torch.cat([tok.encode(torch.stack([crops[(i, e)][0] for i in range(len(crops))]))
                           for e in range(args.usage_crops)])               # (crops * 40, k, h, w)
    usage = [codebook_usage(codes[:, i], tok.cfg.codebook_size) for i in range(tok.cfg.num_codebooks)]   # Tab. 3 col.
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    trained = [r for r in log if "images_per_s" in r][-1]   # the last training line: throughput of the whole run
    # the training curve (ibq): usage / perplexity of each sub-codebook over the codes of the log window before each
    # logged step (usage_tokens of them: a window of fewer tokens than K cannot show every code used)
    curve = {key: [[r[f"{key}/{i}"] for i in range(tok.cfg.num_codebooks)] for r in log if "usage/0" in r]
             for key in ("usage", "perplexity")}
    curve.update(step=[r["step"] for r in log if "usage/0" in r], tokens=[r["usage_tokens"] for r in log if
                                                                         "usage/0" in r])
    return {"psnr": res["psnr"], "ssim": res["ssim"], "lpips": res["lpips"],
            "usage": [u["usage"].item() for u in usage], "perplexity": [u["perplexity"].item() for u in usage],
            "usage_tokens": codes[:, 0].numel(), "train_seconds": round(seconds, 1),
            "seconds_per_step": round(args.batch_size / trained["images_per_s"], 4),
            "peak_train_mib": None if peak is None else round(peak, 1),
            "params": sum(p.numel() for p in tok.parameters()), "curve": curve, "cpu_allocator": allocator}


# --------------------------------------------------------------------------------------------------------------
# Tab. 4 and the CFG sweep: samples judged by the stand-in teacher; one FAR run = train, held-out NLL, samples

def teacher_judge(tok, args, n_samples):
    """The stand-in teacher, its features of real held-out crops (the reference) and the levels to read its numbers
    on (evaluate.teacher_levels: real crops, real against real, the tokenizer's reconstructions)."""
    teacher, classes = stand_in_teacher(args.teacher, "cpu")
    ref, levels = evaluate.teacher_levels(teacher, classes, os.path.join(BUNDLED, "val"), tok.cfg.image_shape,
                                          args.real_crops, n_samples, tok, "cpu")
    return teacher, ref, levels


@torch.no_grad()
def sample_metrics(model, tok, judge, scale, seed, per_class):
    """acc_teacher / fd_teacher of per_class samples of every class drawn at CFG scale `scale` (Sec. 3.3)."""
    teacher, ref, _ = judge
    labels = torch.arange(model.cfg.num_classes).repeat_interleave(per_class)   # (C * per_class,) every class
    g = torch.Generator().manual_seed(seed)                             # samples reproducible per seed
    images = to_uint8(tok.decode_codes(generate(model, labels, cfg_scale=scale, generator=g)))   # (N, 3, H, W)
    acc, fd, _ = teacher_metrics(teacher, images, labels, ref)
    return {"acc_teacher": acc, "fd_teacher": fd, "samples": len(labels)}


# paper-map: Tab. 4
def far_run(head, seed, args, out, tok_path, tok, judge, codes_dir):
    """Train FAR with one head (Sec. 3.3 or a Tab. 4 baseline) on the codes of the tokenizer at tok_path, then its
    held-out NLL and the teacher's judgement of its samples."""
    argv = ["--preset", "tiny", "--head", head, "--tokenizer-ckpt", tok_path, "--out-dir", out,   # the tiny recipe
            *FAR_FLAGS, "--max-steps", str(args.steps), "--global-batch-size", str(args.batch_size),   # as stored
            "--seed", str(seed), "--augment", args.augment, "--eval-every", str(args.steps), "--sample-every",
            str(args.steps), "--ckpt-every", str(args.steps), "--log-every", str(args.steps),
            "--precision", args.precision or "fp32"]
    if os.path.isdir(codes_dir) and not os.path.exists(os.path.join(out, "codes")):   # not the first run
        os.makedirs(out, exist_ok=True)             # the codes of the first run, extracted once (same tokenizer)
        os.symlink(os.path.abspath(codes_dir), os.path.join(out, "codes"))
    t0 = time.time()
    train_far.main(argv)                            # the same script and recipe a user runs
    seconds = time.time() - t0
    if not os.path.exists(codes_dir):               # the first run's codes, shared with the later runs
        os.symlink(os.path.abspath(os.path.join(out, "codes")), codes_dir)
    with open(os.path.join(out, "log.jsonl")) as f:  # the held-out NLL of the last step
        last = [r for r in map(json.loads, f) if "val_bits/0" in r][-1]
    bits = [last[f"val_bits/{j}"] for j in range(tok.cfg.num_codebooks)]
    model = load_far(os.path.join(out, "checkpoints", "last.pt"))
    return {"val_bits_per_subcode": bits, "val_bits_mean": statistics.mean(bits),   # Tab. 2's CFG scale: 2.0
            **sample_metrics(model, tok, judge, 2.0, seed, args.samples_per_class),
            "train_seconds": round(seconds, 1), "params": sum(p.numel() for p in model.parameters())}


def far_tokenizer(args):
    """The FQ tokenizer FAR runs train on: --tokenizer-ckpt, or with --quick and no such file a random tiny one at
    32 px (8x8 codes), written to the work dir."""
    if not os.path.isfile(args.tokenizer_ckpt):                       # --quick only: parse_args refuses it otherwise
        torch.manual_seed(0)
        cfg = TokenizerConfig(**{**PRESETS["tiny"], "image_size": 32})
        args.tokenizer_ckpt = os.path.join(args.work_dir, "random_tokenizer.pt")
        torch.save({"model": Tokenizer(cfg).state_dict(), "config": asdict(cfg)}, args.tokenizer_ckpt)
    return args.tokenizer_ckpt


def vq_tokenizer(args):
    """--table ar: the tiny-vq tokenizer (VQ(2K), 16x16 codes), trained once into the work dir by the tiny recipe, as
    the shipped FQ tokenizer was (README); -> its checkpoint (EMA weights are what load_tokenizer reads)."""
    out = os.path.join(args.work_dir, "tiny-vq-tokenizer")
    ckpt = os.path.join(out, "checkpoints", "last.pt")
    if not os.path.isfile(ckpt):
        shutil.rmtree(out, ignore_errors=True)      # a run cut short starts over
        quick = ["--max-steps", "2", "--global-batch-size", "2", "--image-size", "32"] if args.quick else []
        train_tokenizer.main(["--preset", "tiny-vq", "--precision", "bf16", *TOKENIZER_FLAGS, "--out-dir", out,
                              "--num-workers", "0", *quick])
    return ckpt


def cfg_run(scale, seed, args, model, tok, judge):
    """One point of the CFG sweep: samples of the trained FAR at CFG scale `scale`, seed `seed`."""
    t0 = time.time()
    return {**sample_metrics(model, tok, judge, scale, seed, args.samples_per_class),
            "sample_seconds": round(time.time() - t0, 1)}


def ibq_figure(results, path):
    """--table ibq: usage, perplexity / entries and PSNR against K (log2 axis), one line per method and regime, mean
    +- std over seeds; FQ's point is the mean of its two sub-codebooks (K/2 entries each)."""
    def points(series, metric):
        out = []
        for name, row in results["rows"].items():
            if name.rsplit("-", 1)[0] != series or not row.get("runs"):
                continue
            runs = list(row["runs"].values())
            k = len(runs[0]["usage"])                                   # sub-codebooks of the row
            per_run = [metric(r, r["codes_stored"] // k) for r in runs]
            out.append((runs[0]["codes_stored"], statistics.mean(per_run),
                        statistics.stdev(per_run) if len(per_run) > 1 else None))
        return out
    series = list(dict.fromkeys(name.rsplit("-", 1)[0] for name in results["rows"]))   # "VQ-d8", "IBQ-d64", ...
    metrics = {"codebook usage (held-out codes)": lambda r, K: statistics.mean(r["usage"]),
               "perplexity / entries": lambda r, K: statistics.mean(p / K for p in r["perplexity"]),
               "held-out PSNR (dB)": lambda r, K: r["psnr"]}
    line_plot([{"title": title, "x": "K, codes stored (log2 axis)", "log_x": True,
                "series": {s: points(s, f) for s in series}} for title, f in metrics.items()], path,
              margin=(48, 26, 30, 40))                          # room for the last x tick (65536)


# --------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", required=True, choices=["3", "4", "ar", "cfg", "ibq"], help="Tab. 3 (tokenizer), Tab. 4 "
                   "(FAR head), ar (FAR vs plain AR, Tab. 2's claim), cfg (CFG scale sweep of a trained FAR) or ibq "
                   "(codebook-size sweep of VQ, IBQ and FQ)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds, one run per row and seed")
    p.add_argument("--rows", nargs="+", default=None, help="subset of rows (default: all of the table)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: 1000 Tab. 3, 600 Tab. "
                   "4, ar and ibq)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="autocast of every run (default: the "
                   "tokenizer recipe's for Tab. 3, fp32 for FAR; bf16 is much faster for the tiny trunk on CPUs with "
                   "AMX or AVX512-BF16)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch per step (default: the tiny recipe's "
                   "16 Tab. 3, 32 Tab. 4)")
    p.add_argument("--image-size", type=int, default=64, help="Tab. 3 training and evaluation resolution (64)")
    p.add_argument("--usage-crops", type=int, default=None, help="Tab. 3 / ibq: random crops per held-out image for "
                   "the usage at the end (default: 10 Tab. 3; ibq 100: 256,000 tokens, ~4 per code at K = 2^16)")
    p.add_argument("--log-every", type=int, default=None, help="Tab. 3 / ibq: steps per point of the usage curve over "
                   "training, each over the codes of its window (default: ibq 100, ~100k tokens; Tab. 3 --steps)")
    p.add_argument("--tokenizer-ckpt", default=os.path.join(ROOT, "weights", "tiny_tokenizer.pt"),
                   help="Tab. 4 / ar / cfg: the (FQ) tokenizer whose codes FAR models (default: the shipped tiny one)")
    p.add_argument("--augment", default=train_far.RECIPES["tiny"]["augment"], choices=sorted(train_far.VIEWS),
                   help="Tab. 4: train_far views (default: the tiny FAR recipe's, %(default)s)")
    p.add_argument("--samples-per-class", type=int, default=25, help="Tab. 4 / cfg: samples per class and run for "
                   "acc_teacher / fd_teacher (default: %(default)s)")
    p.add_argument("--teacher", default=os.path.join(ROOT, "weights", "tiny_teacher.pt"),
                   help="Tab. 4 / cfg: the stand-in teacher that judges samples (default: the shipped one)")
    p.add_argument("--real-crops", type=int, default=2000, help="Tab. 4 / cfg: real held-out crops as the reference")
    p.add_argument("--far-ckpt", default=os.path.join(ROOT, "weights", "tiny_far.pt"),
                   help="cfg: the trained FAR to sample (default: the shipped tiny FAR, over --tokenizer-ckpt)")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0, 6.0],
                   help="cfg: the CFG scales, one row each (1.0: no guidance; the paper samples at 2.0)")
    p.add_argument("--tab4", default=os.path.join("results", "ablation_tab4.json"), help="ar: the FAR row's runs are "
                   "taken from this Tab. 4 JSON's 'ar' row when its budget is the same (default: %(default)s)")
    p.add_argument("--figure", help="cfg: also draw acc_teacher and fd_teacher against the scale into this PNG; ibq: "
                   "usage, perplexity / entries and PSNR against K")
    p.add_argument("--work-dir", default=os.path.join("runs", "ablate"), help="run folders (checkpoints, logs)")
    p.add_argument("--out", required=True, help="results JSON, e.g. results/ablation_tab3.json")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 steps, tiny sizes, random tokenizer "
                   "for Tab. 4 when --tokenizer-ckpt is absent")
    args = p.parse_args(argv)
    one_process_only(p)
    # Every value is checked before any work: one line naming the flag, the value and the valid range, exit 2.
    check_flags(p, args, *((n, getattr(args, n) is None or getattr(args, n) >= 1, "an integer >= 1")
                           for n in ("steps", "batch_size", "usage_crops", "log_every")),   # None: the default
                *((n, getattr(args, n) >= 2, "an integer >= 2") for n in ("samples_per_class", "real_crops")),
                ("scales", all(math.isfinite(s) and s >= 0 for s in args.scales), "finite numbers >= 0"))
    far_files = ["teacher"] + ["tokenizer_ckpt"] * (not args.quick)    # --quick: a random tokenizer if absent
    files = {"4": far_files, "ar": far_files, "cfg": ["teacher", "tokenizer_ckpt", "far_ckpt"]}.get(args.table, [])
    for name in files:
        if not os.path.isfile(getattr(args, name)):
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: no such file" + (
                f" (make it with `python train_teacher.py --out {args.teacher}`, a minute on a CPU)"
                if name == "teacher" else ""))
    try:                         # and what they hold, before any training (--table ar trains a tokenizer first)
        load_tokenizer(args.tokenizer_ckpt) if "tokenizer_ckpt" in files else None   # e.g. a FAR file given here
        stand_in_teacher(args.teacher, "cpu") if "teacher" in files else None
    except (CheckpointError, ValueError) as e:
        p.error(str(e))
    if args.figure:                                 # drawn at the end: its folder must be there now
        try:
            check_writable(args.figure, "--figure", ".png")
        except CheckpointError as e:
            p.error(str(e))
    tab3, tokenizers = args.table == "3", args.table in ("3", "ibq")
    args.usage_crops = args.usage_crops or (100 if args.table == "ibq" else 10)
    if args.quick:                                  # tests: every code path in seconds, numbers meaningless
        args.seeds, args.steps, args.batch_size = args.seeds[:1], args.steps or 2, args.batch_size or 2
        args.usage_crops, args.augment, args.samples_per_class, args.image_size = 1, "none", 2, 32
        args.real_crops = 40
    # Tab. 3: long enough for the quantizer, not an under-trained trunk, to limit PSNR; Tab. 4: the FAR recipe
    args.steps = args.steps or (1000 if tab3 else 600)              # Tab. 4: FAR_FLAGS' 600, the stored budget
    args.log_every = args.log_every or (100 if args.table == "ibq" and not args.quick else args.steps)
    args.precision = args.precision or ("bf16" if args.table == "ibq" else None)   # ibq: as Tab. 3 was run
    args.steps = None if args.table == "cfg" else args.steps      # cfg trains nothing: the FAR's step is recorded
    args.batch_size = args.batch_size or (train_tokenizer.RECIPES["tiny"]["global_batch_size"] if tokenizers else 32)
    rows = {"3": list(TAB3), "4": ["linear", "mlp", "ar"], "ar": list(AR_ROWS), "ibq": list(IBQ),
            "cfg": [f"{s:g}" for s in args.scales]}[args.table]
    if any(r not in rows for r in args.rows or []):   # a typo in --rows must not silently run nothing
        p.error(f"--rows must be among {rows}")
    args.rows = args.rows or rows
    return args, p


def main(argv=None):
    args, parser = parse_args(argv)
    results = json.load(open(args.out)) if os.path.exists(args.out) else {}   # earlier runs are kept and skipped
    if results.get("budget", {}).get("steps") not in (None, args.steps):
        parser.error(f"--out {args.out} holds runs of another budget; use another --out")   # never mix budgets
    results.update({
        "table": args.table, "paper": PAPER[args.table],
        "command": " ".join(["python", "ablate.py"] + (sys.argv[1:] if argv is None else argv)),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu": next((line.split(":")[1].strip() for line in open("/proc/cpuinfo")
                                 if line.startswith("model name")), platform.processor()),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "python": platform.python_version()},
        "budget": {"steps": args.steps, "global_batch_size": args.batch_size, "seeds": args.seeds}})
    results.setdefault("rows", {})
    os.makedirs(args.work_dir, exist_ok=True) if args.table != "cfg" else None   # cfg trains nothing: no run folders
    if args.table in ("3", "ibq"):                  # run = train one tokenizer, then measure it
        recipe = train_tokenizer.RECIPES["tiny"]                    # every row: the tiny recipe + TOKENIZER_FLAGS
        results["budget"].update(image_size=args.image_size, usage_crops=args.usage_crops, lr=1e-3,
                                 gan=False, lpips_loss=False, ema_decay=recipe["ema_decay"],
                                 data="data/photos/train (44 photos), eval on data/photos/val (40)")
        if args.table == "3":
            run = lambda name, seed, out: tokenizer_run(*TAB3[name], seed, args, out)
        else:                                       # + the row's codebook, its bits and the curve's window
            results["budget"].update(precision=args.precision, curve_every=args.log_every,
                                     flags=" ".join(TOKENIZER_FLAGS))

            def run(name, seed, out):
                preset, extra = IBQ[name]
                k, K = (2, int(extra[1])) if name.startswith("FQ") else (1, int(extra[1]))   # sub-codebooks, entries
                return {**tokenizer_run(preset, extra, seed, args, out), "codes_stored": k * K,
                        "bits_per_token": k * math.log2(K), "flags": " ".join(["--preset", preset, *extra])}
    elif args.table == "cfg":                       # nothing trained: one FAR, sampled at every scale
        try:
            model, tok, _, info = load_pair(args.far_ckpt, args.tokenizer_ckpt)   # checked: it decodes FAR's codes
        except CheckpointError as e:
            parser.error(str(e))
        judge = teacher_judge(tok, args, model.cfg.num_classes * args.samples_per_class)
        results["levels"] = judge[2]                                # real crops, real vs real, reconstructions
        del results["budget"]["global_batch_size"]                  # nothing trained
        results["budget"].update(far=os.path.abspath(args.far_ckpt).removeprefix(ROOT + os.sep), far_step=info["step"],
                                 tokenizer=os.path.abspath(args.tokenizer_ckpt).removeprefix(ROOT + os.sep),
                                 samples_per_class=args.samples_per_class, real_crops=args.real_crops)
        run = lambda name, seed, out: cfg_run(float(name), seed, args, model, tok, judge)
    elif args.table == "ar":                        # two tokenizers, one FAR head each
        paths = {"fq": far_tokenizer(args), "vq": vq_tokenizer(args)}
        toks = {kind: load_tokenizer(path) for kind, path in paths.items()}
        classes = len(ImageFolder(os.path.join(BUNDLED, "train"), toks["fq"].cfg.image_shape).classes)
        judges = {kind: teacher_judge(tok, args, classes * args.samples_per_class) for kind, tok in toks.items()}
        results["levels"] = {row: judges[kind][2] for row, (kind, _) in AR_ROWS.items()}   # each its tokenizer's
        results["budget"].update(augment=args.augment, samples_per_class=args.samples_per_class, cfg_scale=2.0,
                                 lr=1e-3, real_crops=args.real_crops, tokenizers={
                                     kind: os.path.abspath(p).removeprefix(ROOT + os.sep) for kind, p in paths.items()})

        bits = lambda kind, res: {**res, "val_bits_per_position": sum(res["val_bits_per_subcode"]),   # NLL, and
                                  "code_bits_per_position": toks[kind].cfg.num_codebooks * math.log2(   # what the
                                      toks[kind].cfg.codebook_size)}                                    # codes hold
        tab4 = json.load(open(args.tab4)) if args.tab4 and os.path.exists(args.tab4) else {}
        same = {k: v for k, v in results["budget"].items() if k not in ("seeds", "tokenizers")}
        if "ar" in tab4.get("rows", {}) and tab4["budget"].get("tokenizer") == results["budget"]["tokenizers"]["fq"] \
                and all(tab4["budget"].get(k) == v for k, v in same.items()):   # Tab. 4's AR-head runs are this row's
            row = results["rows"].setdefault("FAR-FQ(Kx2)", {"runs": {}})
            row["runs"].update({s: bits("fq", r) for s, r in tab4["rows"]["ar"]["runs"].items()})
            row["from"] = f"the 'ar' row of {args.tab4} (same tokenizer, recipe, budget, seeds, judge)"
            row["mean"], row["std"] = mean_std([row["runs"][s] for s in sorted(row["runs"], key=int)])

        def run(name, seed, out):
            kind, head = AR_ROWS[name]
            return bits(kind, far_run(head, seed, args, out, paths[kind], toks[kind], judges[kind],
                                      os.path.join(args.work_dir, f"ar-codes-{kind}")))
    else:                                           # Tab. 4: one tokenizer for every row, FAR heads vary
        tok = load_tokenizer(far_tokenizer(args))
        classes = len(ImageFolder(os.path.join(BUNDLED, "train"), tok.cfg.image_shape).classes)   # FAR's classes
        judge = teacher_judge(tok, args, classes * args.samples_per_class)
        results["levels"] = judge[2]                                # real crops, real vs real, reconstructions
        results["budget"].update(augment=args.augment, samples_per_class=args.samples_per_class, cfg_scale=2.0,
                                 tokenizer=os.path.abspath(args.tokenizer_ckpt).removeprefix(ROOT + os.sep), lr=1e-3,
                                 real_crops=args.real_crops)
        codes = os.path.join(args.work_dir, "tab4-codes")   # extracted by the first run, linked by the others
        run = lambda head, seed, out: far_run(head, seed, args, out, args.tokenizer_ckpt, tok, judge, codes)
    def save():
        """Merge our runs into the file's and rewrite it atomically, under a lock on its folder: several ablate.py
        processes with disjoint --rows or --seeds can fill one table (module docstring)."""
        folder = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(folder, exist_ok=True)
        lock = os.open(folder, os.O_RDONLY)
        fcntl.flock(lock, fcntl.LOCK_EX)                            # released when the descriptor is closed
        for name, row in (json.load(open(args.out)) if os.path.exists(args.out) else {}).get("rows", {}).items():
            ours = results["rows"].setdefault(name, dict(row))
            ours["runs"] = {**row.get("runs", {}), **ours["runs"]}   # the file's runs plus ours
            if ours["runs"]:
                ours["mean"], ours["std"] = mean_std([ours["runs"][s] for s in sorted(ours["runs"], key=int)])
        with open(args.out + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(args.out + ".tmp", args.out)
        os.close(lock)
    for name in args.rows:                          # rows without their pretrained teacher are reported, not run
        reason = teacher_missing(TAB3[name][0]) if args.table == "3" else None
        row = results["rows"].setdefault(name, {"runs": {}})
        row.pop("skipped", None) if reason is None else row.update(skipped=reason)
    for seed in args.seeds:                         # seed-major: a cut-short table still has every row
        for name in args.rows:
            row = results["rows"][name]
            if "skipped" in row or str(seed) in row["runs"]:   # done in an earlier call: resume skips it
                continue
            out = os.path.join(args.work_dir, f"tab{args.table}-{name}-seed{seed}")   # one folder per run
            shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)   # not in the JSON: it starts over
            os.remove(os.path.join(out, "log.jsonl")) if os.path.exists(os.path.join(out, "log.jsonl")) else None
            row["runs"][str(seed)] = {**run(name, seed, out), "command": results["command"]}   # what made it
            row["mean"], row["std"] = mean_std(list(row["runs"].values()))
            save()                                  # after every run: a killed table loses one run at most
    save()
    for name, row in results["rows"].items():       # the table, mean +- std over seeds
        if "skipped" in row:
            print(f"{name:<18} skipped: {row['skipped']}")
        else:
            fmt = lambda m, s: ((f"{m:.3f}" + ("" if s is None else f"+-{s:.3f}")) if isinstance(m, float) else
                                "/".join(fmt(a, b) for a, b in zip(m, s)) if isinstance(m, list) else str(m))
            keys = {"3": ("psnr", "ssim", "lpips", "usage"),
                    "ibq": ("psnr", "usage", "perplexity", "seconds_per_step", "peak_train_mib"),
                    "4": ("val_bits_mean", "acc_teacher", "fd_teacher"),
                    "ar": ("val_bits_per_position", "acc_teacher", "fd_teacher"),
                    "cfg": ("acc_teacher", "fd_teacher")}[args.table]
            # one line per row: metric mean+-std, per sub-codebook values joined by /
            print(f"{name:<18} " + "  ".join(f"{k} {fmt(row['mean'][k], row['std'][k])}" for k in keys))
    if args.figure and args.table == "ibq":
        ibq_figure(results, args.figure)
    elif args.figure:                               # cfg: the two metrics against the scale, with their levels
        lv, points = results["levels"], lambda k: [(float(n), r["mean"][k], r["std"][k])
                                                   for n, r in results["rows"].items()]
        line_plot([{"title": "acc_teacher of samples (higher: more class-like)", "x": "CFG scale s",
                    "series": {"FAR": points("acc_teacher")}, "levels": {
                        "real crops": lv["acc_teacher_real"], "reconstructions": lv["acc_teacher_rec"],
                        "chance": lv["teacher_chance"]}},
                   {"title": "fd_teacher to real crops (lower: closer)", "x": "CFG scale s",
                    "series": {"FAR": points("fd_teacher")}, "levels": {
                        "real vs real": lv["fd_teacher_floor"], "reconstructions": lv["fd_teacher_rec"]}}], args.figure)
    return results


if __name__ == "__main__":
    main()
