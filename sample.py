"""Sample class-conditional images: FAR generates codes (Sec. 3.3), the tokenizer decodes them (Eq. 6).

Paper: "Factorized Visual Tokenization and Generation", Bai et al., arXiv 2411.16681 (Tab. 2: cfg scale 2.0, no
top-k / top-p). With no checkpoint given, the tiny models shipped in weights/ are used (no download):
  python sample.py --class-id 3                                   # -> samples.png, 8 samples of class 3
  python sample.py --class-id 0 5 --num 4 --cfg-scale 3 --out grid.png
Trained or official models (an official FAR-B / FAR-L file with its FQGAN tokenizer works as it is):
  python sample.py --far-ckpt runs/far/checkpoints/last.pt --tokenizer-ckpt TOK.pt --class-id 207
The ADM protocol for FID (evaluate.py): class-balanced samples as one npz, arr_0 uint8 (N, H, W, 3):
  torchrun --nproc_per_node=8 sample.py --far-ckpt FAR.pt --tokenizer-ckpt TOK.pt --num-samples 50000 \
      --out-npz samples.npz
Every batch draws from its own generator seeded by (--seed, batch index), so the npz is the same for any number of
processes.
"""
import argparse
import os

import numpy as np
import torch
import torch.distributed as dist
import torchvision
from PIL import Image
from tqdm import tqdm

from far import generate, load_far
from tokenizer import codebook_fingerprint, load_tokenizer
from train_tokenizer import init_distributed, save_png

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


def to_uint8(x):
    """Images (B, 3, H, W) in [-1, 1] -> uint8 (B, 3, H, W) as the official sampler writes its PNGs (spec §4.4):
    uint8(clamp(127.5 x + 128, 0, 255)), a truncating cast, i.e. round half up; a crop comes back to its pixels."""
    return (127.5 * x + 128).clamp(0, 255).to(torch.uint8)


def load_pair(args, parser):
    """FAR and tokenizer, checked against each other; every problem exits 2 with what is wrong."""
    for flag in ("far_ckpt", "tokenizer_ckpt"):
        path = getattr(args, flag)
        if path is not None and not os.path.isfile(path):
            parser.error(f"--{flag.replace('_', '-')} {path}: no such file"
                         + (" (the shipped tiny weights live in weights/; see weights/README.md)"
                            if path.startswith(WEIGHTS) else ""))
    try:                                                               # official files pickle an argparse Namespace
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(args.far_ckpt, map_location="cpu", weights_only=True)
        model = load_far(ckpt)
    except Exception as e:
        parser.error(f"--far-ckpt {args.far_ckpt}: not a FAR checkpoint ({type(e).__name__}: {str(e)[:200]})")
    recorded = ckpt.get("tokenizer", {})                               # ours: the tokenizer FAR was trained on
    if args.tokenizer_ckpt is None:                                    # its recorded path, else a file of that name
        rec = recorded.get("path")                                     # next to the FAR checkpoint
        near = rec and os.path.join(os.path.dirname(os.path.abspath(args.far_ckpt)), os.path.basename(rec))
        args.tokenizer_ckpt = next((f for f in (rec, near) if f and os.path.isfile(f)), None)
        if args.tokenizer_ckpt is None:
            parser.error(f"--tokenizer-ckpt is needed: {args.far_ckpt} names no tokenizer file found here")
    try:
        tok = load_tokenizer(args.tokenizer_ckpt)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:       # refused pickle, not a tokenizer, bad shapes
        parser.error(f"--tokenizer-ckpt {args.tokenizer_ckpt}: {type(e).__name__}: {str(e)[:300]}")
    fc, tc = model.cfg, tok.cfg
    mine = (fc.num_codebooks, fc.codebook_size, tuple(fc.grid))
    theirs = (tc.num_codebooks, tc.codebook_size, tuple(tc.grid))
    if mine != theirs:
        parser.error(f"mismatched pair: {args.far_ckpt} models (k, codebook_size, grid) = {mine}, but "
                     f"{args.tokenizer_ckpt} has {theirs}")
    if recorded.get("fingerprint") and recorded["fingerprint"] != codebook_fingerprint(tok):
        parser.error(f"mismatched pair: {args.far_ckpt} was trained on the codes of the tokenizer with codebook "
                     f"fingerprint {recorded['fingerprint']}, but {args.tokenizer_ckpt} has "
                     f"{codebook_fingerprint(tok)}")
    return model, tok, ckpt.get("classes")


@torch.no_grad()
def sample(model, tok, labels, args, batch_index, device):
    """Codes for labels (B,) from the generator of (seed, batch_index), decoded to uint8 images (B, H, W, 3)."""
    g = torch.Generator(device).manual_seed(args.seed * 1_000_003 + batch_index)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        codes = generate(model, labels.to(device), cfg_scale=args.cfg_scale, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, generator=g)  # (B, k, h, w)
    return to_uint8(tok.decode_codes(codes).float()).permute(0, 2, 3, 1).cpu()      # -> (B, H, W, 3)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # models
    p.add_argument("--far-ckpt", default=os.path.join(WEIGHTS, "tiny_far.pt"),
                   help="FAR checkpoint, ours or official (default: the shipped weights/tiny_far.pt)")
    p.add_argument("--tokenizer-ckpt", default=None, help="tokenizer checkpoint, ours or official (default: the "
                   "one the FAR checkpoint was trained with, if found)")
    # what to sample (Sec. 3.3; Tab. 2 uses cfg 2.0, temperature 1, no top-k / top-p)
    p.add_argument("--class-id", type=int, nargs="+", default=None, help="class index(es), one grid row each")
    p.add_argument("--num", type=int, default=8, help="samples per class in the PNG grid")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="classifier-free guidance scale s (1 = none)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (> 0)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely codes (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = all)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", default="samples.png", help="PNG grid (one row per class id)")
    # ADM npz for FID (evaluate.py)
    p.add_argument("--num-samples", type=int, default=0, help="write this many class-balanced samples to --out-npz")
    p.add_argument("--out-npz", default=None, help="npz file (arr_0 uint8 (N, H, W, 3), labels (N,))")
    p.add_argument("--batch-size", type=int, default=32, help="images per generate() call and process")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="autocast dtype of the FAR forward (default: bf16 on CUDA as official, fp32 on CPU)")
    args = p.parse_args(argv)
    if (args.num_samples > 0) != (args.out_npz is not None):
        p.error("--num-samples N and --out-npz FILE go together")
    if args.num_samples <= 0 and args.class_id is None:
        p.error("give --class-id N (or --num-samples N --out-npz FILE)")
    for name, bad in (("num", args.num < 1), ("batch-size", args.batch_size < 1),
                      ("temperature", args.temperature <= 0), ("top-k", args.top_k < 0),
                      ("top-p", not 0 < args.top_p <= 1), ("num-samples", args.num_samples < 0)):
        if bad:
            p.error(f"--{name} {getattr(args, name.replace('-', '_'))} is out of range")
    model, tok, classes = load_pair(args, p)
    n_classes = model.cfg.num_classes
    for c in args.class_id or []:
        if not 0 <= c < n_classes:
            p.error(f"--class-id {c} is out of range: this FAR has classes 0..{n_classes - 1}"
                    + (f" ({', '.join(f'{i} {n}' for i, n in enumerate(classes))})" if classes else ""))

    ddp, rank, world, _, device = init_distributed()
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    model, tok = model.to(device), tok.to(device)

    if args.num_samples == 0:                                          # a PNG grid, one process
        labels = torch.tensor(args.class_id).repeat_interleave(args.num)   # (C * num,) row by row
        images = torch.cat([sample(model, tok, labels[i:i + args.batch_size], args, i // args.batch_size, device)
                            for i in range(0, len(labels), args.batch_size)])          # (N, H, W, 3)
        grid = torchvision.utils.make_grid(images.permute(0, 3, 1, 2), nrow=args.num, padding=2)
        save_png(Image.fromarray(grid.permute(1, 2, 0).numpy()), args.out)
        names = [f"{c} ({classes[c]})" if classes else str(c) for c in args.class_id]
        print(f"wrote {args.out}: {args.num} samples of class {', '.join(names)}, cfg {args.cfg_scale}, "
              f"seed {args.seed}")
        return

    # npz: class-balanced labels in a seeded order; global batch b is generated by rank b % world into a shared
    # memory-mapped file, which rank 0 packs into the npz at the end (nothing half-written under --out-npz).
    n, B = args.num_samples, args.batch_size
    labels = (torch.arange(n) % n_classes)[torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))]
    H, W = (s * tok.cfg.downsample for s in tok.cfg.grid)
    parts = args.out_npz + ".parts.npy"
    if rank == 0:
        np.lib.format.open_memmap(parts, "w+", np.uint8, (n, H, W, 3))
    if ddp:
        dist.barrier()
    out = np.lib.format.open_memmap(parts, "r+")
    batches = range(rank, -(-n // B), world)
    for b in tqdm(batches, desc="sample", disable=rank != 0, dynamic_ncols=True):
        out[b * B:(b + 1) * B] = sample(model, tok, labels[b * B:(b + 1) * B], args, b, device).numpy()
    out.flush()
    del out
    if ddp:
        dist.barrier()
    if rank == 0:
        tmp = args.out_npz + ".tmp"
        with open(tmp, "wb") as f:                                     # a file object: np.savez adds no suffix
            np.savez(f, arr_0=np.load(parts, mmap_mode="r"), labels=labels.numpy())
        os.replace(tmp, args.out_npz)
        os.remove(parts)
        print(f"wrote {args.out_npz}: {n} samples ({H}x{W}), {n_classes} classes balanced, cfg {args.cfg_scale}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
