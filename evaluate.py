"""Evaluate the FQGAN tokenizer and generated samples with the paper's metrics.

Paper: "Factorized Visual Tokenization and Generation", Bai et al., arXiv 2411.16681.
  Sec. 4.1 "Metric"  tokenizers: rFID on ImageNet val, PSNR and Inception Score (Tab. 1, Tab. 3; we add SSIM, LPIPS);
                     generation: FID, IS, precision and recall under the ADM protocol (Tab. 2)
  Tab. 3             usage of each sub-codebook (we add its perplexity)
The protocol is the official script's (docs/official_code.md §4): center crop at the model's resolution, encode ->
codes -> decode, uint8 images, every metric against the cropped originals. Fig. 3 and Fig. 4 are in figures.py.

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
import math
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from checkpoints import CheckpointError, check_writable, device_flag, init_distributed, load_tokenizer
from images import (BUNDLED, IMAGE_EXTS, ImageFolder, image_batches, list_images, npz_header, open_rgb, random_crop,
                    release_free_memory, to_tensor, to_uint8)
from losses import LPIPS, read_weights, weights_dir
from quantizer import codebook_usage
from teachers import load_teacher

ROOT = os.path.dirname(os.path.abspath(__file__))                     # for the shipped weights/ default

# Inception features per metric, as ADM's evaluator (the paper's Tab. 2): pool_3 (2048) for FID and precision /
# recall, logits for IS. NOTE(paper≠code): torch-fidelity's own precision / recall default is VGG16 fc2.
LAYERS = {"fid": "2048", "isc": "logits_unbiased", "prc": "2048"}     # torch-fidelity's feature names
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"   # the file name of torch-fidelity's URL_INCEPTION_V3


# --------------------------------------------------------------------------------------------------------------
# Metrics

def psnr(a, b):
    """PSNR (dB) per image of a, b (B, C, H, W) on [0, 1] -> (B,); identical images give 100 dB instead of inf."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)         # (B, C, H, W) -> (B, C*H*W) -> (B,)
    return 10 * torch.log10(1 / mse.clamp(min=1e-10))                 # peak 1: images on [0, 1]; 1e-10 caps at 100


def ssim(a, b, window=11, sigma=1.5, k1=0.01, k2=0.03, data_range=1.0):
    """SSIM (Wang et al. 2004) per image of a, b (B, C, H, W) on [0, data_range] -> (B,): Gaussian window 11x11,
    sigma 1.5, at every valid position, C1 = (k1 L)^2, C2 = (k2 L)^2, mean over positions and channels (= skimage's,
    gaussian_weights=True, data_range=1). NOTE(paper≠code): L = 1; the released script's data_range=2 inflates it."""
    if min(a.shape[-2:]) < window:                                    # no valid window position at all
        raise ValueError(f"SSIM needs images of at least {window}x{window} pixels, got {tuple(a.shape[-2:])}")
    a, b, c = a.double(), b.double(), a.shape[1]                      # float64: the variances are differences
    g = torch.exp(-(torch.arange(window, dtype=a.dtype, device=a.device) - window // 2) ** 2 / (2 * sigma**2))
    w = (torch.outer(g, g) / g.sum() ** 2).expand(c, 1, window, window)   # a normalised 2-D Gaussian per channel
    blur = lambda x: F.conv2d(x, w, groups=c)   # local mean, depthwise: (B, C, H, W) -> (B, C, H-window+1, W-window+1)
    mu_a, mu_b = blur(a), blur(b)                                     # local means
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b   # E[xy] - E[x]E[y]
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2           # the stabilisers; data_range = L
    s = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))   # SSIM map
    return s.mean((1, 2, 3))                                          # (B, C, H', W') -> (B,)


def load_inception(device, path=None):
    """torch-fidelity's Inception (the TF-Inception port that FID and ADM use) from a local file; never downloads."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3   # torch-fidelity's imports (torchvision,
    from torch_fidelity.utils import create_feature_extractor   # torch._dynamo) cost 1.4 s: only where they are used
    path = path or os.path.join(weights_dir(), INCEPTION_FILE)
    if not os.path.isfile(path):                                      # offline by design: say where to put it
        raise FileNotFoundError(f"Inception weights not found: {path} (download: {URL_INCEPTION_V3}); put the file "
                                "there ($FQGAN_WEIGHTS, default torch.hub.get_dir()/checkpoints) or pass "
                                "--inception-weights PATH")
    read_weights(path, URL_INCEPTION_V3)    # a damaged file, pickled code: refused (torch-fidelity unpickles it fully)
    return create_feature_extractor("inception-v3-compat", sorted(set(LAYERS.values())), cuda=False,
                                    feature_extractor_weights_path=path, verbose=False).to(device)   # eval mode


def fidelity(feats, ref=None, prc=True, device="cpu"):
    """From the Inception features of the evaluated images and of the reference: IS (10 splits, or one per image below
    10), FID (Sec. 4.1), precision / recall (Tab. 2, k = 3 as ADM); torch-fidelity's formulas, run by one process:
    IS and precision / recall on `device` (the N x N neighbour distances), FID in numpy."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric
    sizes = [len(f[LAYERS["fid"]]) for f in (feats, ref) if f is not None]
    if ref is not None and min(sizes) < (4 if prc else 2):         # a covariance needs 2 images, k = 3 neighbours 4
        raise ValueError(f"{'FID and precision / recall need 4' if prc else 'rFID needs 2'} or more images in each "
                         f"set, got {' and '.join(map(str, sizes))}")
    isc = isc_features_to_metric(feats[LAYERS["isc"]].to(device), splits=min(10, len(feats[LAYERS["isc"]])))
    out = {"inception_score": isc["inception_score_mean"], "inception_score_std": isc["inception_score_std"]}
    if ref is not None:                                               # FID: Frechet distance of two Gaussians
        stats = [fid_features_to_statistics(f[LAYERS["fid"]]) for f in (feats, ref)]   # (mu, sigma) of each set
        out["fid"] = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    if ref is not None and prc:     # batched k-NN balls (save_cpu_ram): never the whole N x N distance matrix
        pr = prc_features_to_metric(*(f[LAYERS["prc"]].to(device) for f in (feats, ref)), save_cpu_ram=True,
                                    verbose=False)
        out["precision"], out["recall"] = pr["precision"], pr["recall"]
    return out


def gather(local):
    """A dict of lists of CPU tensors (a row per image), concatenated over all ranks in rank order on rank 0; None on
    the others (the metrics are computed once)."""
    local = {k: torch.cat(v) for k, v in local.items() if v}          # [(b_i, ...)] -> (sum b_i, ...)
    if not dist.is_initialized():                                     # one process: nothing to gather
        return local
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, parts, dst=0)                           # pickled: ranks may hold different sizes
    return parts and {k: torch.cat([p[k] for p in parts if k in p]) for k in set().union(*parts)}   # some have none


def class_probe(features, labels, rows=1024):
    """Fig. 4 as one number: leave-one-out nearest-centroid accuracy of images from their feature (N, d), labels (N,).
    Each image is classified by the most cosine-similar class centroid, its own class's centroid computed without it;
    images whose class has no other image are left out (None if that is every image). Chance is 1 / number of classes.
    Memory: (rows, C) at a time, never (N, C, d): for a unit f, (s_c - f).f = s_c.f - 1 and |s_c - f|^2 = |s_c|^2 -
    2 s_c.f + 1."""
    f = F.normalize(features.double(), dim=1)                         # (N, d) unit rows: dot = cosine
    classes, own = labels.unique(return_inverse=True)                 # (C,) sorted ids; (N,) each image's class
    counts = torch.bincount(own, minlength=len(classes)).double()     # (C,) class sizes
    sums = torch.zeros(len(classes), f.shape[1], dtype=f.dtype).index_add_(0, own, f)   # (C, d) per-class sums
    hits, kept = 0, 0
    for i in range(0, len(f), rows):
        o, r = own[i:i + rows], torch.arange(len(f[i:i + rows]))       # (n,) own classes, row numbers
        dot = f[i:i + rows] @ sums.T                                  # (n, C) s_c . f
        sq, sizes = sums.pow(2).sum(1).expand_as(dot).clone(), counts.expand_as(dot).clone()   # (n, C) |s_c|^2, sizes
        sq[r, o], sizes[r, o] = sq[r, o] - 2 * dot[r, o] + 1, sizes[r, o] - 1   # own class without the image
        dot[r, o] -= 1
        scores = (dot / sq.clamp(min=0).sqrt().clamp(min=1e-12)).masked_fill(sizes == 0, -math.inf)
        keep = sizes[r, o] > 0                                        # the image's class has another image
        hits, kept = hits + (scores.argmax(1) == o)[keep].sum().item(), kept + keep.sum().item()
    return hits / kept if kept else None      # accuracy over kept images; None (null in the JSON): no class had two


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
        if dist.is_initialized():                                     # every rank's unreadable files, on rank 0
            parts = [None] * world if rank == 0 else None
            dist.gather_object(skipped, parts, dst=0)
            skipped = sorted(sum(parts, [])) if rank == 0 else skipped
        unreadable[path] = skipped
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

def frechet(a, b):
    """The FID formula (Heusel et al. 2017) on any features a (N, d), b (M, d): torch-fidelity's implementation."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    stats = [fid_features_to_statistics(f.double().cpu()) for f in (a, b)]   # (mean, covariance) of each set
    return fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]


def real_crops(root, size, n, seed):
    """n random crops (uint8 (n, 3, H, W), labels (n,)) of the photos under root, cycling through them: the crops FAR's
    tiny recipe trains on (images.random_crop, scale up to 1.25, flips), drawn from one seeded generator."""
    folder = ImageFolder(root, size, train=False)                     # lists root/<class>/<image>
    photos = [(open_rgb(path), label) for path, label in folder.samples]
    photos = [(img, label) for img, label in photos if img is not None]   # unreadable files: left out
    g = torch.Generator().manual_seed(seed)
    x = torch.stack([to_uint8(to_tensor(random_crop(photos[i % len(photos)][0], size, g))) for i in range(n)])
    return x, torch.tensor([photos[i % len(photos)][1] for i in range(n)]), folder.classes


@torch.no_grad()
def teacher_metrics(teacher, x, labels, reference, batch=256):
    """acc (top-1 of the teacher on uint8 images x (N, 3, H, W) against labels (N,)) and fd (Frechet distance of
    their pooled features to the features `reference` (M, width)); returns (acc, fd, features)."""
    feats = torch.cat([teacher(x[i:i + batch].float() / 127.5 - 1) for i in range(0, len(x), batch)])   # (N, width)
    acc = (teacher.net.classifier(feats).argmax(1) == labels).double().mean().item()   # PhotoCNN's own classifier
    return acc, None if reference is None else frechet(feats, reference), feats


def labelled_samples(path, classes):
    """Samples with the teacher's class ids: an npz with `labels` (sample.py's: the FAR's ids, and their names in
    `classes` when the FAR has them) or a folder root/<class name>/<image> whose class names are the teacher's ->
    (uint8 (N, 3, H, W), labels (N,), unreadable files)."""
    unreadable = []
    if path.endswith(".npz"):
        with np.load(path) as f:
            if "labels" not in f:
                raise ValueError(f"{path} has no labels array (sample.py --out-npz writes one)")
            labels = torch.from_numpy(f["labels"]).long()             # (N,) the FAR's class ids
            names = list(f["classes"]) if "classes" in f else None    # (C,) the FAR's class names, id = index
        if names is not None:                                         # FAR's id -> the teacher's id of that name
            if len(labels) and not 0 <= labels.min() <= labels.max() < len(names):
                raise ValueError(f"{path}: labels in [{labels.min()}, {labels.max()}] for {len(names)} class names")
            if set(names) - set(classes):                             # a FAR of other classes than the teacher's
                raise ValueError(f"{path}: the FAR's classes {', '.join(sorted(set(names) - set(classes))[:10])} are "
                                 f"not among the teacher's ({', '.join(classes)})")
            labels = torch.tensor([classes.index(n) for n in names])[labels]   # e.g. a FAR of 3 of the 11 photos
        x = torch.cat([x for _, x in image_batches(path, 1024)])      # (N, 3, H, W) uint8: sample sets are small here
    else:
        folders = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
        if not folders or set(folders) - set(classes):
            raise ValueError(f"{path}: needs class folders named as the teacher's classes ({', '.join(classes)}), "
                             f"found {', '.join(folders) or 'none'}")
        parts = [(torch.cat([x for _, x in image_batches(os.path.join(path, c), 1024, unreadable=unreadable)]),
                  classes.index(c))
                 for c in folders if list_images(os.path.join(path, c))]
        x, labels = torch.cat([p for p, _ in parts]), torch.cat([torch.full((len(p),), c) for p, c in parts])
    if len(x) != len(labels) or labels.min() < 0 or labels.max() >= len(classes):
        raise ValueError(f"{path}: {len(labels)} labels in [{labels.min()}, {labels.max()}] for {len(x)} images; the "
                         f"teacher knows {len(classes)} classes (ids 0..{len(classes) - 1})")
    return x, labels, unreadable


def stand_in_teacher(path, device):
    """The stand-in teacher (train_teacher.py's PhotoCNN) on device, frozen, and its class names (index = class id)."""
    return (load_teacher(f"cnn:{path}").to(device),
            torch.load(path, map_location="cpu", weights_only=True)["classes"])


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
    for name, lo, hi in (("num_images", 0, math.inf), ("batch_size", 1, math.inf), ("num_workers", 0, math.inf),
                         ("real_crops", 2, math.inf)):
        if not lo <= getattr(args, name) <= hi:
            p.error(f"--{name.replace('_', '-')} must be in [{lo}, {hi}], got {getattr(args, name)}")
    if args.reference and not args.samples:                           # FID needs both sets
        p.error("--reference needs --samples (generation mode)")
    inputs = ("samples", "reference") if args.reference else ("samples", "teacher", "tokenizer_ckpt", "data_path") \
        if args.samples else ("tokenizer_ckpt", "data_path")
    for name in inputs:                                               # before any work
        path = getattr(args, name)
        if not os.path.exists(path):
            p.error(f"--{name.replace('_', '-')} {path} does not exist" + (" (train one with train_tokenizer.py, or "
                    "pass a checkpoint)" if name == "tokenizer_ckpt" else ""))
        if name in ("samples", "reference") and os.path.isfile(path) and not path.endswith(".npz"):
            p.error(f"--{name} {path}: a file that is not an .npz; give an npz (arr_0: N x H x W x 3 uint8, what "
                    f"sample.py --out-npz writes) or a folder of images")
        try:                                                          # reads the npz header only, not the images
            npz_header(path) if name in ("samples", "reference") and path.endswith(".npz") else None
        except ValueError as e:
            p.error(f"--{name} {e}")
        if name in ("samples", "reference") and os.path.isdir(path) and not list_images(path):
            p.error(f"--{name} {path}: no images (extensions {', '.join(IMAGE_EXTS)})")
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
    try:
        tok = None if args.reference else load_tokenizer(args.tokenizer_ckpt, device)   # ours or official, eval mode
    except CheckpointError as e:
        parser.error(str(e))
    if args.reference:
        inputs = {"samples": args.samples, "reference": args.reference}
        try:   # no Inception weights (which file, where from), samples and reference of other sizes: exit 2
            metrics = evaluate_generation(args, device, rank, world)
        except (FileNotFoundError, ValueError) as e:
            parser.error(str(e))
    elif args.samples:                                                # small sets: rank 0 does it all
        inputs = {"samples": args.samples, "teacher": args.teacher, "real": args.data_path,
                  "tokenizer": args.tokenizer_ckpt}
        try:
            metrics = evaluate_with_teacher(args, tok, device) if rank == 0 else None
        except ValueError as e:
            parser.error(str(e))
    else:
        try:   # a folder without images: one line, exit 2
            dataset = ImageFolder(args.data_path, tok.cfg.image_shape, train=False, only=args.classes)   # ADM crop
        except FileNotFoundError as e:
            parser.error(str(e))
        inputs = {"checkpoint": args.tokenizer_ckpt, "data_path": args.data_path, "image_size": "%dx%d" % dataset.size}
        try:   # every image unreadable; LPIPS' or Inception's weights asked for and missing: exit 2
            metrics = evaluate_tokenizer(args, tok, dataset, device, rank, world)
        except (FileNotFoundError, ValueError) as e:
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
