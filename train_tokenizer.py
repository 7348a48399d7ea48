"""Train the FQGAN tokenizer (or the VQGAN / IBQ baselines) with plain torch.distributed DDP.

Paper: "Factorized Visual Tokenization and Generation", Bai et al., arXiv 2411.16681.
  Sec. 4.1  ImageNet 256x256, global batch 256, constant lr 2e-4, Adam betas (0.9, 0.95), 40 epochs, 8 GPUs
  Eq. (8)   the objective (losses.py): L_rec + L_VQ + LPIPS + GAN + lambda_dis L_dis + lambda_rep L_rep
Recipe details follow the official scripts (`../shared/reference/fqgan_tokenizer_spec.md` §3).

GPU (the paper's FQGAN-Dual f16, 8 GPUs, ~200k steps; needs the LPIPS and CLIP weights, see README):
  torchrun --nproc_per_node=8 train_tokenizer.py --preset fqgan-dual-16 --data-path /data/imagenet/train \
      --out-dir runs/dual16 --global-batch-size 256 --max-steps 200000
CPU (the tiny preset on the bundled photos, minutes on 2 cores):
  python train_tokenizer.py --preset tiny --out-dir runs/tiny
Resume either with the same command plus --resume.
Two processes on one CPU: torchrun --standalone --nproc_per_node=2 train_tokenizer.py ...
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
import torchvision
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from losses import LPIPS, LossConfig, PatchGAN, build_teachers, discriminator_loss, generator_loss
from quantizer import codebook_usage
from tokenizer import PRESETS, Tokenizer, TokenizerConfig

BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "photos")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


# --------------------------------------------------------------------------------------------------------------
# Data: ImageFolder layout, the official augmentation, corrupt files skipped and counted

def random_crop(img, size, g):
    """Official train augmentation (spec §3): short side to S ~ U{max(size)..max(size)/0.8}, random crop, flip.

    All randomness comes from the torch.Generator g (seeded per sample and epoch), so a resumed run sees the same
    crops as an uninterrupted one, whatever the number of loader workers.
    """
    h, w = size
    s = int(torch.randint(max(h, w), round(max(h, w) / 0.8) + 1, (1,), generator=g))
    while min(img.size) >= 2 * s:                                   # cheap BOX halving first, as ADM does
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = s / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    top = int(torch.randint(0, img.size[1] - h + 1, (1,), generator=g))
    left = int(torch.randint(0, img.size[0] - w + 1, (1,), generator=g))
    img = img.crop((left, top, left + w, top + h))
    if torch.rand((), generator=g) < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img


def center_crop(img, size):
    """Evaluation crop (ADM center_crop_arr, spec §4): short side to max(size), centre crop."""
    h, w = size
    while min(img.size) >= 2 * max(h, w):
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = max(h, w) / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    left, top = (img.size[0] - w) // 2, (img.size[1] - h) // 2
    return img.crop((left, top, left + w, top + h))


def to_tensor(img):
    """PIL RGB -> (3, H, W) float in [-1, 1]."""
    return torchvision.transforms.functional.pil_to_tensor(img).float() / 127.5 - 1


def open_rgb(path):
    """The image at path as RGB (grayscale / RGBA / CMYK converted), or None if it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


class ImageFolder(Dataset):
    """root/<class>/<image>. Item (index, epoch) -> (image (3, H, W) in [-1, 1], class index, files skipped).

    Grayscale / RGBA / CMYK are converted to RGB; an unreadable file is skipped (the next file is used instead, so
    batches keep their size) and counted. The crop is seeded by (seed, epoch, index), so exact resume needs no
    loader RNG state. A plain int item means epoch 0 (evaluation).
    """

    def __init__(self, root, size, train=True, seed=0):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data folder not found: {root} (expected root/<class>/<image> files)")
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.samples = [(os.path.join(root, c, f), i) for i, c in enumerate(self.classes)
                        for f in sorted(os.listdir(os.path.join(root, c))) if f.lower().endswith(IMAGE_EXTS)]
        if not self.samples:
            raise FileNotFoundError(f"no images under {root}/<class>/ (extensions {', '.join(IMAGE_EXTS)})")
        self.size, self.train, self.seed = size, train, seed

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, item):
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        for skipped in range(len(self.samples)):
            path, label = self.samples[(index + skipped) % len(self.samples)]
            img = open_rgb(path)
            if img is None:
                continue
            g = torch.Generator().manual_seed(hash((self.seed, epoch, index)) % 2**62)
            img = random_crop(img, self.size, g) if self.train else center_crop(img, self.size)
            return to_tensor(img), label, skipped
        raise RuntimeError(f"none of the {len(self.samples)} images could be read")


class StreamSampler(DistributedSampler):
    """This rank's share of an endless stream of epochs, each a DistributedSampler permutation (seed + epoch),
    starting `start` samples in; yields (index, epoch). Resuming at step s starts at s * local batch, so one
    DataLoader serves the whole run (no worker restarts at epoch ends) and the data position is exact."""
    start = 0

    def __iter__(self):
        epoch, offset = divmod(self.start, self.num_samples)
        while True:
            self.set_epoch(epoch)
            yield from ((i, epoch) for i in list(super().__iter__())[offset:])
            epoch, offset = epoch + 1, 0


# --------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # model and data
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="tokenizer preset (tokenizer.PRESETS)")
    p.add_argument("--data-path", default=None, help="ImageFolder root of training images "
                   "(default: the bundled photos data/photos/train, for the tiny preset)")
    p.add_argument("--val-path", default=None, help="ImageFolder root of held-out images for --eval-every "
                   "(default: data/photos/val with the bundled photos, else none)")
    p.add_argument("--image-size", type=int, default=None, help="training resolution (default: the preset's)")
    p.add_argument("--codebook-size", type=int, default=None, help="entries per sub-codebook (default: preset's)")
    p.add_argument("--out-dir", default="runs/tokenizer", help="checkpoints, log.jsonl and sample PNGs go here")
    # optimisation (Sec. 4.1 and the official script: Adam (0.9, 0.95), lr 2e-4 constant, clip 1.0, batch 256)
    p.add_argument("--global-batch-size", type=int, default=None, help="images per step over all ranks "
                   "(default: 256, the paper's; 16 for tiny)")
    p.add_argument("--max-steps", type=int, default=None, help="training steps (default: 200000 official; 600 tiny)")
    p.add_argument("--lr", type=float, default=2e-4, help="learning rate of both Adam optimizers (Sec. 4.1)")
    p.add_argument("--beta1", type=float, default=0.9, help="Adam beta1 (official script)")
    p.add_argument("--beta2", type=float, default=0.95, help="Adam beta2 (official script)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, G and D separately")
    p.add_argument("--ema-decay", type=float, default=None, help="EMA decay of the generator weights "
                   "(default 0.9999; 0.99 for tiny, whose 600 steps are too few for a slower average)")
    # loss weights, Eq. (2) and (8) (defaults: official; tiny has no LPIPS and no teacher weights offline)
    p.add_argument("--perceptual-weight", type=float, default=None, help="lambda_P (default 1.0; 0 for tiny)")
    p.add_argument("--disc-weight", type=float, default=None, help="lambda_G of the hinge GAN (default 0.5; 0 for "
                   "tiny, where the GAN without LPIPS wrecked reconstruction: held-out PSNR 18.2 -> 11.9 dB; 0 = no D)")
    p.add_argument("--disc-start", type=int, default=None, help="step the GAN starts (default 20000; 400 for "
                   "tiny, used only with --disc-weight > 0)")
    p.add_argument("--dis-weight", type=float, default=0.1, help="lambda_dis of Eq. (7)-(8)")
    p.add_argument("--rep-weight", type=float, default=0.5, help="lambda_rep of Eq. (8)")
    p.add_argument("--entropy-weight", type=float, default=None, help="entropy loss weight (default: preset's)")
    # runtime
    p.add_argument("--seed", type=int, default=0, help="base seed; rank r uses seed + r")
    p.add_argument("--num-workers", type=int, default=2, help="data loader workers per rank")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the tokenizer (default: on with CUDA, off on CPU)")
    p.add_argument("--log-every", type=int, default=50, help="steps between JSONL log lines")
    p.add_argument("--sample-every", type=int, default=500, help="steps between input/reconstruction PNG grids")
    p.add_argument("--eval-every", type=int, default=500, help="steps between held-out PSNR evaluations")
    p.add_argument("--ckpt-every", type=int, default=1000, help="steps between numbered checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    args = p.parse_args(argv)
    tiny = args.preset == "tiny"
    defaults = dict(global_batch_size=16 if tiny else 256, max_steps=600 if tiny else 200000,
                    ema_decay=0.99 if tiny else 0.9999,
                    perceptual_weight=0.0 if tiny else 1.0, disc_weight=0.0 if tiny else 0.5,
                    disc_start=400 if tiny else 20000)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.data_path is None:
        if not tiny:
            p.error(f"--data-path is required for preset {args.preset} (the bundled photos are for tiny)")
        args.data_path = os.path.join(BUNDLED, "train")
        args.val_path = args.val_path or os.path.join(BUNDLED, "val")
    for name in ("global_batch_size", "max_steps", "log_every", "sample_every", "eval_every", "ckpt_every"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    return args, p


def init_distributed():
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: join the group (NCCL on CUDA, gloo on CPU) and take the device
    from LOCAL_RANK (multi-node works the same). Plain `python script.py` is rank 0 of a world of 1.
    Returns (ddp, rank, world, local_rank, device)."""
    ddp = "RANK" in os.environ
    cuda = torch.cuda.is_available()
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])
    else:
        rank, world, local_rank = 0, 1, 0
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # official setting
    return ddp, rank, world, local_rank, device


def rng_states(ddp, world):
    """Every rank's CPU (and CUDA) RNG state, gathered so that rank 0 can store them all in the checkpoint."""
    cuda = torch.cuda.is_available()
    rng = {"cpu": [torch.get_rng_state()], "cuda": [torch.cuda.get_rng_state()] if cuda else []}
    if ddp:
        gathered = [None] * world
        dist.all_gather_object(gathered, rng)
        rng = {k: [s for r in gathered for s in r[k]] for k in rng}
    return rng


def set_rng_states(rng, rank):
    """Inverse of rng_states for this rank (a checkpoint from another world size reuses states modulo its size)."""
    torch.set_rng_state(rng["cpu"][rank % len(rng["cpu"])])
    if torch.cuda.is_available() and rng["cuda"]:
        torch.cuda.set_rng_state(rng["cuda"][rank % len(rng["cuda"])])


def read_resume(args, cfg, parser, device):
    """The checkpoint --resume continues from (OUT/checkpoints/last.pt), or None to start afresh. A checkpoint of
    another model config or global batch size is refused (exit 2): its data position would mean something else."""
    last = os.path.join(args.out_dir, "checkpoints", "last.pt")
    if not (args.resume and os.path.exists(last)):
        if args.resume and int(os.environ.get("RANK", 0)) == 0:
            print(f"--resume: no {last} yet, starting from scratch")
        return None
    ckpt = torch.load(last, map_location=device, weights_only=True)
    if ckpt["config"] != asdict(cfg) or ckpt["args"]["global_batch_size"] != args.global_batch_size:
        parser.error(f"{last} was written with another config or global batch size; use another --out-dir")
    return ckpt


def mean_over_ranks_or_stop(terms, step, last, ddp, world, device):
    """{name: scalar tensor} -> {name: float} averaged over ranks. A non-finite term stops training (exit 1, naming
    the step and the term) before anything is written, so `last` stays the last good checkpoint."""
    values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).detach().reshape(())
                          for v in terms.values()])
    if ddp:
        dist.all_reduce(values)
        values /= world
    if not torch.isfinite(values).all():
        bad = [k for k, v in zip(terms, values.tolist()) if not math.isfinite(v)]
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"non-finite loss at step {step}: {', '.join(bad)}; stopping. The last good checkpoint {last} is "
                  f"left as it was.", file=sys.stderr)
        if ddp:
            dist.destroy_process_group()
        sys.exit(1)
    return dict(zip(terms, values.tolist()))


def atomic_save(obj, path):
    """Write to a temp file in the same folder, then rename: a crash never leaves a half-written `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):     # only after a failed save: leave nothing half-written behind
            os.remove(tmp)


def save_png(img, path):
    """Write a PIL image to a temp file, then rename: a crash never leaves a half-written PNG at `path`."""
    img.save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


def save_grid(x, path, nrow):
    """Images (N, 3, H, W) in [-1, 1] as one PNG grid, nrow images a row."""
    grid = torchvision.utils.make_grid(x.float().clamp(-1, 1) * 0.5 + 0.5, nrow=nrow)
    save_png(Image.fromarray((grid * 255).round().byte().permute(1, 2, 0).cpu().numpy()), path)


@torch.no_grad()
def psnr_on(model, dataset, device, ddp=False, rank=0, world=1, batch_size=16):
    """Mean PSNR (dB) of decode(encode(x)) on [0, 1] images, per image, over a held-out dataset. Every rank takes part
    (each its share of the images, summed over ranks), so no rank idles into a collective timeout on a large set."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)       # sum of PSNRs, number of images
    mine = list(range(rank, len(dataset), world))
    for i in range(0, len(mine), batch_size):
        x = torch.stack([dataset[j][0] for j in mine[i:i + batch_size]]).to(device)
        x_rec = model.decode_codes(model.encode(x)).clamp(-1, 1)
        mse = ((x_rec - x) / 2).pow(2).flatten(1).mean(1)
        total += torch.stack([(10 * torch.log10(1 / mse.clamp(min=1e-10))).sum().double(),
                              torch.tensor(len(x), dtype=torch.float64, device=device)])
    if ddp:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def main(argv=None):
    args, parser = parse_args(argv)
    ddp, rank, world, local_rank, device = init_distributed()
    cuda = device.type == "cuda"
    if args.global_batch_size % world:
        parser.error(f"--global-batch-size {args.global_batch_size} is not divisible by the world size {world}")
    batch = args.global_batch_size // world
    master = rank == 0
    torch.manual_seed(args.seed + rank)

    # model, losses, optimizers -------------------------------------------------------------------------------
    overrides = {k: v for k, v in dict(image_size=args.image_size, codebook_size=args.codebook_size,
                                      entropy_weight=args.entropy_weight).items() if v is not None}
    cfg = TokenizerConfig(**{**PRESETS[args.preset], **overrides})
    torch.manual_seed(args.seed)                                         # same initial weights on every rank
    raw = Tokenizer(cfg).to(device)
    ema = Tokenizer(cfg).to(device).requires_grad_(False)
    ema.load_state_dict(raw.state_dict())
    disc_raw = PatchGAN().to(device)
    torch.manual_seed(args.seed + rank)
    loss_cfg = LossConfig(perceptual_weight=args.perceptual_weight, disc_weight=args.disc_weight,
                          disc_start=args.disc_start, dis_weight=args.dis_weight, rep_weight=args.rep_weight)
    lpips = LPIPS().to(device) if args.perceptual_weight > 0 else None
    teachers = build_teachers(cfg.teachers, device=device) if args.rep_weight > 0 else {}   # frozen, never DDP
    model = torch.compile(raw) if (cuda if args.compile is None else args.compile) else raw
    gan = args.disc_weight > 0                                          # else D is kept untrained, never run
    disc = disc_raw if gan else None
    if ddp:
        model = DDP(model, device_ids=[local_rank] if cuda else None)
        disc = DDP(disc_raw, device_ids=[local_rank] if cuda else None) if gan else None
    opt_g = torch.optim.Adam(raw.parameters(), lr=args.lr, betas=(args.beta1, args.beta2))
    opt_d = torch.optim.Adam(disc_raw.parameters(), lr=args.lr, betas=(args.beta1, args.beta2))

    # data ----------------------------------------------------------------------------------------------------
    size = cfg.grid[0] * cfg.downsample, cfg.grid[1] * cfg.downsample
    dataset = ImageFolder(args.data_path, size, train=True, seed=args.seed)
    val_set = ImageFolder(args.val_path, size, train=False) if args.val_path else None
    sampler = StreamSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)

    # resume --------------------------------------------------------------------------------------------------
    ckpt_dir = os.path.join(args.out_dir, "checkpoints")
    last = os.path.join(ckpt_dir, "last.pt")
    step = 0
    ckpt = read_resume(args, cfg, parser, device)
    if ckpt is not None:
        raw.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        disc_raw.load_state_dict(ckpt["disc"])
        opt_g.load_state_dict(ckpt["opt_g"])
        opt_d.load_state_dict(ckpt["opt_d"])
        for group in opt_g.param_groups + opt_d.param_groups:           # a changed --lr applies on resume
            group["lr"] = args.lr
        step = ckpt["step"]
        set_rng_states(ckpt["rng"], rank)
    if master:
        os.makedirs(ckpt_dir, exist_ok=True)
        os.makedirs(os.path.join(args.out_dir, "samples"), exist_ok=True)
        n_params = sum(p.numel() for p in raw.parameters())
        print(f"{args.preset}: {n_params / 1e6:.1f} M parameters, {len(dataset)} images, world {world}, "
              f"batch {batch}/rank, steps {step} -> {args.max_steps}, device {device}")
        log = open(os.path.join(args.out_dir, "log.jsonl"), "a")

    def checkpoint():
        """Every rank holds the same weights; gather the RNG states, rank 0 writes last.pt (+ a numbered copy)."""
        rng = rng_states(ddp, world)
        if master:
            state = {"model": raw.state_dict(), "ema": ema.state_dict(), "disc": disc_raw.state_dict(),
                     "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "step": step,
                     "config": asdict(cfg), "args": vars(args), "rng": rng,
                     "data": {"samples_per_rank": step * batch}}               # position in the sample stream
            atomic_save(state, last)
            if step % args.ckpt_every == 0 or step == args.max_steps:
                atomic_save(state, os.path.join(ckpt_dir, f"{step:07d}.pt"))
        if ddp:
            dist.barrier()

    # train ---------------------------------------------------------------------------------------------------
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    bar = tqdm(total=args.max_steps, initial=step, disable=not master, desc="train", dynamic_ncols=True)
    skipped_total, t0, images = 0, time.time(), 0
    if val_set is not None and step == 0:                              # the "before" of held-out PSNR
        before = psnr_on(raw, val_set, device, ddp, rank, world)
        if master:
            log.write(json.dumps({"step": 0, "val_psnr": before}) + "\n")
    sampler.start = step * batch                                        # exact data position on resume
    # The loader draws its base seed from its own generator, not the global RNG (exact resume).
    loader = iter(DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=args.num_workers,
                             pin_memory=cuda, persistent_workers=args.num_workers > 0,
                             generator=torch.Generator().manual_seed(args.seed + rank)))
    while step < args.max_steps:
        x, _, skipped = next(loader)
        x = x.to(device, non_blocking=True)
        skipped_total += int(skipped.sum())
        # generator step, Eq. (8) -----------------------------------------------------------------------------
        with autocast:
            x_rec, aux = model(x)
            g = generator_loss(x, x_rec, aux, step, lpips=lpips, disc=disc, teachers=teachers, cfg=loss_cfg)
        opt_g.zero_grad(set_to_none=True)
        g["total"].backward()
        g["grad_norm"] = torch.nn.utils.clip_grad_norm_(raw.parameters(), args.grad_clip)
        opt_g.step()
        with torch.no_grad():                                           # EMA of the generator
            for p_ema, p in zip(ema.parameters(), raw.parameters()):
                p_ema.lerp_(p, 1 - args.ema_decay)
        # discriminator step (after G, on the same images and the pre-update reconstructions) -----------------
        d = {}
        if gan:
            with autocast:
                d = discriminator_loss(x, x_rec, step, disc, cfg=loss_cfg)
            opt_d.zero_grad(set_to_none=True)                           # drop what the G step left in D
            d["total"].backward()
            torch.nn.utils.clip_grad_norm_(disc_raw.parameters(), args.grad_clip)
            opt_d.step()
        step += 1
        images += x.shape[0] * world
        bar.update(1)
        # every term averaged over ranks; a non-finite one stops training before any checkpoint is written ------
        terms = {**{f"g/{k}": v for k, v in g.items()}, **{f"d/{k}": v for k, v in d.items()}}
        averaged = mean_over_ranks_or_stop(terms, step, last, ddp, world, device)
        if step % args.log_every == 0 or step == args.max_steps:
            record = {"step": step, **averaged}
            for i in range(cfg.num_codebooks):                         # usage of each sub-codebook, all ranks
                stats = codebook_usage(aux["codes"][:, i], cfg.codebook_size)
                record[f"usage/{i}"], record[f"perplexity/{i}"] = stats["usage"].item(), stats["perplexity"].item()
            record["images_per_s"] = images / (time.time() - t0)
            record["skipped_images"] = skipped_total
            if master:
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(rec=f"{record['g/rec']:.4f}", usage=f"{record['usage/0']:.2f}")
        if master and step % args.sample_every == 0:
            save_grid(torch.cat([x[:8], x_rec[:8].detach()]), os.path.join(args.out_dir, "samples",  # inputs
                      f"{step:07d}.png"), nrow=len(x[:8]))                                     # above outputs
        if val_set is not None and (step % args.eval_every == 0 or step == args.max_steps):
            record = {"step": step, "val_psnr": psnr_on(raw, val_set, device, ddp, rank, world),
                      "val_psnr_ema": psnr_on(ema, val_set, device, ddp, rank, world)}
            if master:
                log.write(json.dumps(record) + "\n")
                log.flush()
        if step % args.ckpt_every == 0 or step == args.max_steps:
            checkpoint()
    bar.close()
    if master:
        print(f"done: step {step}, {skipped_total} unreadable images skipped, checkpoint {last}")
        log.close()
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
