"""Sample class-conditional images: FAR generates codes (Sec. 3.3), the tokenizer decodes them (Eq. 6).

Paper: "Factorized Visual Tokenization and Generation", Bai et al., arXiv 2411.16681 (Tab. 2: cfg scale 2.0, no
top-k / top-p). With no checkpoint given, the tiny models shipped in weights/ are used (no download):
  python sample.py --class-id 3                   # -> samples.png, 8 samples of class 3; --class-id 0 5: 2 rows
  python sample.py --far-ckpt runs/far/checkpoints/last.pt --tokenizer-ckpt TOK.pt --class-id 207   # or released
The ADM protocol for FID (evaluate.py): class-balanced samples as one npz, arr_0 uint8 (N, H, W, 3):
  torchrun --nproc_per_node=8 sample.py --far-ckpt FAR.pt --tokenizer-ckpt TOK.pt --num-samples 50000 \\
      --out-npz samples.npz
Each batch has its own generator, seeded by (--seed, batch index): the npz is the same for any number of processes.
"""
import argparse
import math
import os

import torch
import torch.distributed as dist

from checkpoints import CheckpointError, check_flags, check_writable, device_flag, init_distributed, load_pair
from far import generate
from images import save_grid, to_uint8, write_npz_by_ranks

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")   # the shipped tiny FAR + tokenizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--far-ckpt", default=os.path.join(WEIGHTS, "tiny_far.pt"),
                   help="FAR checkpoint, ours or official (default: the shipped weights/tiny_far.pt)")
    p.add_argument("--tokenizer-ckpt", help="tokenizer file, ours or official (default: the one FAR was trained on)")
    # what to sample (Sec. 3.3; Tab. 2 uses cfg 2.0, temperature 1, no top-k / top-p)
    p.add_argument("--class-id", type=int, nargs="+", help="class index(es), one grid row each")
    p.add_argument("--per-class", type=int, default=8, help="samples per class id in the PNG grid (%(default)s)")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="guidance scale s, finite; 1 = none (%(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature, > 0 (%(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely codes, 0 = all (%(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1], 1 = all (%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (%(default)s)")
    p.add_argument("--out", default="samples.png", help="PNG grid, one row per class id (%(default)s)")
    p.add_argument("--num-samples", type=int, default=0, help="write this many class-balanced samples to --out-npz")
    p.add_argument("--out-npz", default=None, help="npz file (arr_0 uint8 (N, H, W, 3), labels (N,), and classes (C,) "
                   "the class names when the FAR has them)")
    p.add_argument("--batch-size", type=int, default=32, help="images per generate() call and process (%(default)s)")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="FAR autocast (default: bf16 on CUDA, else fp32)")
    p.add_argument("--device", type=device_flag, help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK with CUDA)")
    p.add_argument("--threads", type=int, help="CPU threads (default: 1 for models under 50 M parameters, whose small "
                   "matmuls gain nothing from more and lose much on a busy machine; else torch's default)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the one-position decode "
                   "step, static KV cache (default: on with CUDA, off on CPU; same codes); on a CPU with the weights "
                   "folded in (fast.compiled): faster for tiny, slower than eager for FAR-B")
    args = p.parse_args(argv)
    npz = args.num_samples > 0 or args.out_npz is not None           # npz mode needs both, PNG mode neither
    if npz and args.num_samples <= 0:
        p.error(f"--out-npz needs --num-samples N, an integer >= 1 (got {args.num_samples})")
    if npz and args.out_npz is None:
        p.error("--num-samples N needs --out-npz FILE")
    if npz and args.class_id is not None:                              # the npz holds every class, balanced
        p.error("--class-id (a PNG grid of those classes) and --num-samples / --out-npz (an npz of all classes) are "
                "two modes: give one")
    if not npz and args.class_id is None:                              # PNG mode: the rows must be named
        p.error("give --class-id N (or --num-samples N --out-npz FILE)")
    check_flags(p, args, *((n, getattr(args, n) >= 1, "an integer >= 1") for n in ("per_class", "batch_size")),
                ("threads", args.threads is None or 1 <= args.threads <= os.cpu_count(),
                 f"an integer in 1..{os.cpu_count()}, this machine's CPUs"),
                ("cfg_scale", math.isfinite(args.cfg_scale), "a finite number"),   # s < 0 or > 1 is ok
                ("temperature", math.isfinite(args.temperature) and args.temperature > 0, "finite, > 0"),
                ("top_k", args.top_k >= 0, "an integer >= 0"),                     # 0 = off (far.filter_logits)
                ("top_p", 0 < args.top_p <= 1, "in (0, 1]"))                       # 1 = off (far.filter_logits)
    try:   # the output first (a bad path fails now, not after hours of sampling); evaluate.py reads an npz by its name
        check_writable(*((args.out_npz, "--out-npz", ".npz") if npz else (args.out, "--out", ".png")))
    except CheckpointError as e:
        p.error(str(e))
    return args, p


def load_models(args, parser, device):
    """(FAR, tokenizer, class names or None) on device, checked against each other (checkpoints.load_pair), or exit 2
    with one line. Without --tokenizer-ckpt: the tokenizer recorded in our FAR checkpoint, at its path or beside FAR."""
    try:
        model, tok, args.tokenizer_ckpt, info = load_pair(args.far_ckpt, args.tokenizer_ckpt, device)
    except CheckpointError as e:
        parser.error(str(e))
    classes = info["classes"]                                          # folder names, recorded by train_far.py
    for c in args.class_id or []:                                      # id num_classes is CFG's null class
        if not 0 <= c < model.cfg.num_classes:
            parser.error(f"--class-id {c} is out of range: this FAR has classes 0..{model.cfg.num_classes - 1}"
                         + (f" ({', '.join(f'{i} {n}' for i, n in enumerate(classes))})" if classes else ""))
    return model, tok, classes


@torch.no_grad()
def sample(model, tok, labels, args, batch_index, device):
    """Codes for labels (B,) from the generator of (seed, batch_index), decoded to uint8 images (B, 3, H, W)."""
    g = torch.Generator(device).manual_seed(args.seed * 1_000_003 + batch_index)   # per global batch, not rank
    # NOTE(paper≠code): FAR under autocast with fp32 CFG logits (the released sampler: bf16 weights and logits, §6.2)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        codes = generate(model, labels.to(device), cfg_scale=args.cfg_scale, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, generator=g, compile=args.compile)  # (B, k, h, w)
    return to_uint8(tok.decode_codes(codes).float()).cpu()   # Eq. (6) in fp32, then uint8 (# parity: §6.3)


def png(model, tok, classes, args, device):
    """The PNG mode: --per-class samples of each --class-id, one grid row per class."""
    labels = torch.tensor(args.class_id).repeat_interleave(args.per_class)   # (C * per_class,) row by row
    images = torch.cat([sample(model, tok, labels[i:i + args.batch_size], args, i // args.batch_size, device)
                        for i in range(0, len(labels), args.batch_size)])              # (N, 3, H, W) uint8
    save_grid(images, args.out, nrow=args.per_class)                   # atomic PNG, one row per class id
    names = ", ".join(f"{c} ({classes[c]})" if classes else str(c) for c in args.class_id)
    print(f"wrote {args.out}: {args.per_class} samples of class {names}, cfg {args.cfg_scale}, seed {args.seed}")


def npz(model, tok, classes, args, device, rank, world):
    """The ADM npz for FID: class-balanced labels in a seeded order; global batch b is made by rank b % world, and
    rank 0 joins the ranks' parts in order (images.write_npz_by_ranks: none left by a failure or a stop signal)."""
    # NOTE(paper≠code): exactly class-balanced labels (the released sampler draws them at random per batch, §6.4)
    order = torch.randperm(args.num_samples, generator=torch.Generator().manual_seed(args.seed))
    labels = (torch.arange(args.num_samples) % model.cfg.num_classes)[order]
    write_npz_by_ranks(args.out_npz, labels, args.batch_size, tok.cfg.image_shape, rank=rank, world=world,
                       make_batch=lambda b, y: sample(model, tok, y, args, b, device), classes=classes)
    if rank == 0:
        print(f"wrote {args.out_npz}: {args.num_samples} samples ({tok.cfg.image_shape[0]}x{tok.cfg.image_shape[1]}),"
              f" {model.cfg.num_classes} classes balanced, cfg {args.cfg_scale}")


def main(argv=None):
    args, parser = parse_args(argv)
    ddp, rank, world, _, device = init_distributed(args.device)       # torchrun: NCCL / gloo; else rank 0 of 1
    model, tok, classes = load_models(args, parser, device)            # both in eval mode, on device
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    if args.compile and device.type == "cpu":                          # the weights stay fixed: fold them in (fast.py)
        args.compile = "frozen"
    threads, small = torch.get_num_threads(), sum(p.numel() for p in model.parameters()) < 50e6
    torch.set_num_threads(args.threads or (1 if small and device.type == "cpu" else threads))
    try:
        if args.num_samples > 0:
            npz(model, tok, classes, args, device, rank, world)        # every rank its share
        elif rank == 0:
            png(model, tok, classes, args, device)                     # one PNG, written by rank 0 alone
    except (CheckpointError, OSError) as e:                            # no space: one line, exit 2
        parser.error(str(e))
    finally:                                                           # an error exit too: a caller (the tests) keeps
        torch.set_num_threads(threads)                                 # its thread count
    if ddp:                                 # rank 0 wrote its files just now: every rank leaves the group together
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
