"""The paper's metrics as formulas: what evaluate.py (and ablate.py's tables) compute, given images or features.

Paper: "Factorized Visual Tokenization and Generation", Bai et al., arXiv 2411.16681, Sec. 4.1 "Metric".
  psnr, ssim        reconstruction quality (Tab. 1, Tab. 3; SSIM is ours), per image on [0, 1]
  load_inception    torch-fidelity's TF-Inception port from a local file (never downloaded)
  fidelity          IS, FID, precision / recall (Tab. 2, ADM's protocol) from Inception features; frechet: FID's formula
  class_probe       Fig. 4 as one number: how well a sub-codebook's codes tell the classes apart
  teacher_metrics   the stand-in teacher's accuracy and Frechet distance (evaluate.py's generation mode offline)
Nothing here reads files of images or runs a model over a data set: evaluate.py does, and calls these. Codebook usage
and perplexity (Tab. 3) are quantizer.codebook_usage.
"""
import math
import os

import torch
import torch.nn.functional as F

from losses import read_weights, weights_dir

# Inception features per metric, as ADM's evaluator (the paper's Tab. 2): pool_3 (2048) for FID and precision /
# recall, logits for IS. NOTE(paper≠code): torch-fidelity's own precision / recall default is VGG16 fc2.
LAYERS = {"fid": "2048", "isc": "logits_unbiased", "prc": "2048"}     # torch-fidelity's feature names
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"   # the file name of torch-fidelity's URL_INCEPTION_V3


# --------------------------------------------------------------------------------------------------------------
# Reconstruction (Tab. 1, Tab. 3)

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


# --------------------------------------------------------------------------------------------------------------
# Inception: IS, FID, precision / recall (Sec. 4.1, Tab. 2)

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


def frechet(a, b):
    """The FID formula (Heusel et al. 2017) on any features a (N, d), b (M, d): torch-fidelity's implementation."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    stats = [fid_features_to_statistics(f.double().cpu()) for f in (a, b)]   # (mean, covariance) of each set
    return fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]


# --------------------------------------------------------------------------------------------------------------
# Without Inception: the class probe (Fig. 4) and the stand-in teacher

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


@torch.no_grad()
def teacher_metrics(teacher, x, labels, reference, batch=256):
    """acc (top-1 of the teacher on uint8 images x (N, 3, H, W) against labels (N,)) and fd (Frechet distance of
    their pooled features to the features `reference` (M, width)); returns (acc, fd, features)."""
    feats = torch.cat([teacher(x[i:i + batch].float() / 127.5 - 1) for i in range(0, len(x), batch)])   # (N, width)
    acc = (teacher.net.classifier(feats).argmax(1) == labels).double().mean().item()   # PhotoCNN's own classifier
    return acc, None if reference is None else frechet(feats, reference), feats
