"""Evaluate the FQGAN tokenizer and generated samples with the paper's metrics, and draw its Fig. 3 and Fig. 4.

Paper: "Factorized Visual Tokenization and Generation", Bai et al., arXiv 2411.16681.
  Sec. 4.1 "Metric"  tokenizers: rFID on ImageNet val, PSNR and Inception Score (Tab. 1, Tab. 3; we add SSIM, LPIPS);
                     generation: FID, IS, precision and recall under the ADM protocol (Tab. 2)
  Tab. 3             usage of each sub-codebook (we add its perplexity)
  Fig. 3             reconstruction from each sub-codebook alone, the other sub-codes zeroed
  Fig. 4             t-SNE of the codes of each sub-codebook for the images of a few classes
The protocol is the official script's (`../shared/reference/fqgan_tokenizer_spec.md` §4): center crop at the model's
resolution, encode -> codes -> decode, uint8 images, every metric against the cropped originals.

Tokenizer mode (no argument: the shipped tiny tokenizer on the bundled held-out photos); prints a table, writes JSON:
  python evaluate.py [--tokenizer-ckpt weights/tiny_tokenizer.pt] [--data-path data/photos/val] [--out-json F]
  python evaluate.py --no-metrics --fig3 runs/eval/fig3.png --fig4 runs/eval/fig4.png
  torchrun --nproc_per_node=8 evaluate.py --tokenizer-ckpt fqgan_dual_ds16.pt --data-path /data/imagenet/val --fid
Generation mode (samples: sample.py's npz or a folder; reference: an npz such as ADM's VIRTUAL_imagenet256_labeled.npz
or a folder, center-cropped to the samples' size):
  python evaluate.py --samples samples.npz --reference VIRTUAL_imagenet256_labeled.npz
Weights come from local files in $FQGAN_WEIGHTS (default torch.hub.get_dir()/checkpoints), never downloaded: the
Inception of torch-fidelity (FID, IS, precision / recall) and LPIPS' two files. In tokenizer mode a missing file makes
its metric null with a one-line note naming the file; --fid / --lpips make it an error instead.
Tests: python -m pytest tests/test_evaluate.py -q
"""
import argparse
import json
import math
import os
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Subset
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.utils import create_feature_extractor
from tqdm import tqdm

from losses import LPIPS, weights_dir
from quantizer import codebook_usage
from tokenizer import load_tokenizer
from sample import to_uint8
from train_tokenizer import BUNDLED, IMAGE_EXTS, ImageFolder, center_crop, save_png

ROOT = os.path.dirname(os.path.abspath(__file__))

# Inception features per metric, as ADM's evaluator: pool_3 (2048) for FID and precision / recall, logits for IS.
# NOTE(paper≠code): torch-fidelity's own precision / recall default is VGG16 fc2 (Kynkäänniemi et al.); the paper's
# Tab. 2 numbers come from ADM's evaluator, which uses the Inception pool features, so we pass those.
LAYERS = {"fid": "2048", "isc": "logits_unbiased", "prc": "2048"}
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]   # Fig. 4 class colours (tab10)


# --------------------------------------------------------------------------------------------------------------
# Metrics

def psnr(a, b):
    """PSNR (dB) per image of a, b (B, C, H, W) on [0, 1] -> (B,); identical images give 100 dB instead of inf."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp(min=1e-10))


def ssim(a, b, window=11, sigma=1.5, k1=0.01, k2=0.03, data_range=1.0):
    """SSIM (Wang et al. 2004) per image of a, b (B, C, H, W) on [0, data_range] -> (B,): Gaussian window 11x11 with
    sigma 1.5 at every valid position (no padding), C1 = (k1 L)^2, C2 = (k2 L)^2, mean over positions and channels;
    = skimage's structural_similarity(gaussian_weights=True, use_sample_covariance=False, data_range=1).

    NOTE(paper≠code): the official script (from LlamaGen) calls skimage on [0, 1] images with data_range=2 and the
    default 7x7 uniform window (spec §6.11): C1 and C2 come out 4x too large, which inflates SSIM. We use L = 1."""
    if min(a.shape[-2:]) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window} pixels, got {tuple(a.shape[-2:])}")
    a, b, c = a.double(), b.double(), a.shape[1]
    g = torch.exp(-(torch.arange(window, dtype=a.dtype, device=a.device) - window // 2) ** 2 / (2 * sigma**2))
    w = (torch.outer(g, g) / g.sum() ** 2).expand(c, 1, window, window)   # a normalised 2-D Gaussian per channel

    def blur(x):    # local weighted mean, depthwise: (B, C, H, W) -> (B, C, H - window + 1, W - window + 1)
        return F.conv2d(x, w, groups=c)
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean((1, 2, 3))


def load_inception(device, path=None):
    """torch-fidelity's Inception (the TF-Inception port that FID and ADM use) from a local file; never downloads."""
    path = path or os.path.join(weights_dir(), os.path.basename(URL_INCEPTION_V3))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights not found: {path} (download: {URL_INCEPTION_V3}); put the file "
                                "there ($FQGAN_WEIGHTS, default torch.hub.get_dir()/checkpoints) or pass "
                                "--inception-weights PATH")
    torch.load(path, map_location="cpu", weights_only=True)   # refuse pickled code: torch-fidelity unpickles it fully
    return create_feature_extractor("inception-v3-compat", sorted(set(LAYERS.values())), cuda=False,
                                    feature_extractor_weights_path=path, verbose=False).to(device)


def fidelity(feats, ref=None, prc=True):
    """From the Inception feature dicts of the evaluated images and of the reference: Inception Score, FID (Sec. 4.1)
    and precision / recall (Tab. 2; k = 3 neighbours as ADM), with torch-fidelity's own formulas."""
    isc = isc_features_to_metric(feats[LAYERS["isc"]], splits=min(10, len(feats[LAYERS["isc"]])))
    out = {"inception_score": isc["inception_score_mean"], "inception_score_std": isc["inception_score_std"]}
    if ref is not None:
        stats = [fid_features_to_statistics(f[LAYERS["fid"]]) for f in (feats, ref)]
        out["fid"] = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    if ref is not None and prc:     # batched k-NN balls (save_cpu_ram): never the whole N x N distance matrix
        pr = prc_features_to_metric(feats[LAYERS["prc"]], ref[LAYERS["prc"]], save_cpu_ram=True, verbose=False)
        out["precision"], out["recall"] = pr["precision"], pr["recall"]
    return out


def gather(local):
    """Concatenate a dict of lists of CPU tensors (one row per image) over all ranks, in rank order."""
    local = {k: torch.cat(v) for k, v in local.items()}
    if not dist.is_initialized():
        return local
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return {k: torch.cat([p[k] for p in parts if k in p]) for k in local}   # a rank may have had no batch


def optional(flag, build, what):
    """flag True: build() must succeed. None: build() if its weight files exist, else a one-line note and None."""
    try:
        return build() if flag is not False else None
    except FileNotFoundError as e:
        if flag:
            raise
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"note: {what} reported as null; " + " ".join(str(e).split()))


# --------------------------------------------------------------------------------------------------------------
# Tokenizer mode: Tab. 1 / Tab. 3 on a folder, sharded over the ranks

@torch.no_grad()
def evaluate_tokenizer(args, tok, dataset, device, rank, world):
    n = min(args.num_images or len(dataset), len(dataset))
    if n < world:
        raise ValueError(f"{n} images for {world} processes: every rank needs at least one")
    loader = DataLoader(Subset(dataset, range(rank, n, world)),       # strided shards: every image counted once
                        batch_size=args.batch_size, num_workers=args.num_workers)
    lpips = optional(args.lpips, lambda: LPIPS().to(device), "LPIPS")
    inception = optional(args.fid, lambda: load_inception(device, args.inception_weights), "rFID and IS")
    local = {}
    for x, _, _ in tqdm(loader, desc="reconstruct", disable=rank > 0, dynamic_ncols=True):
        x = x.to(device)
        codes = tok.encode(x)                                  # (B, k, h, w)
        rec, real = to_uint8(tok.decode_codes(codes)), to_uint8(x)   # decoded from the codebook rows, as official
        # every metric sees the uint8 images the official script writes as PNGs, mapped to [0, 1] (or [-1, 1])
        batch = {"codes": codes, "psnr": psnr(rec / 255, real / 255), "ssim": ssim(rec / 255, real / 255)}
        if lpips is not None:
            batch["lpips"] = lpips(rec / 127.5 - 1, real / 127.5 - 1)
        if inception is not None:   # features of the reconstructions (rFID, IS) and of the originals (rFID)
            for name, images in (("rec", rec), ("real", real)):
                batch.update({f"{name}/{k}": v for k, v in inception.convert_features_tuple_to_dict(
                    inception(images)).items()})
        for k, v in batch.items():
            local.setdefault(k, []).append(v.cpu())
    stats = gather({k: v for k, v in local.items() if k != "codes"})
    res = {"images": n, "psnr": stats["psnr"].mean().item(), "ssim": stats["ssim"].mean().item(),
           "lpips": stats["lpips"].mean().item() if lpips is not None else None,
           "rfid": None, "inception_score": None, "inception_score_std": None}
    if inception is not None:
        feats = [{k.split("/", 1)[1]: v for k, v in stats.items() if k.startswith(p)} for p in ("rec/", "real/")]
        metrics = fidelity(*feats, prc=False)
        res.update(rfid=metrics.pop("fid"), **metrics)
    codes = torch.cat(local["codes"]).to(device)              # (n_local, k, h, w); NCCL all-reduces CUDA tensors only
    for i in range(tok.cfg.num_codebooks):   # Tab. 3 usage (+ perplexity) over the whole set; all ranks all-reduce
        u = codebook_usage(codes[:, i], tok.cfg.codebook_size)
        res[f"usage/{i}"], res[f"perplexity/{i}"] = u["usage"].item(), u["perplexity"].item()
    return res


# --------------------------------------------------------------------------------------------------------------
# Generation mode: Tab. 2 of samples against a reference

def image_batches(path, batch_size, size=None):
    """uint8 (B, 3, H, W) batches from an npz (arr_0: N x H x W x 3 uint8, the ADM layout sample.py writes; streamed
    from the zip, never loaded whole) or a folder of images at any depth (center crop to `size`, default the first
    image's size)."""
    if path.endswith(".npz"):
        with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = getattr(np.lib.format, f"read_array_header_{version[0]}_0")(f)
            if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran:
                raise ValueError(f"{path}: arr_0 must be uint8 N x H x W x 3 (ADM layout), got {dtype} {shape}")
            if size is not None and tuple(shape[1:3]) != tuple(size):
                raise ValueError(f"{path}: images are {shape[1]}x{shape[2]}, the samples {size[0]}x{size[1]}")
            for start in range(0, shape[0], batch_size):
                m = min(batch_size, shape[0] - start)
                arr = np.frombuffer(f.read(m * shape[1] * shape[2] * 3), np.uint8).reshape(m, *shape[1:])
                yield torch.from_numpy(arr.copy()).permute(0, 3, 1, 2)     # (B, H, W, 3) -> (B, 3, H, W)
        return
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise FileNotFoundError(f"no images in {path} (extensions {', '.join(IMAGE_EXTS)})")
    for start in range(0, len(files), batch_size):
        batch = []
        for file in files[start:start + batch_size]:
            with Image.open(file) as img:
                img = img.convert("RGB")
            size = size or (img.size[1], img.size[0])
            batch.append(torch.from_numpy(np.array(center_crop(img, size))).permute(2, 0, 1))   # -> (3, H, W)
        yield torch.stack(batch)


@torch.no_grad()
def evaluate_generation(args, device, rank, world):
    inception = load_inception(device, args.inception_weights)
    size = tuple(next(image_batches(args.samples, 1)).shape[-2:])   # the reference is cropped to the samples' size

    def features(path):     # every rank reads every batch (cheap) and embeds its own share
        local = {}
        for i, x in enumerate(tqdm(image_batches(path, args.batch_size, size), desc=os.path.basename(path),
                                   disable=rank > 0, dynamic_ncols=True)):
            if i % world == rank:
                for k, v in inception.convert_features_tuple_to_dict(inception(x.to(device))).items():
                    local.setdefault(k, []).append(v.cpu())
        return gather(local)
    feats, ref = features(args.samples), features(args.reference)
    return {"images": len(feats[LAYERS["fid"]]), "reference_images": len(ref[LAYERS["fid"]]), **fidelity(feats, ref)}


# --------------------------------------------------------------------------------------------------------------
# Figures (PNG, written atomically)

def write_figure(img, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_png(img, path)
    print(f"wrote {path}")


@torch.no_grad()
def figure3(tok, x, path, header=20):
    """Fig. 3: one row per image: original | reconstruction | from each sub-codebook alone (the others zeroed)."""
    codes = tok.encode(x)
    cols = [x, tok.decode_codes(codes)] + [tok.decode_codes(codes, keep=[i]) for i in range(tok.cfg.num_codebooks)]
    titles = ["original", "reconstruction"] + [f"only {i + 1} ({b})" for i, b in enumerate(tok.cfg.branch_names)]
    s = max(1, 128 // max(x.shape[-2:]))                      # small images are enlarged so that the titles fit
    grid = torch.stack([to_uint8(c) for c in cols], 1).repeat_interleave(s, -1).repeat_interleave(s, -2)
    n, c, _, h, w = grid.shape                                # (n, c, 3, h, w) -> (n*h, c*w, 3)
    img = Image.new("RGB", (c * w, header + n * h), "white")
    img.paste(Image.fromarray(grid.permute(0, 3, 1, 4, 2).reshape(n * h, c * w, 3).cpu().numpy()), (0, header))
    for j, title in enumerate(titles):
        ImageDraw.Draw(img).text((j * w + 4, 4), title, fill="black")
    write_figure(img, path)


def pca(x, dims=2):
    """x (N, d) projected on its top `dims` principal axes -> (N, dims)."""
    x = x - x.mean(0)
    return x @ torch.linalg.svd(x, full_matrices=False).Vh[:dims].T


def tsne(x, perplexity=30.0, steps=750):
    """Exact t-SNE (van der Maaten & Hinton 2008) of x (N, d) -> (N, 2), the embedding of the paper's Fig. 4: Gaussian
    affinities with a per-point bandwidth bisected to the perplexity, a Student-t kernel, gradient descent on
    KL(P || Q) with momentum, gains and early exaggeration 12 for 250 steps, PCA start. O(N^2): ~5 s for 1000 points."""
    x, n = x.float(), len(x)
    d2 = torch.cdist(x, x).pow(2)
    d2, eye = d2 / d2.mean().clamp(min=1e-12), torch.eye(n, dtype=torch.bool, device=x.device)
    lo, hi = torch.full_like(d2[:, :1], -20.0), torch.full_like(d2[:, :1], 20.0)
    for _ in range(64):                                       # bisection on log(beta), beta = 1 / (2 sigma_i^2)
        mid = (lo + hi) / 2
        p = torch.softmax((-d2 * mid.exp()).masked_fill(eye, -math.inf), 1)
        wide = torch.special.entr(p).sum(1, keepdim=True) > math.log(min(perplexity, (n - 1) / 3))
        lo, hi = torch.where(wide, mid, lo), torch.where(wide, hi, mid)
    p = (p + p.T) / (2 * n)                                   # symmetric joint affinities
    y = pca(x)
    y = y / y[:, 0].std().clamp(min=1e-12) * 1e-4
    v, gains, lr = torch.zeros_like(y), torch.ones_like(y), max(n / 48, 50.0)
    for step in range(steps):
        sq = y.pow(2).sum(1)                                  # Student-t kernel 1 / (1 + |y_i - y_j|^2); Q = num / sum
        num = torch.addmm(sq[:, None] + sq + 1, y, y.T, alpha=-2).reciprocal().masked_fill(eye, 0)
        m = ((12.0 if step < 250 else 1.0) * p - num / num.sum()) * num
        grad = 4 * (m.sum(1, keepdim=True) * y - m @ y)       # dKL/dy_i = 4 sum_j m_ij (y_i - y_j)
        gains = torch.where((grad > 0) != (v > 0), gains + 0.2, gains * 0.8).clamp(min=0.01)
        v = (0.5 if step < 250 else 0.8) * v - lr * gains * grad
        y = y + v
    return y


@torch.no_grad()
def figure4(tok, dataset, path, n_classes, method, batch_size, max_points=1000, panel=320, header=20, legend=24):
    """Fig. 4: the codebook vector of each token of the images of n_classes classes (evenly spaced in the class list,
    <= 50 images each, max_points tokens at random) in 2-D, one panel per sub-codebook, coloured by class."""
    classes = torch.linspace(0, len(dataset.classes) - 1, n_classes).round().long().unique().tolist()
    idx = [i for c in classes for i in [j for j, (_, y) in enumerate(dataset.samples) if y == c][:50]]
    device = next(tok.parameters()).device
    codes = torch.cat([tok.encode(torch.stack([dataset[i][0] for i in idx[s:s + batch_size]]).to(device))
                       for s in range(0, len(idx), batch_size)])                    # (N, k, h, w)
    labels = torch.tensor([classes.index(dataset.samples[i][1]) for i in idx]).repeat_interleave(codes[0, 0].numel())
    keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:max_points]
    img = Image.new("RGB", (tok.cfg.num_codebooks * panel, header + panel + legend), "white")
    draw = ImageDraw.Draw(img)
    for i, branch in enumerate(tok.branches):
        z = branch.quantize.codebook()[codes[:, i]].flatten(0, 2)[keep.to(device)]   # (N, h, w, d) -> (max_points, d)
        y = (tsne(z) if method == "tsne" else pca(z)).cpu()
        y = (y - y.min(0).values) / (y.max(0).values - y.min(0).values).clamp(min=1e-12) * (panel - 20) + 10
        draw.text((i * panel + 6, 4), f"sub-codebook {i + 1} ({tok.cfg.branch_names[i]})", fill="black")
        draw.rectangle([i * panel, header, (i + 1) * panel - 1, header + panel - 1], outline=(200, 200, 200))
        for (u, w), c in zip(y.tolist(), labels[keep].tolist()):
            draw.ellipse([i * panel + u - 2, header + w - 2, i * panel + u + 2, header + w + 2], fill=PALETTE[c])
    x0 = 6
    for c, name in enumerate(dataset.classes[j] for j in classes):     # legend: a coloured square per class
        draw.rectangle([x0, header + panel + 7, x0 + 10, header + panel + 17], fill=PALETTE[c])
        draw.text((x0 + 14, header + panel + 6), name, fill="black")
        x0 += 24 + int(draw.textlength(name))
    write_figure(img, path)


# --------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # tokenizer mode (Tab. 1, Tab. 3, Fig. 3, Fig. 4)
    p.add_argument("--tokenizer-ckpt", default=os.path.join(ROOT, "weights", "tiny_tokenizer.pt"),
                   help="our checkpoint or an official FQGAN one (default: the shipped weights/tiny_tokenizer.pt)")
    p.add_argument("--data-path", default=os.path.join(BUNDLED, "val"), help="ImageFolder root (ImageNet val layout "
                   "root/<class>/<image>), center-cropped at the model's resolution (default: data/photos/val)")
    p.add_argument("--num-images", type=int, default=0, help="evaluate the first N images only (default 0: all)")
    p.add_argument("--metrics", action=argparse.BooleanOptionalAction, default=True, help="--no-metrics: figures only")
    p.add_argument("--lpips", action=argparse.BooleanOptionalAction, default=None, help="LPIPS (default: if its "
                   "weights are in $FQGAN_WEIGHTS, else null and a note; --lpips: missing weights are an error)")
    p.add_argument("--fid", action=argparse.BooleanOptionalAction, default=None, help="rFID and IS (default: if the "
                   "Inception weights exist, else null and a note; --fid: missing weights are an error)")
    p.add_argument("--fig3", default=None, help="write Fig. 3 (original | full | each sub-codebook alone) to this PNG")
    p.add_argument("--fig3-images", type=int, default=4, help="rows of Fig. 3, images spread over the data set")
    p.add_argument("--fig4", default=None, help="write Fig. 4 (2-D embedding of each sub-codebook's codes) to this PNG")
    p.add_argument("--fig4-classes", type=int, default=4, help="classes in Fig. 4 (the paper: 4)")
    p.add_argument("--fig4-method", default="tsne", choices=["tsne", "pca"], help="2-D embedding (the paper: t-SNE)")
    # generation mode (Tab. 2)
    p.add_argument("--samples", default=None, help="generated images, npz (arr_0: N x H x W x 3 uint8) or folder; "
                   "switches to generation mode")
    p.add_argument("--reference", default=None, help="reference images, npz or folder")
    # both modes
    p.add_argument("--inception-weights", default=None, help="torch-fidelity Inception file (default: "
                   f"$FQGAN_WEIGHTS/{os.path.basename(URL_INCEPTION_V3)})")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch and process")
    p.add_argument("--num-workers", type=int, default=2, help="data loader workers per process (tokenizer mode)")
    p.add_argument("--out-json", default=None, help="results file (default: runs/eval/{tokenizer,generation}.json)")
    args = p.parse_args(argv)
    for name, lo, hi in (("num_images", 0, math.inf), ("batch_size", 1, math.inf), ("num_workers", 0, math.inf),
                         ("fig3_images", 1, 64), ("fig4_classes", 1, len(PALETTE))):
        if not lo <= getattr(args, name) <= hi:
            p.error(f"--{name.replace('_', '-')} must be in [{lo}, {hi}], got {getattr(args, name)}")
    if (args.samples is None) != (args.reference is None):
        p.error("--samples and --reference go together (generation mode)")
    if args.samples and (args.fig3 or args.fig4):
        p.error("--fig3 / --fig4 need a tokenizer (tokenizer mode, without --samples)")
    for name in ("samples", "reference") if args.samples else ("tokenizer_ckpt", "data_path"):
        if not os.path.exists(getattr(args, name)):
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} does not exist" + (" (train one with "
                    "train_tokenizer.py, or pass a checkpoint)" if name == "tokenizer_ckpt" else ""))
    return args


def main(argv=None):
    args = parse_args(argv)
    cuda, ddp = torch.cuda.is_available(), "RANK" in os.environ           # torchrun: shard the images over ranks
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # as the official eval
    if args.samples:
        res = {"samples": args.samples, "reference": args.reference, **evaluate_generation(args, device, rank, world)}
    else:
        tok = load_tokenizer(args.tokenizer_ckpt).to(device)
        dataset = ImageFolder(args.data_path, tuple(g * tok.cfg.downsample for g in tok.cfg.grid), train=False)
        res = {"checkpoint": args.tokenizer_ckpt, "data_path": args.data_path, "image_size": "x".join(map(
            str, dataset.size)), **evaluate_tokenizer(args, tok, dataset, device, rank, world)} if args.metrics else {}
        if rank == 0 and args.fig3:
            idx = torch.linspace(0, len(dataset) - 1, min(args.fig3_images, len(dataset))).round().long().tolist()
            figure3(tok, torch.stack([dataset[i][0] for i in idx]).to(device), args.fig3)
        if rank == 0 and args.fig4:
            figure4(tok, dataset, args.fig4, args.fig4_classes, args.fig4_method, args.batch_size)
    if rank == 0 and res:
        for key, value in res.items():                        # the table: one line per metric, null when missing
            print(f"{key:<22}{'null' if value is None else f'{value:.4f}' if isinstance(value, float) else value}")
        out = args.out_json or os.path.join("runs", "eval", "generation.json" if args.samples else "tokenizer.json")
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(f"{out}.tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(f"{out}.tmp", out)                         # atomic: a crash never leaves half a file
        print(f"wrote {out}")
    if ddp:
        dist.destroy_process_group()
    return res


if __name__ == "__main__":
    main()
