"""metrics.py, the formulas: PSNR and SSIM against hand computations and a loop over windows, the Frechet distance
against its formula, FID / precision / recall refusing too few images, the class probe against a leave-one-out loop.
(FID with a random Inception, and every metric as evaluate.py runs it over images: tests/test_evaluate.py.)
Run: python -m pytest tests/test_metrics.py -q
"""
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import metrics  # noqa: E402


def test_psnr_hand_values():
    a = torch.zeros(3, 3, 8, 8)
    b = torch.stack([torch.full((3, 8, 8), v) for v in (0.1, 0.01, 0.0)])
    assert torch.allclose(metrics.psnr(b, a), torch.tensor([20.0, 40.0, 100.0], dtype=torch.float64))


def test_ssim_of_constant_images_is_the_luminance_term():
    # sigma = cov = 0: SSIM = (2ab + C1) / (a^2 + b^2 + C1) * C2 / C2
    a, b = torch.full((1, 3, 16, 16), 0.2), torch.full((1, 3, 16, 16), 0.7)
    c1 = 0.01**2
    assert math.isclose(metrics.ssim(a, b).item(), (2 * 0.2 * 0.7 + c1) / (0.2**2 + 0.7**2 + c1), rel_tol=1e-6)
    assert math.isclose(metrics.ssim(a, a).item(), 1.0, rel_tol=1e-12)


def test_ssim_equals_a_loop_over_windows():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 2, 14, 13, generator=g)
    b = (a + 0.2 * torch.randn(2, 2, 14, 13, generator=g)).clamp(0, 1)
    k = np.exp(-(np.arange(11) - 5) ** 2 / (2 * 1.5**2))
    w = np.outer(k, k) / np.outer(k, k).sum()
    c1, c2 = 0.01**2, 0.03**2
    expected = np.zeros(2)
    for n in range(2):
        values = []
        for c in range(2):
            for i in range(14 - 10):
                for j in range(13 - 10):
                    x, y = a[n, c, i:i + 11, j:j + 11].double().numpy(), b[n, c, i:i + 11, j:j + 11].double().numpy()
                    mx, my = (w * x).sum(), (w * y).sum()
                    vx, vy, cxy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum(), (w * (x - mx) * (y - my)).sum()
                    values.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
        expected[n] = np.mean(values)
    got = metrics.ssim(a, b).numpy()
    assert np.allclose(got, expected, atol=1e-10) and (got < 0.99).all()
    # the official data_range=2 on [0, 1] images (official_code.md §4.2) inflates the score
    assert (metrics.ssim(a, b, data_range=2.0).numpy() > got).all()
    with pytest.raises(ValueError, match=r"SSIM needs images of at least 11x11 pixels, got \(14, 10\)"):
        metrics.ssim(a[..., :10], b[..., :10])                 # no valid window position: an error, not a NaN


def test_fid_and_precision_recall_refuse_too_few_images():
    """A covariance needs 2 images and k = 3 neighbour balls 4: fewer is one line naming the counts (torch-fidelity
    says 'Array must not contain infs or NaNs' / 'kthvalue(): selected number k out of range')."""
    feats = lambda n: {v: torch.randn(n, 16) for v in metrics.LAYERS.values()}
    with pytest.raises(ValueError, match="FID and precision / recall need 4 or more images in each set, got 3 and 9"):
        metrics.fidelity(feats(3), feats(9))
    with pytest.raises(ValueError, match="rFID needs 2 or more images in each set, got 1 and 1"):
        metrics.fidelity(feats(1), feats(1), prc=False)
    assert set(metrics.fidelity(feats(4), feats(4))) >= {"fid", "precision", "recall"}


def test_frechet_equals_the_formula_through_symmetric_square_roots():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 6, generator=g), torch.randn(300, 6, generator=g) @ torch.randn(6, 6, generator=g) + 1
    def sqrtm(m):                                               # symmetric PSD square root by eigendecomposition
        w, v = torch.linalg.eigh(m)
        return v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    s1, s2 = torch.cov(a.double().T), torch.cov(b.double().T)
    expected = (a.double().mean(0) - b.double().mean(0)).pow(2).sum() + torch.trace(s1 + s2 - 2 * sqrtm(
        sqrtm(s1) @ s2 @ sqrtm(s1)))                          # |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^.5 S2 S1^.5)^.5)
    assert math.isclose(metrics.frechet(a, b), expected.item(), rel_tol=1e-6)
    assert abs(metrics.frechet(a, a)) < 1e-6


def test_class_probe_equals_a_leave_one_out_loop():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3])                  # class 3 has one image: left out
    features = torch.randn(9, 5, generator=g) + 2 * F.one_hot(labels, 5).float()
    hits = []
    for n in range(9):
        others = [m for m in range(9) if m != n and labels[m] == labels[n]]
        if not others:
            continue
        scores = {}
        for c in labels.unique().tolist():
            members = [m for m in range(9) if m != n and labels[m] == c]
            if members:
                centroid = torch.stack([F.normalize(features[m], dim=0) for m in members]).sum(0)
                scores[c] = F.cosine_similarity(centroid, features[n], dim=0).item()
        hits.append(max(scores, key=scores.get) == labels[n].item())
    assert len(hits) == 8 and metrics.class_probe(features, labels) == pytest.approx(sum(hits) / len(hits))
    assert metrics.class_probe(F.one_hot(labels, 5).float(), labels) == 1.0   # separable classes: every hit
    assert metrics.class_probe(features[[0, 3, 5]], labels[[0, 3, 5]]) is None   # one image per class: no probe
