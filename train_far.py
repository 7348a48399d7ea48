"""Train FAR, the factorized auto-regressive generator, on codes of a trained tokenizer (torchrun DDP or one process).

Paper: "Factorized Visual Tokenization and Generation", Bai et al., arXiv 2411.16681.
  Sec. 3.3  the model (far.py); its loss is the mean cross-entropy over the k sub-codes
  Sec. 4.1  ImageNet 256x256, 300 epochs, global batch 256, constant lr
Two stages: codes.extract_codes() encodes every image once into OUT/codes/{train,val}/ (memory-mapped (N, A, k, h, w)
codes, A views, one shard per rank); training then draws one view per image and step. main() reads top to bottom:
torchrun set-up, the tokenizer and the codes, the model, resume, the loop (held-out NLL, samples, checkpoints). The
recipe follows the released scripts (ten crops + flips, AdamW (0.9, 0.95), weight decay 0.05 on matrices only,
clip 1.0, no EMA; # parity: §7); each preset's defaults are its recipe in RECIPES below, which --help prints.

  torchrun --nproc_per_node=8 train_far.py --preset far-b --tokenizer-ckpt fqgan_dual_ds16.pt \\
      --data-path /data/imagenet/train --out-dir runs/far-b            # GPUs: FAR-B, the released 300 epochs
  python train_far.py --preset tiny --out-dir runs/far-tiny            # CPU; either resumes with --resume
"""
import argparse
import math
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from checkpoints import (CheckpointError, add_checkpoint_flags, check_flags, codebook_fingerprint, distribute,
                         exit_stopped, init_weights, load_far, load_tokenizer, lr_at, mean_over_ranks_or_stop,
                         open_run, read_checkpoint, read_resume, release_stop_signals, resume, save_checkpoint,
                         start_training, stop_requested)
from codes import VIEWS, Codes, extract_codes
from far import FAR, PRESETS, FARConfig, far_loss, generate
from images import BUNDLED, ImageFolder, save_grid, stream

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")   # the shipped tiny tokenizer
# The training recipes, this script's defaults (--help prints them). PAPER: the released script (constant lr 1e-4,
# global batch 256, 300 epochs of ImageNet = 1,501,200 steps, ten-crop codes; # parity: §7.3).
# NOTE(paper≠code): Sec. 4.1 says lr 2e-4. TINY: the bundled photos and the shipped tiny tokenizer, a higher lr for a
# short run, codes small enough for the main process, 40 random crops per photo instead of ten (with ten, FAR learnt
# the 440 views by heart: docs/results.md); lr 2e-3 after 20 warm-up steps and 400 steps under bf16 autocast reach
# the held-out NLL that fp32, lr 1e-3 and 600 steps did, in 0.4x the time; bf16 only where the CPU has bf16
# instructions, fp32 where it would emulate them ("auto"; docs/results.md).
PAPER = dict(tokenizer_ckpt=None, data_path=None, global_batch_size=256, max_steps=1_501_200, lr=1e-4,
             lr_decay="constant", warmup_steps=0, precision=None, num_workers=4, augment="tencrop")
TINY = dict(tokenizer_ckpt=os.path.join(WEIGHTS, "tiny_tokenizer.pt"), data_path=os.path.join(BUNDLED, "train"),
            global_batch_size=32, max_steps=400, lr=2e-3, lr_decay="constant", warmup_steps=20, precision="auto",
            num_workers=0, augment="random")
RECIPES = {"far-b": PAPER, "far-l": PAPER, "tiny": TINY}
# Evaluation during training is bounded whatever the number of classes and images: samples of at most SAMPLE_CLASSES
# classes (evenly spaced ids) x 4; the copy distance only up to MAX_COPY_VIEWS training views.
SAMPLE_CLASSES, MAX_COPY_VIEWS = 16, 20_000


# --------------------------------------------------------------------------------------------------------------
# Evaluation during training: held-out NLL (every rank), samples and their copy distance (rank 0)

@torch.no_grad()
def nll_bits(model, dataset, device, rank=0, world=1, batch_size=64):
    """Held-out NLL in bits per sub-code, {"val_bits/j": ...} (teacher forcing, true labels, eval mode). Ranks split
    the items and sum; every rank gets the result."""
    model.eval()                                                       # no dropout, no label dropout
    k = model.cfg.num_codebooks
    total = torch.zeros(k + 1, dtype=torch.float64, device=device)       # k summed CE (nats) + token count
    mine = list(range(rank, len(dataset), world))
    for s in range(0, len(mine), batch_size):
        items = [dataset[i] for i in mine[s:s + batch_size]]
        codes = torch.stack([c for c, _ in items]).to(device)            # (B, k, h, w)
        labels = torch.tensor([y for _, y in items], device=device)
        # logits (B, k, L, V) -> (B*k*L, V) against (B, k, h, w) -> (B*k*L,): the same (b, j, t) order
        ce = torch.nn.functional.cross_entropy(model(codes, labels).flatten(0, 2), codes.flatten(), reduction="none")
        total[:k] += ce.view(len(items), k, -1).sum((0, 2)).double()     # (B*k*L,) -> (B, k, L) -> (k,)
        total[k] += codes[:, 0].numel()                                 # B*h*w positions per sub-code
    if dist.is_initialized():
        dist.all_reduce(total)                                          # sums, then one division
    model.train()
    bits = total[:k] / total[k].clamp(min=1) / math.log(2)             # nats -> bits per sub-code
    return {f"val_bits/{j}": v for j, v in enumerate(bits.tolist())}


@torch.no_grad()
def copy_distance(samples, codes, labels, max_queries=256, views_per_chunk=128):
    """Memorisation in codes: (per sample, the fraction of its k*h*w sub-codes that differ from the nearest training
    view; per training image, the same to the nearest view of another image), or None above MAX_COPY_VIEWS training
    views (ImageNet: the question needs another method). Bounded memory: training views are read views_per_chunk at a
    time, and at most max_queries training images (evenly spaced) are compared with the others."""
    rows = np.flatnonzero(np.asarray(labels) >= 0)                    # readable training images
    n, a = len(rows), codes.shape[1]
    if n * a > MAX_COPY_VIEWS:                                        # decided from shapes: nothing read yet
        return None
    read = lambda js: torch.from_numpy(np.stack([codes[int(j)] for j in js]).astype(np.int64)).flatten(2)   # (c, A, D)
    q = torch.linspace(0, n - 1, min(n, max_queries)).round().long()   # the query images
    queries, samples = read(rows[q.numpy()])[:, a // 2], samples.flatten(1).cpu()   # middle views (Q, D); (S, D)
    near_s, near_q, step = torch.ones(len(samples)), torch.ones(len(q)), max(1, views_per_chunk // a)
    for c0 in range(0, n, step):
        block = read(rows[c0:c0 + step]).flatten(0, 1)                 # (c, A, D) -> (c*A, D)
        differ = lambda x: (x[:, None] != block[None]).sum(-1) / block.shape[1]   # (X, D) -> (X, c*A) fractions
        near_s = torch.minimum(near_s, differ(samples).amin(1))
        d = differ(queries).view(len(q), -1, a)                        # (Q, c*A) -> (Q, c, A)
        d[q[:, None] == torch.arange(c0, c0 + d.shape[1])[None]] = 1.0   # not the query image's own views
        near_q = torch.minimum(near_q, d.flatten(1).amin(1))
    return near_s, near_q                                              # (S,), (Q,)


@torch.no_grad()
def samples_and_copies(model, tok, dataset, seed, path):
    """4 samples of each of <= SAMPLE_CLASSES classes (Tab. 2's cfg scale, the same seed every time): one of each of the
    first 8 classes decoded into a PNG row at path, and how far the samples are from copies of training views (log
    record; none above MAX_COPY_VIEWS)."""
    C, device = model.cfg.num_classes, model.norm.weight.device
    labels = torch.linspace(0, C - 1, min(C, SAMPLE_CLASSES), device=device).round().long().repeat_interleave(4)
    codes = generate(model, labels, cfg_scale=2.0, generator=torch.Generator(device).manual_seed(seed))
    x = tok.decode_codes(codes[::4][:8])                                # (8, 3, H, W): the first sample of 8 classes
    save_grid(x, path, nrow=len(x))
    copies = copy_distance(codes, dataset.codes, dataset.labels)      # sample or copy?
    return {} if copies is None else {"copy/sample_nn": copies[0].median().item(), "copy/train_nn":
                                      copies[1].median().item(), "copy/fraction": (copies[0] < copies[1].min())
                                      .float().mean().item()}


# --------------------------------------------------------------------------------------------------------------
# Arguments: parsed once; a flag left unset takes the preset's recipe

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    recipe = lambda key, what: f"{what} (default: the preset's recipe, paper {PAPER[key]}, tiny {TINY[key]})"
    # model and data
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="FAR preset (far.PRESETS, Tab. 2); its "
                   "recipe (RECIPES) gives the defaults marked 'recipe' (default: %(default)s)")
    p.add_argument("--head", default="ar", choices=["ar", "linear", "mlp"], help="prediction head: ar = the "
                   "factorized AR head of Sec. 3.3; linear / mlp = the baselines of Tab. 4 (default: %(default)s)")
    p.add_argument("--tokenizer-ckpt", help="trained tokenizer (ours or official) whose codes FAR models (default: "
                   "weights/tiny_tokenizer.pt for tiny; the paper presets need one)")
    p.add_argument("--data-path", help="ImageFolder root of training images (default: data/photos/train for tiny; the "
                   "paper presets need one)")
    p.add_argument("--val-path", help="held-out ImageFolder for the NLL, its class folders named as --data-path's (all "
                   "or some; default: data/photos/val when --data-path is the bundled data/photos/train, else none; '' "
                   "for none)")
    p.add_argument("--augment", choices=sorted(VIEWS), help=recipe("augment", "views extracted per training image "
                   "(tencrop: the released one; random: 40 training crops)"))                        # in meta.json
    p.add_argument("--out-dir", default="runs/far", help="codes, checkpoints, log.jsonl, samples (%(default)s)")
    p.add_argument("--init-from", metavar="CKPT", help="fine-tune: start from these FAR weights (ours, the shipped "
                   "weights/tiny_far.pt, a released FAR file) with a fresh optimizer at step 0; another number of "
                   "classes starts the class embedding afresh")
    # optimisation (# parity: §7.3, the released script)
    p.add_argument("--global-batch-size", type=int, help=recipe("global_batch_size", "sequences per step, all ranks"))
    p.add_argument("--max-steps", type=int, help=recipe("max_steps", "training steps"))
    p.add_argument("--lr", type=float, help=recipe("lr", "AdamW learning rate"))
    p.add_argument("--lr-decay", choices=["constant", "cosine"], help=recipe("lr_decay", "lr after warm-up: "
                   "constant, or a cosine to 0 at --max-steps (keep --max-steps on --resume for the same schedule)"))
    p.add_argument("--warmup-steps", type=int, help=recipe("warmup_steps", "steps of linear lr warm-up from 0"))
    p.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1 (%(default)s)")
    p.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2 (%(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="on matrices and embeddings only (%(default)s)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (%(default)s)")
    # runtime
    p.add_argument("--seed", type=int, default=0, help="base seed; rank r uses seed + r (%(default)s)")
    p.add_argument("--num-workers", type=int, help=recipe("num_workers", "loader workers per rank (the code "
                                                                     "extraction's: at least 2)"))
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"], help="autocast dtype; auto: bf16 on GPUs with bf16 "
                   "(Ampere on) and CPUs with AVX512-BF16 or AMX, else fp32 (default: the recipe's, tiny auto; paper "
                   "presets: bf16 on CUDA, else fp32)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the DDP-wrapped model "
                   "(default: on with CUDA)")
    p.add_argument("--extract-batch-size", type=int, default=16, help="images per encode in stage 1 (%(default)s)")
    p.add_argument("--log-every", type=int, default=50, help="steps between JSONL log lines (%(default)s)")
    p.add_argument("--sample-every", type=int, default=500, help="steps between PNG grids of samples, and one at the "
                   "end; 0: none (%(default)s)")
    p.add_argument("--eval-every", type=int, default=500, help="steps between held-out NLLs (%(default)s)")
    add_checkpoint_flags(p)                                           # --ckpt-every, --resume, ...
    args = p.parse_args(argv)
    for key, value in RECIPES[args.preset].items():                   # flags left unset: the preset's recipe
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    if args.val_path is None and args.data_path == os.path.join(BUNDLED, "train"):
        args.val_path = os.path.join(BUNDLED, "val")                  # the bundled photos' held-out strip
    # Every value is checked here, before any work: one line naming the flag, the value and the valid range, exit 2.
    check_flags(
            p, args,
            ("lr", math.isfinite(args.lr) and args.lr > 0, "a finite number > 0"),
            ("weight_decay", math.isfinite(args.weight_decay) and args.weight_decay >= 0, "a finite number >= 0"),
            ("grad_clip", args.grad_clip > 0, "> 0"),
            *((b, 0 <= getattr(args, b) < 1, "in [0, 1)") for b in ("beta1", "beta2")),    # Adam's betas
            *((n, getattr(args, n) >= 0, "an integer >= 0") for n in ("num_workers", "warmup_steps", "sample_every")),
            ("ckpt_minutes", args.ckpt_minutes > 0, "> 0"), ("keep_checkpoints", args.keep_checkpoints >= 0, ">= 0"),
            *((n, getattr(args, n) >= 1, "an integer >= 1") for n in ("global_batch_size", "max_steps", "log_every",
              "eval_every", "ckpt_every", "extract_batch_size")))
    for flag in ("data_path", "tokenizer_ckpt"):                      # paper presets: no defaults for these
        if getattr(args, flag) is None:
            p.error(f"--{flag.replace('_', '-')} is required for preset {args.preset} (the bundled photos and the "
                    f"shipped tiny tokenizer are for the tiny preset)")
    if not os.path.isfile(args.tokenizer_ckpt):                       # before any rank starts work
        p.error(f"--tokenizer-ckpt {args.tokenizer_ckpt}: no such file")
    return args, p


# --------------------------------------------------------------------------------------------------------------
# What main() calls

def load_codes(args, parser, device, rank, world):
    """(the tokenizer on device, the training folder's listing, training codes, held-out codes or None): stage 1, or
    its files when an earlier run made them. A bad tokenizer file, data or held-out folder, or a resume on other class
    folders exits 2, before the extraction."""
    listing = {}
    for flag, root in (("--data-path", args.data_path), ("--val-path", args.val_path)):
        try:                                                          # both listed now, before minutes of extraction
            listing[flag] = ImageFolder(root, (1, 1)) if root else None   # classes sorted, label = index
        except FileNotFoundError as e:
            parser.error(f"{flag}: {e}")
        if listing[flag] and listing[flag].flat:                      # FAR is class-conditional (Sec. 3.3)
            parser.error(f"{flag} {root}: FAR needs class folders, root/<class>/<image>; these images lie directly "
                         f"in it")
    folder, val_folder = listing["--data-path"], listing["--val-path"]
    if val_folder and not set(val_folder.classes) <= set(folder.classes):   # a held-out label must mean its class
        parser.error(f"--val-path {args.val_path}: classes that --data-path does not have: "
                     f"{', '.join(sorted(set(val_folder.classes) - set(folder.classes))[:10])}")
    try:
        if len(folder) * VIEWS[args.augment] < args.global_batch_size:   # before minutes of extraction
            parser.error(f"--global-batch-size {args.global_batch_size} is larger than the data: {len(folder)} images "
                         f"x {VIEWS[args.augment]} views (--augment {args.augment})")
        tok = load_tokenizer(args.tokenizer_ckpt, device).requires_grad_(False)   # eval mode, fp32
        last = os.path.join(args.out_dir, "checkpoints", "last.pt")
        resuming = args.resume and os.path.exists(last)
        if resuming:                                                  # a label must keep its class across a resume
            try:                                                      # memory-mapped: no weight is read
                trained_on = torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("classes")
            except Exception:                                         # a damaged file: read_resume names it below
                trained_on = None
            if trained_on is not None and trained_on != folder.classes:
                gone, new = sorted(set(trained_on) - set(folder.classes)), sorted(set(folder.classes) - set(trained_on))
                parser.error(f"--resume: {last} was trained on other classes than --data-path {args.data_path} has "
                             f"(missing: {', '.join(gone[:5]) or 'none'}; new: {', '.join(new[:5]) or 'none'}); resume "
                             f"on the same class folders or use another --out-dir")
            # a damaged last.pt, another kind, config, --seed or --global-batch-size: refused now, not after the
            # extraction (resume() reads it again, whole)
            read_resume(args.out_dir, far_config(args, tok, folder.classes), args, mmap=True)
        if args.init_from and not resuming:                           # a wrong file is named now, not after extraction
            with torch.device("meta"):                                # shapes and names only: no weight is read
                init_from(args, FAR(far_config(args, tok, folder.classes)), "meta", folder.classes)
        extract = lambda root, name, aug: extract_codes(tok, root, os.path.join(args.out_dir, "codes", name), aug,
                                                        args.extract_batch_size, device, rank, world,
                                                        max(2, args.num_workers))   # images: always in workers
        dataset = Codes(*extract(args.data_path, "train", args.augment), seed=args.seed)
        val_set = None
        if val_folder:                                                # one centre view per held-out image
            val_codes, val_labels = extract(args.val_path, "val", "none")
            # the val folder's label i is its i-th class; FAR's is the training folder's index of that class name (a
            # val folder with fewer classes numbers them otherwise). Unreadable images keep -1 (the appended -1).
            to_train = np.array([folder.classes.index(c) for c in val_folder.classes] + [-1])
            val_set = Codes(val_codes, to_train[val_labels])
    except (CheckpointError, FileNotFoundError) as e:
        parser.error(str(e))
    if len(dataset) < world:                                          # every rank needs one image per epoch
        parser.error(f"--data-path {args.data_path}: {len(dataset)} readable images for {world} processes"
                     + (" (every file was unreadable)" if not len(dataset) else ""))
    if val_set is not None and not len(val_set):                      # a held-out NLL of nothing would read 0 bits
        parser.error(f"--val-path {args.val_path}: no readable images (every file was unreadable)")
    return tok, folder, dataset, val_set


def far_config(args, tok, classes):
    """The preset gives the network (Tab. 2 sizes), the tokenizer k, K and the grid, the data the number of classes."""
    return FARConfig(**{**PRESETS[args.preset], "num_codebooks": tok.cfg.num_codebooks, "head": args.head,
                        "codebook_size": tok.cfg.codebook_size, "grid": tok.cfg.grid, "num_classes": len(classes)})


def build_model(args, tok, classes, device):
    """(FAR config, FAR on device), the same initial weights on every rank."""
    cfg = far_config(args, tok, classes)
    torch.manual_seed(args.seed)
    return cfg, FAR(cfg).to(device)                                     # fp32 weights; autocast does bf16


def init_from(args, far, device, classes):
    """Fine-tuning: far's weights from --init-from (CheckpointError if they do not fit) -> a line for the run's summary.
    The class table (a row per class, then CFG's null row) is matched by class name where the file records the names
    (ours, weights/): a class of the file keeps its row, another class keeps its fresh one. A released file records
    none: its rows are taken as they are for the same number of classes (ImageNet's sorted folders), else left fresh.
    The null row, "no class", comes from the file either way."""
    ckpt = read_checkpoint(args.init_from, "FAR checkpoint", device)
    source = load_far(ckpt, device, name=args.init_from)
    table = far.cls_embedding.embedding_table.weight                  # (C + 1, dim), C = len(classes)
    fresh = table.detach().clone()
    init_weights(far, source, f"--init-from {args.init_from}", flexible=["cls_embedding.embedding_table.weight"])
    theirs, rows = ckpt.get("classes"), source.cls_embedding.embedding_table.weight.detach()   # (C' + 1, dim)
    if theirs is None and len(rows) == len(fresh):                    # a released file: ids, no names
        return f"initialised from {args.init_from} (its class table as it is: the file names no classes)"
    where = {name: i for i, name in enumerate(theirs or [])}          # the file's class name -> its row
    ids = [i for i, name in enumerate(classes) if name in where]      # this run's ids of the file's classes
    with torch.no_grad():
        new = fresh.clone()
        new[ids] = rows[[where[classes[i]] for i in ids]]
        new[-1] = rows[-1]                                            # CFG's null class: the same in any data
        table.copy_(new)
    kept = [classes[i] for i in ids]
    named = f" ({', '.join(kept[:5])}{', ...' if len(kept) > 5 else ''})" if kept else ""
    return (f"initialised from {args.init_from}; class table: {len(kept)} of {len(classes)} classes from the file by "
            f"name{named}, the others afresh, CFG's null row from the file")


# --------------------------------------------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv                     # for the resume command of a stopped run
    args, parser = parse_args(argv)
    ddp, rank, world, device, batch = start_training(args, parser)   # torchrun: NCCL / gloo; plain python: 1 process
    master, last = rank == 0, os.path.join(args.out_dir, "checkpoints", "last.pt")
    tok, folder, dataset, val_set = load_codes(args, parser, device, rank, world)   # stage 1, once per --out-dir
    classes = folder.classes

    # The model and AdamW (weight decay on every tensor with ndim >= 2: linears, embeddings; # parity: §7.3); resume
    cfg, far = build_model(args, tok, classes, device)
    far.rope(device)   # the rotary table, built now: one built inside the compiled step would recompile it at step 2
    model = distribute(far, ddp, device, args.compile)                 # DDP (all-reduce in backward), then compiled
    groups = [{"params": [p for p in far.parameters() if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in far.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), fused=device.type == "cuda")
    step = resume(args, parser, cfg, {"model": far, "opt": opt}, rank)
    initialised = ""
    if args.init_from and step == 0:                                    # fine-tuning (a resumed run continues instead)
        try:
            initialised = init_from(args, far, device, classes)
        except CheckpointError as e:
            parser.error(str(e))
    # what sample.py checks and names: the tokenizer (by path; its codebooks by fingerprint) and the class names
    extra = {"tokenizer": {"config": asdict(tok.cfg), "fingerprint": codebook_fingerprint(tok),
                           "path": os.path.abspath(args.tokenizer_ckpt)}, "classes": classes}
    n_params = sum(p.numel() for p in far.parameters()) / 1e6
    notes = [initialised,
             f"note: class folders without images (their ids are kept, FAR never sees them): {', '.join(folder.empty)}"
             if folder.empty else ""]
    log = open_run(args, master, f"FAR {args.preset} ({cfg.head} head): {n_params:.2f} M parameters, "
                   f"k={cfg.num_codebooks} x {cfg.codebook_size} codes on a {cfg.grid} grid, {len(dataset)} images, "
                   f"{len(classes)} classes, world {world}, batch {batch}/rank, steps {step} -> {args.max_steps}, "
                   f"{device}, {args.precision}" + "".join(f"; {n}" for n in notes if n), step)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")   # weights fp32
    if val_set is not None and step == 0:                              # the "before" of the held-out NLL
        log({"step": 0, **nll_bits(far, val_set, device, rank, world)})

    # The loop: teacher-forced cross-entropy over the k sub-codes (Sec. 3.3), AdamW, clip
    batches = stream(dataset, batch, args.seed, rank, world, step, args.num_workers, device.type == "cuda")
    bar = tqdm(total=args.max_steps, initial=step, disable=not master, desc="train", dynamic_ncols=True)
    t0, tokens = time.time(), 0                                          # tokens: the throughput of this run only
    saved_at = t0                                                        # --ckpt-minutes counts from here
    while step < args.max_steps:
        codes, labels = next(batches)                                   # (B, k, h, w) int64, (B,)
        codes, labels = codes.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast:
            loss = far_loss(model(codes, labels), codes)                # Sec. 3.3: mean CE over the k sub-codes
        for group in opt.param_groups:                                  # from the step: resume needs no state
            group["lr"] = lr_at(args, step)
        opt.zero_grad(set_to_none=True)
        loss["loss"].backward()                                         # DDP all-reduces the gradients here
        loss["grad_norm"] = torch.nn.utils.clip_grad_norm_(far.parameters(), args.grad_clip)   # logged: pre-clip
        opt.step()
        step, tokens = step + 1, tokens + codes[:, 0].numel() * world   # positions (B*h*w) over all ranks
        bar.update(1)
        # loss, ce/j per sub-code, grad_norm averaged over ranks; a NaN stops before any checkpoint is written
        terms = mean_over_ranks_or_stop(loss, step, last, bar)
        end = step == args.max_steps                                    # always log, evaluate, save the last step
        if step % args.log_every == 0 or end:
            log({"step": step, **terms, "tokens_per_s": tokens / (time.time() - t0)})
            bar.set_postfix(loss=f"{terms['loss']:.3f}")
        if val_set is not None and (step % args.eval_every == 0 or end):   # every rank
            log({"step": step, **nll_bits(far, val_set, device, rank, world)})
        if master and args.sample_every and (step % args.sample_every == 0 or end):   # rank 0, SAMPLE_CLASSES
            log({"step": step, **samples_and_copies(far, tok, dataset, args.seed, os.path.join(
                args.out_dir, "samples", f"{step:07d}.png"))})
        # a stop signal or --ckpt-minutes: last.pt now (numbered at --ckpt-every and the end only); then stop if asked
        stop, save_due = stop_requested(device, master and time.time() - saved_at > 60 * args.ckpt_minutes)
        if step % args.ckpt_every == 0 or end or stop or save_due:
            save_checkpoint(args, cfg, step, batch, {"model": far, "opt": opt}, extra,
                            numbered=step % args.ckpt_every == 0 or end)
            saved_at = time.time()
        if stop:
            bar.close()                                                 # the bar's line ends before the last line
            exit_stopped(args, step, argv, "train_far.py")
    bar.close()
    release_stop_signals()                                              # ablate.py goes on: Ctrl-C acts at once
    if master:                                                          # the last line: where the weights are
        print(f"done: step {step}, checkpoint {last}")
    if ddp:
        dist.destroy_process_group()                                   # a clean exit for torchrun


if __name__ == "__main__":
    main()
