"""Train the FQGAN tokenizer (or the VQGAN / IBQ baselines) with plain torch.distributed DDP.

Paper: "Factorized Visual Tokenization and Generation", Bai et al., arXiv 2411.16681.
  Sec. 4.1  ImageNet 256x256, global batch 256, constant lr 2e-4, Adam betas (0.9, 0.95), 40 epochs, 8 GPUs
  Eq. (8)   the objective (losses.py): L_rec + L_VQ + LPIPS + GAN + lambda_dis L_dis + lambda_rep L_rep
Recipe details follow the official scripts (docs/official_code.md §3); every preset's defaults are its row of
the RECIPES below, and `--help` prints them for the chosen --preset.

GPU (the paper's FQGAN-Dual f16, 8 GPUs, ~200k steps; needs the LPIPS and CLIP weights, see README):
  torchrun --nproc_per_node=8 train_tokenizer.py --preset fqgan-dual-16 --data-path /data/imagenet/train \\
      --out-dir runs/dual16
CPU (the tiny preset on the bundled photos, minutes on 2 cores):
  python train_tokenizer.py --preset tiny --out-dir runs/tiny
Resume either with the same command plus --resume. Two processes on one CPU: torchrun --standalone
--nproc_per_node=2 train_tokenizer.py ... (gloo on CPU, NCCL on CUDA).
"""
import argparse
import json
import math
import os
import time
from dataclasses import asdict
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.utils.data import ConcatDataset, DataLoader
from tqdm import tqdm

from checkpoints import (CheckpointError, distribute, init_distributed, mean_over_ranks_or_stop,
                         read_resume, remove_stale_temps, rng_states, save_last, set_rng_states)
from images import BUNDLED, ImageFolder, StreamSampler, save_grid, unreadable_files
from losses import LPIPS, LossConfig, PatchGAN, discriminator_loss, generator_loss
from quantizer import codebook_usage
from teachers import build_teachers
from tokenizer import PRESETS, Tokenizer, TokenizerConfig


# The training recipe of every tokenizer preset: this script's defaults, which `--help` prints for the chosen --preset.
# Paper presets: Sec. 4.1 (batch 256, constant lr 2e-4, ~40 epochs = 200k steps) and the official scripts (LPIPS 1.0,
# GAN 0.5 from step 20k, the official crop; official_code.md §2.1, §3.1; they keep no EMA, we do). Tiny presets: 2 CPU
# cores and the bundled photos (bundled_data), no LPIPS (its weights are not available offline) and no GAN (without
# LPIPS it wrecked reconstruction in an earlier run).
_PAPER_RECIPE = dict(bundled_data=False, global_batch_size=256, max_steps=200_000, lr=2e-4, ema_decay=0.9999,
                     perceptual_weight=1.0, gan_weight=0.5, gan_start=20_000, lr_decay="constant", warmup_steps=0,
                     crop_scale=1.25)
# The tiny recipe (README "The tiny models"): lr 1e-3 with 50 warm-up steps and a cosine to 0, and training crops
# with the short side up to 3x the crop (the 256 px train tiles seen from 1/4 to 3/4 of their size, which includes
# the 1/2 at which the 128 px val strips are evaluated); 600 steps take 12 minutes on 2 cores with bf16.
_TINY_RECIPE = dict(bundled_data=True, global_batch_size=16, max_steps=600, lr=1e-3, ema_decay=0.99,
                    perceptual_weight=0.0, gan_weight=0.0, gan_start=400, lr_decay="cosine", warmup_steps=50,
                    crop_scale=3.0)
RECIPES = {p: _TINY_RECIPE if p.startswith("tiny") else _PAPER_RECIPE for p in PRESETS}


# --------------------------------------------------------------------------------------------------------------
# Arguments: the preset's recipe (RECIPES) fills the defaults, so --help prints the real numbers

def parse_args(argv=None):
    first = argparse.ArgumentParser(add_help=False)                   # pass 1: which preset's recipe
    first.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    recipe = RECIPES[first.parse_known_args(argv)[0].preset]           # pass 2 below takes its defaults from here
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # model and data
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="tokenizer preset (tokenizer.PRESETS, "
                   "its recipe train_tokenizer.RECIPES); the defaults below are this preset's. Default: %(default)s")
    p.add_argument("--data-path", default=os.path.join(BUNDLED, "train") if recipe["bundled_data"] else None,
                   help="ImageFolder root of training images (default: %(default)s)")
    p.add_argument("--val-path", default=None, help="ImageFolder root of held-out images for the PSNR of "
                   "--eval-every (default: data/photos/val when --data-path is the bundled data/photos/train, "
                   "else none)")
    p.add_argument("--hold-out", nargs="+", default=[], metavar="CLASS", help="classes (whole photos) left out of "
                   "training and of the val PSNR; their PSNR (all their images) is logged as held_out_psnr_ema")
    p.add_argument("--crop-scale", type=float, default=recipe["crop_scale"], help="training crops: short side to "
                   "S ~ U{s..s * crop-scale}, then a random s x s crop (official 1.25) (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=None, help="training resolution (default: the preset's)")
    p.add_argument("--codebook-size", type=int, default=None, help="K, entries per sub-codebook (default: preset's)")
    p.add_argument("--out-dir", default="runs/tokenizer", help="checkpoints, log.jsonl, sample PNGs (%(default)s)")
    # optimisation (Sec. 4.1 and the official script, official_code.md §3.1: Adam (0.9, 0.95), no weight decay,
    # constant lr, clip 1.0; one Adam for G, one for D, same settings)
    p.add_argument("--global-batch-size", type=int, default=recipe["global_batch_size"],
                   help="images per step over all ranks (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=recipe["max_steps"], help="training steps (default: %(default)s)")
    p.add_argument("--lr", type=float, default=recipe["lr"], help="lr of both Adam optimizers (default: %(default)s)")
    p.add_argument("--lr-decay", choices=["constant", "cosine"], default=recipe["lr_decay"],   # official: constant
                   help="lr after warm-up: constant, or a cosine to 0 at --max-steps (a resumed run keeps its "
                   "--max-steps for the same schedule) (default: %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=recipe["warmup_steps"],
                   help="steps of linear lr warm-up from 0 (default: %(default)s)")
    p.add_argument("--beta1", type=float, default=0.9, help="Adam beta1 (official script; default: %(default)s)")
    p.add_argument("--beta2", type=float, default=0.95, help="Adam beta2 (official script; default: %(default)s)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, G and D each (%(default)s)")
    # NOTE(paper≠code): the official scripts train without EMA (§3.1); we keep one, and load_tokenizer prefers it
    p.add_argument("--ema-decay", type=float, default=recipe["ema_decay"],
                   help="EMA decay of the generator weights, in [0, 1) (default: %(default)s)")
    # loss weights, Eq. (2) and (8)
    p.add_argument("--perceptual-weight", type=float, default=recipe["perceptual_weight"],
                   help="lambda_P of LPIPS, Eq. (2); 0 = no LPIPS (default: %(default)s)")
    p.add_argument("--gan-weight", type=float, default=recipe["gan_weight"],
                   help="lambda_G of the hinge GAN, Eq. (2); 0 = no discriminator at all (default: %(default)s)")
    p.add_argument("--gan-start", type=int, default=recipe["gan_start"],   # official: 20k, G and D alike (§2.3)
                   help="step the GAN terms switch on (default: %(default)s)")
    p.add_argument("--disentangle-weight", type=float, default=0.1,   # Sec. 3.2.1, official §2.4
                   help="lambda_dis of Eq. (7)-(8) (default: %(default)s)")
    p.add_argument("--rep-weight", type=float, default=0.5, help="lambda_rep of Eq. (8), per teacher-supervised "
                   "branch; 0 = no teacher (default: %(default)s)")
    # code-distribution entropy term: 0.03 per codebook in the official scripts (official_code §1.5), IBQ 0.05 (§8.3)
    p.add_argument("--entropy-weight", type=float, default=None, help="entropy loss weight (default: preset's)")
    # runtime
    p.add_argument("--seed", type=int, default=0, help="base seed; rank r uses seed + r (default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=2, help="data loader workers per rank (default: %(default)s)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,   # official: bf16 autocast + TF32 (§3.1)
                   help="autocast dtype of the forward (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,   # None: by device in build()
                   help="torch.compile the tokenizer (default: on with CUDA, off on CPU)")
    p.add_argument("--log-every", type=int, default=50, help="steps between JSONL log lines (%(default)s)")
    p.add_argument("--sample-every", type=int, default=500, help="steps between reconstruction PNGs (%(default)s)")
    p.add_argument("--eval-every", type=int, default=500, help="steps between held-out PSNRs (%(default)s)")
    p.add_argument("--ckpt-every", type=int, default=1000, help="steps between numbered checkpoints (%(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")  # exact step + data
    return check_args(p, p.parse_args(argv)), p


def check_args(p, args):
    """Every value is checked here, before any work: one line naming the flag, the value and the valid range, exit 2
    (argparse's p.error). Fills in the bundled val strips as --val-path for the bundled train photos."""
    if args.val_path is None and args.data_path == os.path.join(BUNDLED, "train"):
        args.val_path = os.path.join(BUNDLED, "val")                  # the bundled photos' held-out strip
    for name, ok, valid in (
            ("global_batch_size", args.global_batch_size >= 1, "an integer >= 1"),
            ("max_steps", args.max_steps >= 1, "an integer >= 1"),
            ("warmup_steps", args.warmup_steps >= 0, "an integer >= 0"),
            ("crop_scale", math.isfinite(args.crop_scale) and args.crop_scale >= 1, "a number >= 1"),
            ("lr", math.isfinite(args.lr) and args.lr > 0, "a finite number > 0"),
            ("ema_decay", 0 <= args.ema_decay < 1, "in [0, 1)"),
            ("grad_clip", args.grad_clip > 0, "> 0"),
            ("codebook_size", args.codebook_size is None or args.codebook_size >= 2, "an integer >= 2"),
            ("num_workers", args.num_workers >= 0, "an integer >= 0"),
            *((w, math.isfinite(getattr(args, w)) and getattr(args, w) >= 0, "a finite number >= 0") for w in
              ("perceptual_weight", "gan_weight", "disentangle_weight", "rep_weight")),
            ("entropy_weight", args.entropy_weight is None or args.entropy_weight >= 0, "a number >= 0"),
            *((n, getattr(args, n) >= 1, "an integer >= 1") for n in
              ("log_every", "sample_every", "eval_every", "ckpt_every"))):
        if not ok:                                                    # argparse's error: usage line, exit 2
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} is out of range: must be {valid}")
    if args.data_path is None:                                        # paper presets: no default data
        p.error(f"--data-path is required for preset {args.preset} (the bundled photos are for the tiny presets)")
    downsample = TokenizerConfig(**PRESETS[args.preset]).downsample   # f: grid = image_size // f
    if args.image_size is not None and (args.image_size < downsample or args.image_size % downsample):
        p.error(f"--image-size {args.image_size} is out of range: preset {args.preset} needs a positive multiple of "
                f"its downsample factor {downsample}")
    return args


# --------------------------------------------------------------------------------------------------------------
# Set-up: models, losses, optimizers

def build(args, cfg, device, ddp):
    """Everything the loop trains or calls, as one namespace m: m.raw (the tokenizer), m.ema (its EMA), m.model (what
    the loop calls: raw in DDP and / or compiled), m.disc_raw / m.disc (PatchGAN; disc None when gan_weight = 0),
    m.opt_g / m.opt_d, m.lpips (None when perceptual_weight = 0), m.teachers ({branch: frozen teacher}), m.loss_cfg.
    Every module is on `device`; every rank builds the same initial weights from args.seed."""
    torch.manual_seed(args.seed)                                        # same initial weights on every rank
    # the EMA never trains (no grad); PatchGAN is built even at gan_weight 0: checkpoints always hold "disc", "opt_d"
    m = SimpleNamespace(raw=Tokenizer(cfg).to(device), ema=Tokenizer(cfg).to(device).requires_grad_(False),
                        disc_raw=PatchGAN().to(device))
    m.ema.load_state_dict(m.raw.state_dict())                          # the EMA starts at the initial weights
    m.lpips = LPIPS().to(device) if args.perceptual_weight > 0 else None   # frozen VGG16 + lin layers (§2.2)
    m.teachers = build_teachers(cfg.teachers, device=device) if args.rep_weight > 0 else {}   # frozen: never DDP
    if args.precision == "bf16":                                        # frozen: cast once, not by autocast per step
        for frozen in [m.lpips, *m.teachers.values()]:
            frozen.to(torch.bfloat16) if frozen is not None else None
    for branch in m.raw.branches:   # no teacher: the heads are not run (features=False), so they must not train
        if branch.feat_head is not None and not m.teachers:             # (DDP would wait for their gradients)
            branch.feat_head.requires_grad_(False)
    m.model = distribute(m.raw, ddp, device, device.type == "cuda" if args.compile is None else args.compile)
    m.disc = m.disc_raw if args.gan_weight > 0 else None               # gan_weight 0: D is never run
    if ddp and m.disc is not None:   # D's BatchNorm normalises with per-rank batch statistics (not synced, §2.3)
        m.disc = distribute(m.disc, ddp, device, compile_=False)
    # the optimizers hold the raw parameters, which compile and DDP share (no copies)
    m.opt_g = torch.optim.Adam(m.raw.parameters(), lr=args.lr, betas=(args.beta1, args.beta2))   # no weight decay
    m.opt_d = torch.optim.Adam(m.disc_raw.parameters(), lr=args.lr, betas=(args.beta1, args.beta2))
    # the Eq. (2) / (8) weights; rec_weight stays 1 (MSE), the quantizer's own terms are weighted in quantizer.py
    m.loss_cfg = LossConfig(perceptual_weight=args.perceptual_weight, gan_weight=args.gan_weight,
                            gan_start=args.gan_start, disentangle_weight=args.disentangle_weight,
                            rep_weight=args.rep_weight)
    return m


def lr_at(args, step):
    """lr of the update that step `step` (0-based) makes: linear warm-up over --warmup-steps, then constant (official)
    or a cosine from --lr to 0 at --max-steps (tiny recipe: the short run ends annealed)."""
    warm = min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else 1.0
    if args.lr_decay == "cosine":
        warm *= 0.5 * (1 + math.cos(math.pi * min(step, args.max_steps) / args.max_steps))
    return args.lr * warm


def save_checkpoint(args, cfg, m, step, batch, ddp, world, master):
    """Every rank holds the same weights; gather every rank's RNG state, rank 0 writes last.pt atomically (+ a
    numbered copy every --ckpt-every steps). Plain types only: torch.load(weights_only=True) reads it."""
    rng = rng_states(ddp, world)                                       # a collective: every rank calls it
    if master:
        # samples_per_rank: where each rank's StreamSampler resumes (step * per-rank batch)
        state = {"model": m.raw.state_dict(), "ema": m.ema.state_dict(), "disc": m.disc_raw.state_dict(),
                 "opt_g": m.opt_g.state_dict(), "opt_d": m.opt_d.state_dict(), "step": step, "config": asdict(cfg),
                 "args": vars(args), "rng": rng, "data": {"samples_per_rank": step * batch}}
        # last.pt (what --resume reads) and, every --ckpt-every and at the end, a numbered fall-back for read_resume
        save_last(state, os.path.join(args.out_dir, "checkpoints"), step % args.ckpt_every == 0 or step == args.max_steps)
    if ddp:
        dist.barrier()                                                 # no rank runs ahead of a half-written file


@torch.no_grad()
def psnr_on(model, dataset, device, ddp=False, rank=0, world=1, batch_size=16):
    """Mean PSNR (dB) of decode(encode(x)) on [0, 1] images, per image, over a held-out dataset. Every rank takes part
    (each its share of the images, summed over ranks), so no rank idles into a collective timeout on a large set."""
    model.eval()                                                       # eval mode, as evaluate.py
    total = torch.zeros(2, dtype=torch.float64, device=device)       # sum of PSNRs, number of images
    mine = list(range(rank, len(dataset), world))                    # strided share: every image counted once
    for i in range(0, len(mine), batch_size):
        items = [dataset[j] for j in mine[i:i + batch_size]]          # (image, label, index, skipped) each
        readable = [img for img, label, _, _ in items if label >= 0]   # unreadable files dropped
        if not readable:
            continue                                                  # a batch of unreadable files: nothing to add
        x = torch.stack(readable).to(device)
        x_rec = model.decode_codes(model.encode(x)).clamp(-1, 1)     # from the codes, as evaluate.py (§4.1)
        mse = ((x_rec - x) / 2).pow(2).flatten(1).mean(1)            # on [0, 1] images: (x - y) / 2
        total += torch.stack([(10 * torch.log10(1 / mse.clamp(min=1e-10))).sum().double(),
                              torch.tensor(len(x), dtype=torch.float64, device=device)])
    if ddp:
        dist.all_reduce(total)                                        # sums over ranks, then one division
    model.train()                                                     # callers are inside the training loop
    return (total[0] / total[1]).item()


def count_over_ranks(files, ddp, world):
    """Number of distinct dataset indices in the union of every rank's set (the unreadable files seen so far)."""
    if not ddp:
        return len(files)
    gathered = [None] * world
    dist.all_gather_object(gathered, files)                           # sets of indices, pickled
    return len(set().union(*gathered))                                # a file two ranks skipped counts once


# --------------------------------------------------------------------------------------------------------------

def main(argv=None):
    """Parse, set up torchrun, build or resume everything, then train(); see the module docstring for commands."""
    args, parser = parse_args(argv)
    ddp, rank, world, _, device = init_distributed()                 # world 1 without torchrun
    if args.global_batch_size % world:                                 # each rank takes global / world images
        parser.error(f"--global-batch-size {args.global_batch_size} is not divisible by the world size {world}")
    batch, master = args.global_batch_size // world, rank == 0
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")   # as official on GPUs (§3.1)
    # flags left at None keep the preset's value; the others override it
    overrides = {k: v for k, v in dict(image_size=args.image_size, codebook_size=args.codebook_size,
                                      entropy_weight=args.entropy_weight).items() if v is not None}
    cfg = TokenizerConfig(**{**PRESETS[args.preset], **overrides})
    try:                                                               # before the model: a --hold-out class must exist
        dataset = ImageFolder(args.data_path, cfg.image_shape, train=True, seed=args.seed, exclude=args.hold_out,
                              max_scale=args.crop_scale)
        val_set = (ImageFolder(args.val_path, cfg.image_shape, train=False, exclude=args.hold_out) if args.val_path
                   else None)                                          # official random crop (§3.2); centre crop
        held_out = ConcatDataset([ImageFolder(root, cfg.image_shape, train=False, only=args.hold_out) for root in
                                  (args.data_path, args.val_path) if root]) if args.hold_out else None
    except ValueError as e:
        parser.error(f"--hold-out: {e}")
    m = build(args, cfg, device, ddp)

    # resume: weights, both optimizers, every rank's RNG and the data position --------------------------------
    step, last = 0, os.path.join(args.out_dir, "checkpoints", "last.pt")
    try:
        ckpt = read_resume(args.out_dir, cfg, args.global_batch_size) if args.resume else None
    except CheckpointError as e:
        parser.error(str(e))
    torch.manual_seed(args.seed + rank)                                # per-rank randomness from here on
    if ckpt is not None:
        for module, key in ((m.raw, "model"), (m.ema, "ema"), (m.disc_raw, "disc"), (m.opt_g, "opt_g"),
                            (m.opt_d, "opt_d")):
            module.load_state_dict(ckpt[key])
        step = ckpt["step"]                                            # the loop continues at step + 1
        set_rng_states(ckpt["rng"], rank)                              # after the reseed above, which it replaces
    if master:
        os.makedirs(os.path.join(args.out_dir, "samples"), exist_ok=True)
        os.makedirs(os.path.dirname(last), exist_ok=True)
        stale = remove_stale_temps(os.path.dirname(last))             # temp files of a killed checkpoint write
        # the parameter count includes any feature heads (Sec. 3.2.2), which only training uses
        print(f"{args.preset}: {sum(p.numel() for p in m.raw.parameters()) / 1e6:.1f} M parameters, {len(dataset)} "
              f"images, world {world}, batch {batch}/rank, steps {step} -> {args.max_steps}, {device}, "
              f"{args.precision}" + (f"; removed stale {', '.join(stale)}" if stale else ""))
        if args.resume and ckpt is None:
            print(f"--resume: no {last} yet, starting from scratch")
    train(args, cfg, m, step, batch, dataset, val_set, held_out, ddp, rank, world, device)
    if ddp:
        dist.destroy_process_group()                                   # a clean exit for torchrun


def train(args, cfg, m, step, batch, dataset, val_set, held_out, ddp, rank, world, device):
    """The loop, Eq. (8): a G step, a D step on the same images, the EMA; logs, held-out PSNR, PNGs, checkpoints."""
    master, last = rank == 0, os.path.join(args.out_dir, "checkpoints", "last.pt")
    log = open(os.path.join(args.out_dir, "log.jsonl"), "a") if master else None   # appended to on --resume
    write = lambda record: master and (log.write(json.dumps(record) + "\n"), log.flush())   # one JSON per line
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")   # weights fp32
    if val_set is not None and step == 0:                              # the "before" of the held-out PSNR
        write({"step": 0, "val_psnr": psnr_on(m.raw, val_set, device, ddp, rank, world)})
    # one endless stream of epochs per rank: the same permutation on every rank, each taking its own share
    sampler = StreamSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    sampler.start = step * batch                                        # exact data position on resume
    # The loader draws its base seed from its own generator, not from the global RNG (exact resume).
    loader = iter(DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=args.num_workers,
                             pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0,
                             generator=torch.Generator().manual_seed(args.seed + rank)))
    bar = tqdm(total=args.max_steps, initial=step, disable=not master, desc="train", dynamic_ncols=True)
    unreadable, t0, images = set(), time.time(), 0                     # images: the throughput of this run only
    ema_params, raw_params = list(m.ema.parameters()), list(m.raw.parameters())
    while step < args.max_steps:
        x, _, index, skipped = next(loader)                            # x (B, 3, H, W) in [-1, 1]; labels unused
        x = x.to(device, non_blocking=True)                            # overlaps the copy when pin_memory
        unreadable |= unreadable_files(index, skipped, len(dataset))  # distinct files, not draws
        # generator step, Eq. (8) -------------------------------------------------------------------------------
        with autocast:
            x_rec, aux = m.model(x, features=bool(m.teachers))         # Eq. (3)-(6); aux: codes, z_q, losses, features
            g = generator_loss(x, x_rec, aux, step, lpips=m.lpips, disc=m.disc, teachers=m.teachers, cfg=m.loss_cfg)
        for group in m.opt_g.param_groups + m.opt_d.param_groups:       # from the step: resume needs no state
            group["lr"] = lr_at(args, step)
        m.opt_g.zero_grad(set_to_none=True)
        g["total"].backward()                                           # DDP all-reduces G's gradients here
        g["grad_norm"] = torch.nn.utils.clip_grad_norm_(m.raw.parameters(), args.grad_clip)   # logged: pre-clip norm
        m.opt_g.step()
        with torch.no_grad():   # EMA of the generator weights (parameters only, as official --ema), one fused op
            torch._foreach_lerp_(ema_params, raw_params, 1 - args.ema_decay)   # p_ema = decay p_ema + (1 - decay) p
        # discriminator step, after G, on the same images and the pre-update reconstructions ------------------
        d = {}
        if m.disc is not None:
            with autocast:                                              # hinge loss, 0 before --gan-start (§2.3)
                d = discriminator_loss(x, x_rec, step, m.disc, cfg=m.loss_cfg)
            m.opt_d.zero_grad(set_to_none=True)                         # drop what the G step left in D
            d["total"].backward()
            torch.nn.utils.clip_grad_norm_(m.disc_raw.parameters(), args.grad_clip)
            m.opt_d.step()
        step, images = step + 1, images + x.shape[0] * world              # step = optimizer steps taken
        bar.update(1)
        # every term averaged over ranks; a non-finite one stops training before any checkpoint is written ------
        terms = {**{f"g/{k}": v for k, v in g.items()}, **{f"d/{k}": v for k, v in d.items()}}
        averaged = mean_over_ranks_or_stop(terms, step, last, ddp, world, device)
        end = step == args.max_steps                                    # always log, evaluate, save the last step
        if step % args.log_every == 0 or end:
            record = {"step": step, **averaged, "images_per_s": images / (time.time() - t0)}   # all ranks' images
            for i in range(cfg.num_codebooks):                         # usage of each sub-codebook, all ranks
                stats = codebook_usage(aux["codes"][:, i], cfg.codebook_size)   # this batch, all ranks (Tab. 3)
                record[f"usage/{i}"], record[f"perplexity/{i}"] = stats["usage"].item(), stats["perplexity"].item()
            record["unreadable_images"] = count_over_ranks(unreadable, ddp, world)   # every rank takes part
            write(record)                                               # rank 0 only
            bar.set_postfix(rec=f"{record['g/rec']:.4f}", usage=f"{record['usage/0']:.2f}")
        if master and step % args.sample_every == 0:                   # inputs above, reconstructions below
            save_grid(torch.cat([x[:8], x_rec[:8].detach()]),
                      os.path.join(args.out_dir, "samples", f"{step:07d}.png"), nrow=len(x[:8]))
        if val_set is not None and (step % args.eval_every == 0 or end):   # raw and EMA weights, every rank
            write({"step": step, "val_psnr": psnr_on(m.raw, val_set, device, ddp, rank, world),
                   "val_psnr_ema": psnr_on(m.ema, val_set, device, ddp, rank, world),
                   **({"held_out_psnr_ema": psnr_on(m.ema, held_out, device, ddp, rank, world)} if held_out else {})})
        if step % args.ckpt_every == 0 or end:
            save_checkpoint(args, cfg, m, step, batch, ddp, world, master)
    bar.close()
    if master:                                                         # the last line: where the weights are
        print(f"done: step {step}, {len(unreadable)} unreadable images skipped, checkpoint {last}")
        log.close()


if __name__ == "__main__":
    main()
