"""Train the FQGAN tokenizer (or the VQGAN / IBQ baselines) with plain torch.distributed DDP.

Paper: "Factorized Visual Tokenization and Generation", Bai et al., arXiv 2411.16681.
  Sec. 4.1  ImageNet 256x256, global batch 256, constant lr 2e-4, Adam betas (0.9, 0.95), 40 epochs, 8 GPUs
  Eq. (8)   the objective (losses.py): L_rec + L_VQ + LPIPS + GAN + lambda_dis L_dis + lambda_rep L_rep
main() reads top to bottom: torchrun set-up, the models, the data, resume, then the loop (a generator step, a
discriminator step, the EMA; logs, held-out PSNR, PNG grids, checkpoints). Each preset's training defaults are its
recipe in RECIPES below; --help prints them.

GPU (the paper's FQGAN-Dual f16, 8 GPUs, ~200k steps; needs the LPIPS and CLIP weights, see docs/training.md):
  torchrun --nproc_per_node=8 train_tokenizer.py --preset fqgan-dual-16 --data-path /data/imagenet/train \\
      --out-dir runs/dual16
CPU (the tiny preset on the bundled photos, minutes on 2 cores):
  python train_tokenizer.py --preset tiny --out-dir runs/tiny
Resume either with the same command plus --resume. Two processes on one CPU: torchrun --standalone
--nproc_per_node=2 train_tokenizer.py ... (gloo on CPU, NCCL on CUDA).
"""
import argparse
import copy
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.utils.data import ConcatDataset, DataLoader, Subset
from tqdm import tqdm

from checkpoints import (CheckpointError, add_checkpoint_flags, check_flags, distribute, exit_stopped, init_weights,
                         load_tokenizer, lr_at, mean_over_ranks_or_stop, open_run, release_stop_signals, resume,
                         save_checkpoint, start_training, stop_requested)
from images import BUNDLED, ImageFolder, save_grid, stream, unreadable_files
from losses import LPIPS, LossConfig, PatchGAN, discriminator_loss, generator_loss
from quantizer import usage_of_counts
from teachers import build_teachers
from tokenizer import PRESETS, Tokenizer, TokenizerConfig

# The training recipes, this script's defaults (--help prints them). PAPER: Sec. 4.1 (batch 256, constant lr 2e-4,
# ~40 epochs = 200k steps) and the released scripts (LPIPS 1.0, GAN 0.5 from step 20k, their crop; # parity: §2, §3);
# they keep no EMA, we do. TINY: 2 CPU cores and the bundled photos, no LPIPS and no GAN (LPIPS' weights cannot be
# downloaded offline; the GAN without it wrecked reconstruction), lr 1e-3 with 50 warm-up steps and a cosine to 0,
# crops of the photos at 1/4 to 3/4 of their size, the first 850 of 900 steps on 32 px windows cut at the scale of
# those 64 px crops (3.2x the steps per second; still the 64 px model, evaluated on 64 px images), the photos decoded
# once (cache_mib), bf16 autocast where the CPU has bf16 instructions, fp32 where it would emulate them ("auto"), an
# EMA of ~20 steps (0.95: a longer one still remembers the window steps at the end; docs/results.md has the
# measurements behind each value).
PAPER = dict(data_path=None, global_batch_size=256, max_steps=200_000, lr=2e-4, lr_decay="constant", warmup_steps=0,
             low_res_steps=0, precision=None, cache_mib=0,
             ema_decay=0.9999, perceptual_weight=1.0, gan_weight=0.5, gan_start=20_000, crop_scale=1.25)
TINY = dict(data_path=os.path.join(BUNDLED, "train"), global_batch_size=16, max_steps=900, lr=1e-3, lr_decay="cosine",
            warmup_steps=50, low_res_steps=850, precision="auto", ema_decay=0.95, perceptual_weight=0.0, gan_weight=0.0,
            gan_start=400, crop_scale=3.0, cache_mib=64)
RECIPES = {"fqgan-dual-16": PAPER, "fqgan-triple-16": PAPER, "fqgan-dual-8": PAPER, "fqgan-triple-8": PAPER,
           "vqgan-16": PAPER, "ibq-16": PAPER, "tiny": TINY, "tiny64": TINY, "tiny-dual": TINY, "tiny-vq": TINY,
           "tiny8": TINY, "tiny8-dual": TINY, "tiny8-vq": TINY, "tiny8-ibq": TINY}


# --------------------------------------------------------------------------------------------------------------
# Arguments: parsed once; a flag left unset takes the preset's recipe

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    recipe = lambda key, what: f"{what} (default: the preset's recipe, paper {PAPER[key]}, tiny {TINY[key]})"
    # model and data
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="tokenizer preset (tokenizer.PRESETS); "
                   "its recipe (RECIPES) gives the defaults marked 'recipe' (default: %(default)s)")
    p.add_argument("--data-path", help="ImageFolder root of training images (default: data/photos/train for the tiny "
                   "presets; the paper presets need one)")
    p.add_argument("--val-path", help="held-out ImageFolder for the PSNR of --eval-every (default: data/photos/val "
                   "when --data-path is the bundled data/photos/train, else none; '' for none)")
    p.add_argument("--hold-out", nargs="+", default=[], metavar="CLASS", help="classes (whole photos) left out of "
                   "training and of the val PSNR; their PSNR (all their images) is logged as held_out_psnr_ema")
    p.add_argument("--crop-scale", type=float, help=recipe("crop_scale", "training crops: short side to S ~ "
                   "U{s..s * crop-scale}, then a random s x s crop"))
    p.add_argument("--image-size", type=int, help="training resolution (default: the preset's)")
    p.add_argument("--codebook-size", type=int, help="K, entries per sub-codebook (default: the preset's)")
    p.add_argument("--codebook-dim", type=int, help="d, the dimension of a code (default: the preset's)")
    p.add_argument("--l2-norm", action=argparse.BooleanOptionalAction, help="VQ: cosine lookup on l2-normalised z "
                   "and codes (FQGAN's); --no-l2-norm: raw Euclidean (IBQ's setting) (default: the preset's)")
    p.add_argument("--out-dir", default="runs/tokenizer", help="checkpoints, log.jsonl, sample PNGs (%(default)s)")
    p.add_argument("--init-from", metavar="CKPT", help="fine-tune: start from these weights (our checkpoint, the "
                   "shipped weights/tiny_tokenizer.pt, a released FQGAN file) with fresh optimizers at step 0; the "
                   "preset must match them (the shipped file's: tiny64)")
    # optimisation: Adam (0.9, 0.95), no weight decay, clip 1.0; one Adam for G, one for D (Sec. 4.1; # parity: §3.1)
    p.add_argument("--global-batch-size", type=int, help=recipe("global_batch_size", "images per step, all ranks"))
    p.add_argument("--max-steps", type=int, help=recipe("max_steps", "training steps"))
    p.add_argument("--lr", type=float, help=recipe("lr", "lr of both Adam optimizers"))
    p.add_argument("--lr-decay", choices=["constant", "cosine"], help=recipe("lr_decay", "lr after warm-up: "
                   "constant, or a cosine to 0 at --max-steps (keep --max-steps on --resume for the same schedule)"))
    p.add_argument("--warmup-steps", type=int, help=recipe("warmup_steps", "steps of linear lr warm-up from 0"))
    p.add_argument("--low-res-steps", type=int, help=recipe("low_res_steps", "the first steps train on crops of half "
                   "--image-size cut at the full size's scale (windows: a quarter of a full-size crop's pixels, about "
                   "a third of the step's time; the convolutions and the quantizers take any size, the adapters "
                   "take a random window of their position tables); --max-steps or more: every step"))
    p.add_argument("--beta1", type=float, default=0.9, help="Adam beta1 (default: %(default)s)")
    p.add_argument("--beta2", type=float, default=0.95, help="Adam beta2 (default: %(default)s)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, G and D each (%(default)s)")
    p.add_argument("--ema-decay", type=float, help=recipe("ema_decay", "EMA decay of the generator, in [0, 1)"))
    # loss weights, Eq. (2) and (8); the quantizer's own terms are weighted in quantizer.py
    p.add_argument("--perceptual-weight", type=float, help=recipe("perceptual_weight", "lambda_P of LPIPS, Eq. (2); "
                   "0 = no LPIPS"))
    p.add_argument("--gan-weight", type=float, help=recipe("gan_weight", "lambda_G of the hinge GAN, Eq. (2); 0 = no "
                   "discriminator"))
    p.add_argument("--gan-start", type=int, help=recipe("gan_start", "step the GAN terms switch on"))
    p.add_argument("--disentangle-weight", type=float, default=LossConfig.disentangle_weight,
                   help="lambda_dis of Eq. (7)-(8) (default: %(default)s)")
    p.add_argument("--rep-weight", type=float, default=LossConfig.rep_weight, help="lambda_rep of Eq. (8), per "
                   "teacher-supervised branch; 0 = no teacher (default: %(default)s)")
    p.add_argument("--entropy-weight", type=float, help="code entropy loss weight (default: the preset's)")
    # runtime
    p.add_argument("--seed", type=int, default=0, help="base seed; rank r uses seed + r (default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=2, help="data loader workers per rank (default: %(default)s)")
    p.add_argument("--cache-mib", type=int, help=recipe("cache_mib", "MiB of decoded training photos each loader "
                   "process keeps in memory (a small folder is decoded once, not once per crop); 0 = none"))
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"], help="autocast dtype of the forward; auto: bf16 "
                   "on GPUs with bf16 (Ampere on) and CPUs with AVX512-BF16 or AMX, else fp32 (default: the recipe's, "
                   "tiny auto; paper presets: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the DDP-wrapped tokenizer "
                   "(default: on with CUDA, off on CPU)")
    p.add_argument("--log-every", type=int, default=50, help="steps between JSONL log lines (%(default)s)")
    p.add_argument("--sample-every", type=int, default=500, help="steps between reconstruction PNGs (%(default)s)")
    p.add_argument("--eval-every", type=int, default=500, help="steps between held-out PSNRs (%(default)s)")
    add_checkpoint_flags(p)                                           # --ckpt-every, --resume, ...
    args = p.parse_args(argv)
    for key, value in RECIPES[args.preset].items():                   # flags left unset: the preset's recipe
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    return check_args(p, args), p


def check_args(p, args):
    """Every value is checked before any work: one line naming the flag, the value and the valid range, exit 2
    (argparse's p.error). Fills in the bundled val strips as --val-path for the bundled train photos."""
    if args.val_path is None and args.data_path == os.path.join(BUNDLED, "train"):
        args.val_path = os.path.join(BUNDLED, "val")                  # the bundled photos' held-out strip
    check_flags(                                                      # one line naming flag, value and range, exit 2
            p, args,
            ("global_batch_size", args.global_batch_size >= 1, "an integer >= 1"),
            ("max_steps", args.max_steps >= 1, "an integer >= 1"),
            ("warmup_steps", args.warmup_steps >= 0, "an integer >= 0"),
            ("low_res_steps", args.low_res_steps >= 0, "an integer >= 0"),
            ("crop_scale", math.isfinite(args.crop_scale) and args.crop_scale >= 1, "a number >= 1"),
            ("lr", math.isfinite(args.lr) and args.lr > 0, "a finite number > 0"),
            ("ema_decay", 0 <= args.ema_decay < 1, "in [0, 1)"),
            *((b, 0 <= getattr(args, b) < 1, "in [0, 1)") for b in ("beta1", "beta2")),    # Adam's betas
            ("grad_clip", args.grad_clip > 0, "> 0"),
            ("codebook_size", args.codebook_size is None or args.codebook_size >= 2, "an integer >= 2"),
            ("codebook_dim", args.codebook_dim is None or args.codebook_dim >= 1, "an integer >= 1"),
            ("num_workers", args.num_workers >= 0, "an integer >= 0"),
            ("cache_mib", args.cache_mib >= 0, "an integer >= 0"),
            ("ckpt_minutes", args.ckpt_minutes > 0, "> 0"), ("keep_checkpoints", args.keep_checkpoints >= 0, ">= 0"),
            *((w, math.isfinite(getattr(args, w)) and getattr(args, w) >= 0, "a finite number >= 0") for w in
              ("perceptual_weight", "gan_weight", "disentangle_weight", "rep_weight")),
            ("entropy_weight", args.entropy_weight is None or args.entropy_weight >= 0, "a number >= 0"),
            *((n, getattr(args, n) >= 1, "an integer >= 1") for n in
              ("log_every", "sample_every", "eval_every", "ckpt_every")))
    if args.l2_norm and PRESETS[args.preset].get("quantizer") == "ibq":
        p.error(f"--l2-norm is out of range for preset {args.preset}: its IBQ quantizer never normalises (VQ only)")
    if args.data_path is None:                                        # paper presets: no default data
        p.error(f"--data-path is required for preset {args.preset} (the bundled photos are for the tiny presets)")
    downsample = TokenizerConfig(**PRESETS[args.preset]).downsample   # f: grid = image_size // f
    if args.image_size is not None and (args.image_size < downsample or args.image_size % downsample):
        p.error(f"--image-size {args.image_size} is out of range: preset {args.preset} needs a positive multiple of "
                f"its downsample factor {downsample}")
    shape = (args.image_size,) * 2 if args.image_size else TokenizerConfig(**PRESETS[args.preset]).image_shape
    half = [n // 2 for n in shape]                                    # the --low-res-steps crops
    if args.low_res_steps and (any(n % downsample for n in half) or (args.gan_weight > 0 and min(half) < 32)):
        p.error(f"--low-res-steps {args.low_res_steps}: half-size crops of {half} px need a multiple of the downsample "
                f"factor {downsample}{' and at least 32 px for the GAN' if args.gan_weight > 0 else ''}; give "
                f"--low-res-steps 0 or a larger --image-size")
    return args


# --------------------------------------------------------------------------------------------------------------
# What main() calls

def load_data(args, cfg, parser):
    """(training set with the random crop, its half-size windows for --low-res-steps or None, held-out set with the
    centre crop or None, held-out photos or None)."""
    try:                                                               # a --hold-out class must exist: exit 2 if not
        crops = lambda shape, scale_of=None: ImageFolder(args.data_path, shape, train=True, seed=args.seed,
                                                         exclude=args.hold_out, max_scale=args.crop_scale,
                                                         scale_of=scale_of, cache_mib=args.cache_mib)
        dataset = crops(cfg.image_shape)
        # --low-res-steps: half-size windows at the full-size scale (not a whole full-size crop halved)
        small = crops(tuple(n // 2 for n in cfg.image_shape), cfg.image_shape) if args.low_res_steps else None
        val_set = (ImageFolder(args.val_path, cfg.image_shape, train=False, exclude=args.hold_out) if args.val_path
                   else None)
        held_out = ConcatDataset([ImageFolder(root, cfg.image_shape, train=False, only=args.hold_out) for root in
                                  (args.data_path, args.val_path) if root]) if args.hold_out else None
    except ValueError as e:
        parser.error(f"--hold-out: {e}")
    except FileNotFoundError as e:                                    # a folder without images
        parser.error(str(e))
    if val_set is not None and val_set.first_readable() is None:     # every held-out file unreadable
        parser.error(f"--val-path {args.val_path}: none of its {len(val_set)} images could be read")
    try:
        dataset[0]                                                    # one read; the next readable file stands in
    except RuntimeError:                                              # none of them: the loader would fail mid-run
        parser.error(f"--data-path {args.data_path}: none of its {len(dataset)} images could be read")
    if args.global_batch_size > len(dataset):                         # every batch would repeat images
        parser.error(f"--global-batch-size {args.global_batch_size} is larger than the data: {len(dataset)} images "
                     f"under --data-path {args.data_path}")
    return dataset, small, val_set, held_out


def build_models(args, cfg, device):
    """(tokenizer, its EMA, PatchGAN, LPIPS or None, {branch: frozen teacher}) on device, with the same initial
    weights on every rank. PatchGAN is built even at gan_weight 0 (every checkpoint holds "disc"). Under --precision
    bf16 the frozen LPIPS and teachers are cast once (autocast would recast them at every step). Without a teacher
    the feature heads are frozen: the forward skips them, and DDP must not wait for their gradients."""
    torch.manual_seed(args.seed)
    tok, disc = Tokenizer(cfg).to(device), PatchGAN().to(device)
    ema = copy.deepcopy(tok).requires_grad_(False)                    # the EMA starts at the initial weights
    lpips = LPIPS().to(device) if args.perceptual_weight > 0 else None   # frozen VGG16 + lin layers
    teachers = build_teachers(cfg.teachers, device=device) if args.rep_weight > 0 else {}   # frozen: never DDP
    for frozen in [m for m in (lpips, *teachers.values()) if m is not None and args.precision == "bf16"]:
        frozen.to(torch.bfloat16)
    for head in [b.feat_head for b in tok.branches if b.feat_head is not None and not teachers]:
        head.requires_grad_(False)
    return tok, ema, disc, lpips, teachers


@torch.no_grad()
def psnr_on(models, dataset, device, rank=0, world=1, batch_size=16):
    """Mean PSNR (dB) of decode(encode(x)) on [0, 1] images, per image, over a held-out dataset -> one value per model
    (the raw and the EMA weights: each image is read and decoded from its file once for both). Every rank takes part
    (each its share of the images, summed over ranks), so no rank idles into a collective timeout on a large set.
    Decoded in this process: loader workers forked mid-run (gloo's and OpenMP's threads alive) deadlocked once."""
    total = torch.zeros(len(models) + 1, dtype=torch.float64, device=device)   # PSNR sums per model, image count
    loader = DataLoader(Subset(dataset, range(rank, len(dataset), world)), batch_size=batch_size)   # strided: each once
    for model in models:
        model.eval()                                                   # eval mode, as evaluate.py
    for x, label, _, _ in loader:
        x = x[label >= 0].to(device)                                  # unreadable files dropped
        if not len(x):
            continue                                                  # a batch of unreadable files: nothing to add
        for m, model in enumerate(models):
            x_rec = model.decode_codes(model.encode(x)).clamp(-1, 1)  # from the codes, as evaluate.py (§4.1)
            mse = ((x_rec - x) / 2).pow(2).flatten(1).mean(1)         # on [0, 1] images: (x - y) / 2
            total[m] += (10 * torch.log10(1 / mse.clamp(min=1e-10))).sum().double()
        total[-1] += len(x)
    if dist.is_initialized():
        dist.all_reduce(total)                                        # sums over ranks, then one division
    for model in models:
        model.train()                                                 # callers are inside the training loop
    return (total[:-1] / total[-1]).tolist()


def usage(counts):
    """Tab. 3: usage and perplexity of each sub-codebook from its code histogram (k, K) over the steps since the last
    log line, all ranks; usage_tokens: the tokens per sub-codebook they count (usage <= usage_tokens / K)."""
    stats = [usage_of_counts(c) for c in counts]                      # a collective each
    return {**{f"{name}/{i}": s[name].item() for i, s in enumerate(stats) for name in ("usage", "perplexity")},
            "usage_tokens": int(stats[0]["tokens"].item())}


def count_codes(seen, codes):
    """Add the codes (B, k, h, w) to the histograms seen (k, K) in place: sub-codebook i's code c counts at i*K + c of
    the flat view. index_add_ rather than bincount, which needs the largest code first (a GPU sync every step)."""
    k, K = seen.shape
    at = codes + K * torch.arange(k, device=codes.device).view(1, -1, 1, 1)   # (B, k, h, w) flat indices
    seen.view(-1).index_add_(0, at.flatten(), torch.ones(at.numel(), device=seen.device))


def unreadable_record(files, dataset):
    """{"unreadable_images": distinct unreadable files over all ranks, "unreadable_files": the first 5 (paths)}."""
    gathered = [files]
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, files)                       # sets of indices, pickled
    files = sorted(set().union(*gathered))                            # a file two ranks skipped counts once
    return {"unreadable_images": len(files), **({"unreadable_files": [dataset.samples[i][0] for i in files[:5]]}
                                                if files else {})}


# --------------------------------------------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv                     # for the resume command of a stopped run
    args, parser = parse_args(argv)
    ddp, rank, world, device, batch = start_training(args, parser)   # torchrun: NCCL / gloo; plain python: 1 process
    master, last = rank == 0, os.path.join(args.out_dir, "checkpoints", "last.pt")
    overrides = dict(image_size=args.image_size, codebook_size=args.codebook_size, codebook_dim=args.codebook_dim,
                     l2_norm=args.l2_norm, entropy_weight=args.entropy_weight)
    cfg = TokenizerConfig(**{**PRESETS[args.preset], **{k: v for k, v in overrides.items() if v is not None}})
    dataset, small, val_set, held_out = load_data(args, cfg, parser)

    # The models, the losses' frozen networks, the optimizers; resume; the run's folder and log
    try:   # LPIPS' or a teacher's weight files missing: the message says which, where from, where to put them
        tok, ema, disc, lpips, teachers = build_models(args, cfg, device)
    except (FileNotFoundError, ValueError) as e:                      # ValueError: a teacher file of another kind
        parser.error(str(e))
    model = distribute(tok, ddp, device, args.compile)                 # DDP (all-reduce in backward), then compiled
    # D's BatchNorm normalises with each rank's batch statistics, not synced (# parity: §2.3); never compiled
    d_model = distribute(disc, ddp, device, compile_=False) if args.gan_weight > 0 else None   # 0: D never runs
    # no weight decay; fused: one kernel for all tensors (CPU and CUDA; on a CPU several times faster than the
    # per-tensor loop that is torch's default there, docs/results.md "Fused Adam"), the same update up to rounding
    opt_g = torch.optim.Adam(tok.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), fused=True)
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), fused=True)
    loss_cfg = LossConfig(perceptual_weight=args.perceptual_weight, gan_weight=args.gan_weight,
                          gan_start=args.gan_start, disentangle_weight=args.disentangle_weight,
                          rep_weight=args.rep_weight)
    state = {"model": tok, "ema": ema, "disc": disc, "opt_g": opt_g, "opt_d": opt_d}   # what a checkpoint holds
    step = resume(args, parser, cfg, state, rank)                      # 0, or the step of OUT/checkpoints/last.pt
    if args.init_from and step == 0:                                    # fine-tuning (a resumed run continues instead)
        try:
            init_weights(tok, load_tokenizer(args.init_from, device), f"--init-from {args.init_from}")
        except CheckpointError as e:
            parser.error(str(e))
        ema.load_state_dict(tok.state_dict())                           # the EMA starts there too
    notes = [f"initialised from {args.init_from}" if args.init_from and step == 0 else "", f"note: class folders "
             f"without images (their ids are kept): {', '.join(dataset.empty)}" if dataset.empty else ""]
    log = open_run(args, master, f"{args.preset}: {sum(p.numel() for p in tok.parameters()) / 1e6:.1f} M parameters, "
                   f"{len(dataset)} images, world {world}, batch {batch}/rank, steps {step} -> {args.max_steps}, "
                   f"{device}, {args.precision}" + "".join(f"; {n}" for n in notes if n), step)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")   # weights fp32
    if val_set is not None and step == 0:                              # the "before" of the held-out PSNR
        log({"step": 0, "val_psnr": psnr_on([tok], val_set, device, rank, world)[0]})

    # The loop, Eq. (8): a G step, a D step on the same images, the EMA
    # the stream of training crops from `step` on: half-size windows before --low-res-steps
    crops = lambda step: stream(small if step < args.low_res_steps else dataset, batch, args.seed, rank, world, step,
                                args.num_workers, device.type == "cuda")
    batches = crops(step)
    bar = tqdm(total=args.max_steps, initial=step, disable=not master, desc="train", dynamic_ncols=True)
    unreadable, t0, images = set(), time.time(), 0                     # images: the throughput of this run only
    saved_at = t0                                                      # --ckpt-minutes counts from here
    ema_params, params = list(ema.parameters()), list(tok.parameters())
    seen = torch.zeros(cfg.num_codebooks, cfg.codebook_size, device=device)   # code histogram since the last log
    while step < args.max_steps:
        if step == args.low_res_steps and step > 0:                    # from here on, crops of --image-size
            batches = crops(step)
        x, _, index, skipped = next(batches)                           # x (B, 3, H, W) in [-1, 1]; labels unused
        x = x.to(device, non_blocking=True)                            # overlaps the copy when pin_memory
        unreadable |= unreadable_files(index, skipped, len(dataset))  # distinct files, not draws
        with autocast:                                                  # generator step, Eq. (8)
            x_rec, aux = model(x, features=bool(teachers))              # Eq. (3)-(6); aux: codes, z_q, losses, features
            g = generator_loss(x, x_rec, aux, step, lpips=lpips, disc=d_model, teachers=teachers, cfg=loss_cfg)
        for group in opt_g.param_groups + opt_d.param_groups:           # from the step: resume needs no state
            group["lr"] = lr_at(args, step)
        opt_g.zero_grad(set_to_none=True)
        g["total"].backward()                                           # DDP all-reduces G's gradients here
        g["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)   # logged: the pre-clip norm
        opt_g.step()
        with torch.no_grad():   # EMA of the generator weights (parameters only, as official --ema), one fused op
            torch._foreach_lerp_(ema_params, params, 1 - args.ema_decay)   # p_ema = decay p_ema + (1 - decay) p
        d = {}
        if d_model is not None:   # discriminator step on the same images and the pre-update reconstructions
            with autocast:                                              # hinge loss, 0 before --gan-start
                d = discriminator_loss(x, x_rec, step, d_model, cfg=loss_cfg)
            opt_d.zero_grad(set_to_none=True)                           # drop what the G step left in D
            d["total"].backward()
            torch.nn.utils.clip_grad_norm_(disc.parameters(), args.grad_clip)
            opt_d.step()
        step, images = step + 1, images + x.shape[0] * world              # step = optimizer steps taken
        count_codes(seen, aux["codes"])                                # the usage of the next log line
        bar.update(1)
        # every term averaged over ranks; a non-finite one stops training before any checkpoint is written
        terms = mean_over_ranks_or_stop({**{f"g/{k}": v for k, v in g.items()}, **{f"d/{k}": v for k, v in d.items()}},
                                        step, last, bar)
        end = step == args.max_steps                                    # always log, evaluate, save the last step
        if step % args.log_every == 0 or end:                           # usage and unreadable: every rank takes part
            log({"step": step, **terms, "images_per_s": images / (time.time() - t0), **usage(seen),
                **unreadable_record(unreadable, dataset)})
            seen.zero_()
            bar.set_postfix(rec=f"{terms['g/rec']:.4f}")
        if master and step % args.sample_every == 0:                    # inputs above, reconstructions below
            save_grid(torch.cat([x[:8], x_rec[:8].detach()]),
                      os.path.join(args.out_dir, "samples", f"{step:07d}.png"), nrow=len(x[:8]))
        if val_set is not None and (step % args.eval_every == 0 or end):   # raw and EMA weights, every rank
            raw, smooth = psnr_on([tok, ema], val_set, device, rank, world)
            log({"step": step, "val_psnr": raw, "val_psnr_ema": smooth,
                 **({"held_out_psnr_ema": psnr_on([ema], held_out, device, rank, world)[0]} if held_out else {})})
        # a stop signal or --ckpt-minutes: last.pt now (numbered at --ckpt-every and the end only); then stop if asked
        stop, save_due = stop_requested(device, master and time.time() - saved_at > 60 * args.ckpt_minutes)
        if step % args.ckpt_every == 0 or end or stop or save_due:
            save_checkpoint(args, cfg, step, batch, state, numbered=step % args.ckpt_every == 0 or end)
            saved_at = time.time()
        if stop:
            bar.close()                                                 # the bar's line ends before the last line
            exit_stopped(args, step, argv, "train_tokenizer.py")
    bar.close()
    release_stop_signals()                                             # ablate.py goes on: Ctrl-C acts at once
    if master:                                                         # the last line: where the weights are
        print(f"done: step {step}, {len(unreadable)} unreadable images skipped, checkpoint {last}")
    if ddp:
        dist.destroy_process_group()                                   # a clean exit for torchrun


if __name__ == "__main__":
    main()
