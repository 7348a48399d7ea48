"""Evaluate the FQGAN tokenizer and generated samples with the paper's metrics.

Paper: "Factorized Visual Tokenization and Generation", Bai et al., arXiv 2411.16681.
  Sec. 4.1 "Metric"  tokenizers: rFID on ImageNet val, PSNR and Inception Score (Tab. 1, Tab. 3; we add SSIM, LPIPS);
                     generation: FID, IS, precision and recall under the ADM protocol (Tab. 2)
  Tab. 3             usage of each sub-codebook (we add its perplexity)
The protocol is the official script's (docs/official_code.md §4): center crop at the model's resolution, encode ->
codes -> decode, uint8 images, every metric against the cropped originals. The formulas are in metrics.py (this file
runs them over the images, sharded over torchrun's ranks); Fig. 3 and Fig. 4 are in figures.py.

Tokenizer mode (no argument: the shipped tiny tokenizer on the bundled held-out photos); prints a table, writes JSON:
  python evaluate.py [--tokenizer-ckpt weights/tiny_tokenizer.pt] [--data-path data/photos/val] [--out-json F]
  torchrun --nproc_per_node=8 evaluate.py --tokenizer-ckpt fqgan_dual_ds16.pt --data-path /data/imagenet/val --fid
Generation mode (samples: sample.py's npz or a folder; reference: an npz such as ADM's VIRTUAL_imagenet256_labeled.npz
or a folder, center-cropped to the samples' size):
  python evaluate.py --samples samples.npz --reference VIRTUAL_imagenet256_labeled.npz
Generation mode without a download (no --reference): the stand-in teacher (weights/tiny_teacher.pt, a small CNN
trained to tell the bundled photos apart) in Inception's place, against random crops of the held-out photos:
  python sample.py --num-samples 550 --out-npz s.npz && python evaluate.py --samples s.npz
  acc_teacher  the teacher's top-1 accuracy on the samples (is a sample of class c classified as c?), next to its
               accuracy on real crops (acc_teacher_real) and on the tokenizer's reconstructions of them (_rec)
  fd_teacher   the FID formula on the teacher's pooled features of the samples vs real crops, next to the floor
               (other real crops, as many as samples) and the tokenizer's reconstructions. Not FID: 128 features
               that know only which of 11 photos a crop shows; numbers compare runs on these photos, nothing else.
Unreadable images are skipped and counted, never replaced. Weights (torch-fidelity's Inception, LPIPS' two files) come
from $FQGAN_WEIGHTS (default torch.hub.get_dir()/checkpoints), never downloaded; in tokenizer mode a missing file makes
its metric null with a one-line note naming the file (--fid / --lpips: an error instead).
"""
import argparse
import json
import os

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from checkpoints import (CheckpointError, check_flags, check_writable, device_flag, gather_on_rank0,
                         init_distributed, load_tokenizer)
from images import (BUNDLED, ImageFolder, check_sample_set, image_batches, labelled_samples, real_crops,
                    release_free_memory, to_uint8)
from losses import LPIPS
from metrics import INCEPTION_FILE, LAYERS, class_probe, fidelity, load_inception, psnr, ssim, teacher_metrics
from quantizer import codebook_usage
from teachers import stand_in_teacher

ROOT = os.path.dirname(os.path.abspath(__file__))                     # for the shipped weights/ default


# --------------------------------------------------------------------------------------------------------------
# Shared by the modes

def gather(local):
    """A dict of lists of CPU tensors (a row per image), concatenated over all ranks in rank order on rank 0; None on
    the others (the metrics are computed once)."""
    parts = gather_on_rank0({k: torch.cat(v) for k, v in local.items() if v})   # [(b_i, ...)] -> (sum b_i, ...)
    return parts and {k: torch.cat([p[k] for p in parts if k in p]) for k in set().union(*parts)}   # some have none


def optional(flag, build, what):
    """flag True: build() must succeed. None: build() if its weight files exist, else a one-line note and None."""
    try:
        return build() if flag is not False else None                 # --no-lpips / --no-fid: not even tried
    except FileNotFoundError as e:                                    # only a missing weight file is forgiven
        if flag:                                                      # asked for explicitly: fail loudly
            raise
        if not dist.is_initialized() or dist.get_rank() == 0:         # one note, not one per rank
            print(f"note: {what} reported as null; " + " ".join(str(e).split()))


# --------------------------------------------------------------------------------------------------------------
# Tokenizer mode: Tab. 1 / Tab. 3 on a folder, sharded over the ranks

@torch.no_grad()
def evaluate_tokenizer(args, tok, dataset, device, rank, world):
    """Tab. 1 / Tab. 3 metrics of tok on the first n images of dataset -> {metric: value or None}."""
    n = min(args.num_images or len(dataset), len(dataset))            # --num-images 0 = all
    if n < world:
        raise ValueError(f"{n} images for {world} processes: every rank needs at least one")
    loader = DataLoader(Subset(dataset, range(rank, n, world)),       # strided shards: every image counted once
                        batch_size=args.batch_size, num_workers=args.num_workers)
    lpips = optional(args.lpips, lambda: LPIPS().to(device), "LPIPS")
    inception = optional(args.fid, lambda: load_inception(device, args.inception_weights), "rFID and IS")
    local = {"unreadable": []}                                        # {name: [per-batch CPU tensors]}
    release_free_memory() if args.num_workers > 0 else None           # its workers are forked at the loop's start
    for x, label, _, _ in tqdm(loader, desc="reconstruct", disable=rank > 0, dynamic_ncols=True):
        local["unreadable"].append((label < 0).sum().view(1))          # dropped and counted, never replaced
        x = x[label >= 0].to(device)
        if not len(x):                                                # a batch of unreadable files only
            continue
        codes = tok.encode(x)                                         # Eq. (1)/(5) per branch: (B, k, h, w)
        rec, real = to_uint8(tok.decode_codes(codes)), to_uint8(x)   # decoded from the codebook rows, as official
        # every metric sees the uint8 images the official script writes as PNGs, mapped to [0, 1] (or [-1, 1])
        batch = {"codes": codes, "psnr": psnr(rec / 255, real / 255), "ssim": ssim(rec / 255, real / 255),
                 "label": label[label >= 0]}
        for i, branch in enumerate(tok.branches):                      # Fig. 4: each image's mean code vector
            batch[f"emb/{i}"] = branch.quantize.codebook()[codes[:, i]].mean((1, 2))   # (B, h, w, d) -> (B, d)
        if lpips is not None:
            batch["lpips"] = lpips(rec / 127.5 - 1, real / 127.5 - 1)   # uint8 -> [-1, 1], LPIPS' input range
        for name, images in (("rec", rec), ("real", real)) if inception is not None else ():   # rFID; IS of rec
            feats = inception.convert_features_tuple_to_dict(inception(images))   # uint8 in -> {layer: (B, width)}
            batch.update({f"{name}/{k}": v for k, v in feats.items()})
        for k, v in batch.items():
            local.setdefault(k, []).append(v.cpu())
    # Tab. 3 usage + perplexity of each sub-codebook over all ranks: a rank without images all-reduces (0, k, h, w)
    codes, usage = torch.cat(local.pop("codes", None) or [torch.zeros(0, tok.cfg.num_codebooks, 1, 1).long()]), {}
    for i in range(tok.cfg.num_codebooks):
        u = codebook_usage(codes[:, i].to(device), tok.cfg.codebook_size)   # on device: NCCL needs CUDA tensors
        usage[f"usage/{i}"], usage[f"perplexity/{i}"] = u["usage"].item(), u["perplexity"].item()
    stats = gather(local)                                             # rank 0 computes the rest, the others wait
    if stats is None:
        return None
    if "psnr" not in stats:                                           # no rank had a single readable image
        raise ValueError(f"none of the {n} images under {args.data_path} could be read")
    res = {"images": len(stats["psnr"]), "unreadable": int(stats["unreadable"].sum()), "psnr": stats["psnr"].mean()
           .item(), "ssim": stats["ssim"].mean().item(), "lpips": stats["lpips"].mean().item() if lpips else None,
           "rfid": None, "inception_score": None, "inception_score_std": None,
           # how well each sub-codebook's codes alone tell the classes apart
           **{f"probe/{i}": class_probe(stats[f"emb/{i}"], stats["label"]) for i in range(tok.cfg.num_codebooks)},
           "probe_chance": 1 / len(stats["label"].unique())}
    if inception is not None:
        feats = [{k.split("/", 1)[1]: v for k, v in stats.items() if k.startswith(p)} for p in ("rec/", "real/")]
        metrics = fidelity(*feats, prc=False, device=device)          # rFID against the crops, as official §4.1
        res.update(rfid=metrics.pop("fid"), **metrics)                # IS of the reconstructions
    return {**res, **usage}


# --------------------------------------------------------------------------------------------------------------
# Generation mode: Tab. 2 of samples against a reference

@torch.no_grad()
def evaluate_generation(args, device, rank, world):
    """Tab. 2 metrics of --samples against --reference: FID, IS, precision / recall, image counts."""
    first = next(image_batches(args.samples, 1), None)               # the reference is cropped to the samples' size
    if first is None:
        raise ValueError(f"none of the images in {args.samples} could be read")
    size = tuple(first[1].shape[-2:])
    inception = load_inception(device, args.inception_weights)      # required here: no metric without it
    unreadable = {}                                                   # files skipped, per input (rank 0: all ranks')

    def features(path):     # each rank decodes and embeds its own share; rank 0 gets all, in the one-process order
        local, skipped = {}, []                                       # {"index" or LAYERS value: [(b,) or (b, width)]}
        for index, x in tqdm(image_batches(path, args.batch_size, size, skipped, shard=(rank, world)),
                             desc=os.path.basename(path), disable=rank > 0, dynamic_ncols=True):
            local.setdefault("index", []).append(index)
            for k, v in inception.convert_features_tuple_to_dict(inception(x.to(device))).items():
                local.setdefault(k, []).append(v.cpu())
        parts = gather_on_rank0(skipped)                              # every rank's unreadable files, on rank 0
        unreadable[path] = sorted(sum(parts, [])) if parts else skipped
        feats = gather(local)
        if feats is None:                                             # ranks > 0
            return None
        if "index" not in feats:
            raise ValueError(f"none of the images in {path} could be read")
        order = feats.pop("index").argsort()   # the file order (IS splits the images in their order; FID, P / R: no)
        return {k: v[order] for k, v in feats.items()}
    feats, ref = features(args.samples), features(args.reference)   # rank 0 gets all features, the others None
    if rank > 0:
        return None
    for path, files in ((p, f) for p, f in unreadable.items() if f):   # named, at most 5
        print(f"note: {len(files)} unreadable images skipped in {path}: {', '.join(files[:5])}"
              + (" ..." if len(files) > 5 else ""))
    return {"images": len(feats[LAYERS["fid"]]), "unreadable": len(unreadable[args.samples]),
            "reference_images": len(ref[LAYERS["fid"]]), "reference_unreadable": len(unreadable[args.reference]),
            **fidelity(feats, ref, device=device)}                    # Tab. 2: FID, IS, precision, recall


# --------------------------------------------------------------------------------------------------------------
# Generation mode without a download: the stand-in teacher in Inception's place (acc_teacher, fd_teacher)

def teacher_levels(teacher, classes, root, size, n_real, n_floor, tok, device):
    """The scale to read acc_teacher / fd_teacher on -> (reference features (n_real, width), levels): the teacher on
    n_real real crops of root (the reference), on n_floor other crops (the floor: real against real, as many images as
    the samples, so the same estimation bias) and on the tokenizer's reconstructions of those (what codes can give)."""
    ref, ref_labels, data_classes = real_crops(root, size, n_real, seed=0)
    if data_classes != classes:
        raise ValueError(f"--data-path {root} has classes {', '.join(data_classes)}; the teacher knows "
                         f"{', '.join(classes)}")
    floor, floor_labels, _ = real_crops(root, size, n_floor, seed=1)  # another draw of crops
    acc_real, _, ref_feats = teacher_metrics(teacher, ref.to(device), ref_labels.to(device), None)
    _, fd_floor, _ = teacher_metrics(teacher, floor.to(device), floor_labels.to(device), ref_feats)
    with torch.no_grad():                                             # encode -> codes -> decode, 256 at a time
        rec = torch.cat([to_uint8(tok.decode_codes(tok.encode(floor[i:i + 256].to(device).float() / 127.5 - 1)))
                         for i in range(0, len(floor), 256)])
    acc_rec, fd_rec, _ = teacher_metrics(teacher, rec, floor_labels.to(device), ref_feats)
    return ref_feats, {"acc_teacher_real": acc_real, "fd_teacher_floor": fd_floor, "acc_teacher_rec": acc_rec,
                       "fd_teacher_rec": fd_rec, "teacher_chance": 1 / len(classes), "real_crops": n_real}


def evaluate_with_teacher(args, tok, device):
    """acc_teacher / fd_teacher of --samples, with the levels of real crops of --data-path and of reconstructions."""
    teacher, classes = stand_in_teacher(args.teacher, device)
    x, labels, unreadable = labelled_samples(args.samples, classes)
    if len(x) < 2:                                                    # fd_teacher's covariance needs two
        raise ValueError(f"--samples {args.samples}: {len(x)} image{'s' * (len(x) != 1)}; fd_teacher needs 2 or more")
    ref_feats, levels = teacher_levels(teacher, classes, args.data_path, tuple(x.shape[-2:]), args.real_crops,
                                       len(x), tok, device)
    acc, fd, _ = teacher_metrics(teacher, x.to(device), labels.to(device), ref_feats)
    return {"images": len(x), "unreadable": len(unreadable), "acc_teacher": acc, "fd_teacher": fd, **levels}


# --------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # tokenizer mode (Tab. 1, Tab. 3)
    p.add_argument("--tokenizer-ckpt", default=os.path.join(ROOT, "weights", "tiny_tokenizer.pt"),
                   help="our checkpoint or an official FQGAN one (default: the shipped weights/tiny_tokenizer.pt)")
    p.add_argument("--data-path", default=os.path.join(BUNDLED, "val"), help="ImageFolder root (ImageNet val layout "
                   "root/<class>/<image>), center-cropped at the model's resolution (default: data/photos/val)")
    p.add_argument("--num-images", type=int, default=0, help="evaluate the first N images only (default 0: all)")
    p.add_argument("--classes", nargs="+", metavar="CLASS", help="only these classes of --data-path (default: all)")
    for flag, what in (("--lpips", "LPIPS"), ("--fid", "rFID and IS")):   # None: if their weights are there
        p.add_argument(flag, action=argparse.BooleanOptionalAction, help=f"{what} (default: if the weights are in "
                       f"$FQGAN_WEIGHTS, else null and a note; {flag}: missing weights are an error)")
    p.add_argument("--samples", help="generated images, npz (arr_0: N x H x W x 3 uint8) or folder; generation mode")
    p.add_argument("--reference", help="reference images, npz or folder: FID / IS / precision / recall (Tab. 2); "
                   "without it the stand-in teacher's acc_teacher / fd_teacher against crops of --data-path")
    p.add_argument("--teacher", default=os.path.join(ROOT, "weights", "tiny_teacher.pt"), help="the stand-in "
                   "teacher for acc_teacher / fd_teacher (train_teacher.py; default: the shipped %(default)s)")
    p.add_argument("--real-crops", type=int, default=2000, help="random crops of --data-path as the real reference "
                   "of fd_teacher / acc_teacher_real (default: %(default)s)")
    p.add_argument("--inception-weights", help="torch-fidelity Inception file (default: "   # both modes
                   f"$FQGAN_WEIGHTS/{INCEPTION_FILE})")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch and process")
    p.add_argument("--device", type=device_flag, help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK with CUDA)")
    p.add_argument("--num-workers", type=int, default=2, help="data loader workers per process (tokenizer mode)")
    p.add_argument("--out-json", help="results file (default: runs/eval/{tokenizer,generation}.json)")
    args = p.parse_args(argv)                                         # every value checked below: exit 2, one line
    check_flags(p, args, *((n, getattr(args, n) >= lo, f"an integer >= {lo}") for n, lo in
                           (("num_images", 0), ("batch_size", 1), ("num_workers", 0), ("real_crops", 2))))
    if args.reference and not args.samples:                           # FID needs both sets
        p.error("--reference needs --samples (generation mode)")
    inputs = ("samples", "reference") if args.reference else ("samples", "teacher", "tokenizer_ckpt", "data_path") \
        if args.samples else ("tokenizer_ckpt", "data_path")
    for name in inputs:                                               # before any work
        path = getattr(args, name)
        if not os.path.exists(path):
            p.error(f"--{name.replace('_', '-')} {path} does not exist" + (" (train one with train_tokenizer.py, or "
                    "pass a checkpoint)" if name == "tokenizer_ckpt" else ""))
        try:                                                          # reads the npz header only, not the images
            check_sample_set(path) if name in ("samples", "reference") else None
        except ValueError as e:
            p.error(f"--{name} {e}")
    if args.inception_weights and not os.path.isfile(args.inception_weights):   # given: wanted, never skipped
        p.error(f"--inception-weights {args.inception_weights}: no such file")
    if args.classes and not args.samples and not set(args.classes) <= set(os.listdir(args.data_path)):
        p.error(f"--classes {' '.join(args.classes)}: not all are class folders of --data-path {args.data_path}")
    default = args.out_json is None                                   # its folder is ours to make, when written
    args.out_json = args.out_json or os.path.join("runs", "eval", "generation.json" if args.samples else
                                                  "tokenizer.json")
    try:                                                              # fail before any work, not after it
        check_writable(args.out_json, "--out-json", default=default)
    except CheckpointError as e:
        p.error(str(e))
    return args, p


def main(argv=None):
    args, parser = parse_args(argv)
    ddp, rank, world, _, device = init_distributed(args.device)       # torchrun: shard the images over ranks
    torch.backends.cudnn.allow_tf32 = False                           # metrics: true fp32 convolutions (Inception)
    # One line and exit 2 for: a file that is no checkpoint, a folder without images, every image unreadable, weights
    # (Inception, LPIPS) asked for and missing (the line names the file and where from), sets of other image sizes
    try:
        tok = None if args.reference else load_tokenizer(args.tokenizer_ckpt, device)   # ours or official, eval mode
        if args.reference:
            inputs = {"samples": args.samples, "reference": args.reference}
            metrics = evaluate_generation(args, device, rank, world)
        elif args.samples:                                            # small sets: rank 0 does it all
            inputs = {"samples": args.samples, "teacher": args.teacher, "real": args.data_path,
                      "tokenizer": args.tokenizer_ckpt}
            metrics = evaluate_with_teacher(args, tok, device) if rank == 0 else None
        else:
            dataset = ImageFolder(args.data_path, tok.cfg.image_shape, train=False, only=args.classes)   # ADM crop
            inputs = {"checkpoint": args.tokenizer_ckpt, "data_path": args.data_path,
                      "image_size": "%dx%d" % dataset.size}
            metrics = evaluate_tokenizer(args, tok, dataset, device, rank, world)
    except (FileNotFoundError, ValueError) as e:                      # CheckpointError is a ValueError
        parser.error(str(e))
    res = metrics and {**inputs, **metrics}                           # None on ranks > 0: rank 0 reports
    if res:
        for key, value in res.items():                        # the table: one line per metric, null when missing
            print(f"{key:<22}{'null' if value is None else f'{value:.4f}' if isinstance(value, float) else value}")
        os.makedirs(os.path.dirname(os.path.abspath(args.out_json)), exist_ok=True)   # the default runs/eval
        with open(f"{args.out_json}.tmp", "w") as f:                   # None -> null in the JSON
            json.dump(res, f, indent=1)
        os.replace(f"{args.out_json}.tmp", args.out_json)     # atomic: a crash never leaves half a file
        print(f"wrote {args.out_json}")
    if ddp:                                 # rank 0 wrote its files just now: every rank leaves the group together
        dist.barrier()
        dist.destroy_process_group()
    return res


if __name__ == "__main__":
    main()
