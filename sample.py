"""Sample class-conditional images: FAR generates codes (Sec. 3.3), the tokenizer decodes them (Eq. 6).

Paper: "Factorized Visual Tokenization and Generation", Bai et al., arXiv 2411.16681 (Tab. 2: cfg scale 2.0, no
top-k / top-p). With no checkpoint given, the tiny models shipped in weights/ are used (no download):
  python sample.py --class-id 3                                   # -> samples.png, 8 samples of class 3
  python sample.py --class-id 0 5 --per-class 4 --cfg-scale 3 --out grid.png
Trained or official models (an official FAR-B / FAR-L file with its FQGAN tokenizer works as it is):
  python sample.py --far-ckpt runs/far/checkpoints/last.pt --tokenizer-ckpt TOK.pt --class-id 207
The ADM protocol for FID (evaluate.py): class-balanced samples as one npz, arr_0 uint8 (N, H, W, 3):
  torchrun --nproc_per_node=8 sample.py --far-ckpt FAR.pt --tokenizer-ckpt TOK.pt --num-samples 50000 \\
      --out-npz samples.npz
Each batch has its own generator, seeded by (--seed, batch index): the npz is the same for any number of processes.
"""
import argparse
import math
import os

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from checkpoints import (CheckpointError, check_pair, check_writable, device_flag, init_distributed, load_far,
                         load_tokenizer, read_checkpoint)
from far import generate
from images import save_grid, to_uint8

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")   # the shipped tiny FAR + tokenizer


def load_pair(args, device):
    """(FAR, tokenizer, class names or None), checked against each other (checkpoints.check_pair). Without
    --tokenizer-ckpt, the tokenizer recorded in our FAR checkpoint: its path, else a file of that name beside FAR."""
    ckpt = read_checkpoint(args.far_ckpt, "--far-ckpt")                # weights_only=True: no pickled code runs
    model = load_far(ckpt, device)                                     # ours or official (renamed, config inferred)
    recorded = ckpt.get("tokenizer", {})                               # ours: the tokenizer FAR was trained on
    if args.tokenizer_ckpt is None:                                    # an official FAR file records none: {}
        rec = recorded.get("path")                                     # absolute path at training time
        near = rec and os.path.join(os.path.dirname(os.path.abspath(args.far_ckpt)), os.path.basename(rec))
        args.tokenizer_ckpt = next((f for f in (rec, near) if f and os.path.isfile(f)), None)   # or beside FAR
        if args.tokenizer_ckpt is None:
            raise CheckpointError(f"--tokenizer-ckpt is needed: {args.far_ckpt} names no tokenizer file found here")
    tok = load_tokenizer(args.tokenizer_ckpt, device)
    check_pair(model.cfg, tok, recorded, args.far_ckpt, args.tokenizer_ckpt)   # same (k, K, grid), codebooks
    return model, tok, ckpt.get("classes")                             # folder names, recorded by train_far.py


@torch.no_grad()
def sample(model, tok, labels, args, batch_index, device):
    """Codes for labels (B,) from the generator of (seed, batch_index), decoded to uint8 images (B, 3, H, W)."""
    g = torch.Generator(device).manual_seed(args.seed * 1_000_003 + batch_index)   # per global batch, not rank
    # NOTE(paper≠code): official casts FAR to bf16, bf16 CFG logits (official_code.md §6.2); we autocast, fp32 CFG
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        codes = generate(model, labels.to(device), cfg_scale=args.cfg_scale, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, generator=g, compile=args.compile)  # (B, k, h, w)
    return to_uint8(tok.decode_codes(codes).float()).cpu()   # Eq. (6) in fp32, then the official uint8 (§6.3)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # models
    p.add_argument("--far-ckpt", default=os.path.join(WEIGHTS, "tiny_far.pt"),
                   help="FAR checkpoint, ours or official (default: the shipped weights/tiny_far.pt)")
    p.add_argument("--tokenizer-ckpt", help="tokenizer file, ours or official (default: the one FAR was trained on)")
    # what to sample (Sec. 3.3; Tab. 2 uses cfg 2.0, temperature 1, no top-k / top-p)
    p.add_argument("--class-id", type=int, nargs="+", default=None, help="class index(es), one grid row each")
    p.add_argument("--per-class", type=int, default=8, help="samples per class id in the PNG grid (%(default)s)")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="classifier-free guidance scale s, any finite number; "
                   "1 = none (the official sampler also skips guidance for s < 1; default %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature, > 0 (%(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely codes, 0 = all (%(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1], 1 = all (%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (%(default)s)")
    p.add_argument("--out", default="samples.png", help="PNG grid, one row per class id (%(default)s)")
    # ADM npz for FID (evaluate.py)
    p.add_argument("--num-samples", type=int, default=0, help="write this many class-balanced samples to --out-npz")
    p.add_argument("--out-npz", default=None, help="npz file (arr_0 uint8 (N, H, W, 3), labels (N,))")
    p.add_argument("--batch-size", type=int, default=32, help="images per generate() call and process (%(default)s)")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="FAR autocast (default: bf16 on CUDA, else fp32)")
    p.add_argument("--device", type=device_flag, help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK with CUDA)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the "
                   "one-position decode step, static KV cache (default: on with CUDA, off on CPU; same codes)")
    args = p.parse_args(argv)
    if (args.num_samples > 0) != (args.out_npz is not None):           # npz mode needs both, PNG mode neither
        p.error("--num-samples N and --out-npz FILE go together")
    if args.num_samples <= 0 and args.class_id is None:                # PNG mode: the rows must be named
        p.error("give --class-id N (or --num-samples N --out-npz FILE)")
    # Every value is checked here, before loading or sampling: one line naming the flag, value and range, exit 2.
    for name, ok, valid in (*((n, getattr(args, n) >= 1, "an integer >= 1") for n in ("per_class", "batch_size")),
                            ("cfg_scale", math.isfinite(args.cfg_scale), "a finite number"),   # s < 0 or > 1 is ok
                            ("temperature", math.isfinite(args.temperature) and args.temperature > 0, "finite, > 0"),
                            ("top_k", args.top_k >= 0, "an integer >= 0"),         # 0 = off (far.filter_logits)
                            ("top_p", 0 < args.top_p <= 1, "in (0, 1]"),           # 1 = off (far.filter_logits)
                            ("num_samples", args.num_samples >= 0, "an integer >= 0")):
        if not ok:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} is out of range: must be {valid}")
    try:   # the output first: a bad path fails now, not after hours of sampling
        check_writable(args.out_npz, "--out-npz") if args.out_npz else check_writable(args.out, "--out")
    except CheckpointError as e:
        p.error(str(e))
    return args, p


def load_checked(args, p, device):
    """(FAR, tokenizer, class names) on device, or exit 2 with one line: a file that is not a checkpoint, a mismatched
    pair, a --class-id this FAR does not have."""
    try:
        model, tok, classes = load_pair(args, device)                  # both in eval mode (checkpoints.load_*)
    except CheckpointError as e:
        p.error(str(e))
    for c in args.class_id or []:                                      # id num_classes is CFG's null class
        if not 0 <= c < model.cfg.num_classes:
            p.error(f"--class-id {c} is out of range: this FAR has classes 0..{model.cfg.num_classes - 1}"
                    + (f" ({', '.join(f'{i} {n}' for i, n in enumerate(classes))})" if classes else ""))
    return model, tok, classes


def png(model, tok, classes, args, device):
    """The PNG mode: --per-class samples of each --class-id, one grid row per class."""
    labels = torch.tensor(args.class_id).repeat_interleave(args.per_class)   # (C * per_class,) row by row
    images = torch.cat([sample(model, tok, labels[i:i + args.batch_size], args, i // args.batch_size, device)
                        for i in range(0, len(labels), args.batch_size)])              # (N, 3, H, W) uint8
    save_grid(images, args.out, nrow=args.per_class)                   # atomic PNG, one row per class id
    names = ", ".join(f"{c} ({classes[c]})" if classes else str(c) for c in args.class_id)
    print(f"wrote {args.out}: {args.per_class} samples of class {names}, cfg {args.cfg_scale}, seed {args.seed}")


def main(argv=None):
    args, parser = parse_args(argv)
    ddp, rank, world, _, device = init_distributed(args.device)       # torchrun: NCCL / gloo; else rank 0 of 1
    model, tok, classes = load_checked(args, parser, device)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    if args.num_samples == 0:                                          # a PNG grid: one file, by rank 0 alone
        if rank == 0:
            png(model, tok, classes, args, device)
        return dist.destroy_process_group() if ddp else None
    # npz: class-balanced labels in a seeded order; global batch b is generated by rank b % world into a shared
    # memory-mapped file, which rank 0 packs into the npz at the end (nothing half-written under --out-npz).
    # NOTE(paper≠code): the official sampler draws labels uniformly at random per batch (official_code.md §6.4).
    n, B, n_classes = args.num_samples, args.batch_size, model.cfg.num_classes
    labels = (torch.arange(n) % n_classes)[torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))]
    (H, W), parts = tok.cfg.image_shape, args.out_npz + ".parts.npy"   # a plain .npy: every rank can memory-map it
    if rank == 0:                                                      # one rank creates it, the others wait
        np.lib.format.open_memmap(parts, "w+", np.uint8, (n, H, W, 3))
    sync = dist.barrier if ddp else (lambda: None)                    # the ranks meet around the shared file
    sync()
    out = np.lib.format.open_memmap(parts, "r+")
    for b in tqdm(range(rank, -(-n // B), world), desc="sample", disable=rank != 0, dynamic_ncols=True):  # ceil(n/B)
        x = sample(model, tok, labels[b * B:(b + 1) * B], args, b, device)   # the last batch may be short
        out[b * B:(b + 1) * B] = x.permute(0, 2, 3, 1).numpy()         # (B, 3, H, W) -> (B, H, W, 3), ADM layout
    out.flush()
    del out                                                            # close the map before rank 0 reads the file
    sync()                                                             # every rank's rows are written
    if rank == 0:
        with open(tmp := args.out_npz + ".tmp", "wb") as f:            # a file object: np.savez adds no suffix
            np.savez(f, arr_0=np.load(parts, mmap_mode="r"), labels=labels.numpy())   # arr_0: ADM's evaluator key
        os.replace(tmp, args.out_npz)                                  # atomic: the npz is complete or absent
        os.remove(parts)
        print(f"wrote {args.out_npz}: {n} samples ({H}x{W}), {n_classes} classes balanced, cfg {args.cfg_scale}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
