"""Tests of losses.py (LPIPS, PatchGAN + hinge, representation loss, Eq. (8)), teachers.py and of the bundled photo set.

CPU only, no downloads: LPIPS and the teachers use random weights of the real architectures.
Run: python -m pytest tests/test_losses.py -q
"""
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import losses  # noqa: E402
import teachers  # noqa: E402

PHOTOS = os.path.join(ROOT, "data", "photos")


class PassThroughDisc(nn.Module):
    """A 'discriminator' whose logits are channel 0 of its input (times a unit weight), so hinge values can be
    computed by hand."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.scale * x[:, :1]


# --------------------------------------------------------------------------------------------------------------
# PatchGAN and hinge losses

def test_hinge_losses_match_hand_computation():
    real = torch.tensor([2.0, 0.5, -1.0, 1.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    fake = torch.tensor([-2.0, 0.0, 0.5, -0.5]).view(1, 1, 2, 2).expand(1, 3, 2, 2).clone().requires_grad_()
    # relu(1 - real) = [0, .5, 2, 0] -> .625 ; relu(1 + fake) = [0, 1, 1.5, .5] -> .75 ; hinge = (.625 + .75) / 2
    d = losses.discriminator_loss(real, fake, step=10**6, disc=PassThroughDisc())
    assert d["hinge"].item() == pytest.approx(0.6875)
    assert d["total"].item() == pytest.approx(0.5 * 0.6875)           # disc weight 0.5 after the start
    disc = PassThroughDisc()
    losses.discriminator_loss(real, fake, 10**6, disc)["total"].backward()
    assert fake.grad is None and disc.scale.grad is not None          # D trains; x_rec is detached
    aux = {"z_q": [], "losses": {}, "features": {}}
    g = losses.generator_loss(real, fake, aux, 10**6, disc=PassThroughDisc())
    assert g["gan"].item() == pytest.approx(-(-2.0 + 0.0 + 0.5 - 0.5) / 4)   # L_G = -mean D(x_rec)


def test_gan_weight_switches_on_at_official_step():
    cfg = losses.LossConfig()
    assert losses.adversarial_weight(cfg.gan_start - 2, cfg) == 0.0     # official t = train_steps + 1 = 19999
    assert losses.adversarial_weight(cfg.gan_start - 1, cfg) == 0.5     # t = 20000: on
    x = torch.rand(1, 3, 4, 4) * 2 - 1
    before = losses.discriminator_loss(x, -x, cfg.gan_start - 2, PassThroughDisc())
    after = losses.discriminator_loss(x, -x, cfg.gan_start - 1, PassThroughDisc())
    assert before["total"].item() == 0.0 and before["hinge"].item() > 0
    assert after["total"].item() == pytest.approx(0.5 * after["hinge"].item())


def test_patchgan_matches_official_size_and_init():
    disc = losses.PatchGAN()
    assert sum(p.numel() for p in disc.parameters()) == 2_765_633      # official_code.md §2.3
    assert disc(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)   # 30x30 logits for 256 px
    w = disc.main[0].weight
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    bn = [m for m in disc.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bn) == 3 and all(torch.all(m.bias == 0) for m in bn)


# --------------------------------------------------------------------------------------------------------------
# LPIPS with random weights saved in the official file formats (conftest's lpips_files)

@pytest.fixture(scope="module")
def lpips(lpips_files):
    folder = lpips_files[0]
    return losses.LPIPS(folder / "vgg16-397923af.pth", folder / "weights-vgg16-lpips.pth")


def test_lpips_loads_weight_files_from_the_default_folder(lpips_files, monkeypatch):
    folder, sd, lins = lpips_files
    monkeypatch.setenv("FQGAN_WEIGHTS", str(folder))
    model = losses.LPIPS()                                              # no paths: $FQGAN_WEIGHTS/<file names>
    assert torch.equal(model.net[28].weight, sd["features.28.weight"])  # relu5_3's conv
    assert torch.equal(model.lins[3].weight, lins["lin3.model.1.weight"])


def test_lpips_missing_files_error_names_files_urls_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FQGAN_WEIGHTS", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        losses.LPIPS()
    msg = str(e.value)
    for text in (str(tmp_path / "vgg16-397923af.pth"), losses.VGG_URL,
                 str(tmp_path / "weights-vgg16-lpips.pth"), losses.LIN_URL, "$FQGAN_WEIGHTS"):
        assert text in msg


def test_lpips_is_zero_on_equal_images_positive_otherwise(lpips):
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.all(lpips(x, x) == 0)
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    d = lpips(x, y)
    assert d.shape == (2,) and torch.all(d > 0)
    assert torch.allclose(d[1], lpips(x[1:], y[1:])[0], atol=1e-6)       # per image, independent of the batch


def test_lpips_gradient_reaches_input_never_params(lpips):
    lpips.train()                                                       # must stay in eval (no dropout)
    assert not lpips.training and not any(p.requires_grad for p in lpips.parameters())
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    y = (torch.rand(1, 3, 64, 64) * 2 - 1).requires_grad_()
    lpips(x, y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips.parameters())


# --------------------------------------------------------------------------------------------------------------
# Representation learning (Sec. 3.2.2)

def test_info_nce_matches_hand_computation():
    s = torch.tensor([[1.0, 0.0], [3.0, 0.0]])                          # both students point along e1
    t = torch.tensor([[2.0, 0.0], [0.0, 5.0]])                          # teachers e1, e2 (norms must not matter)
    # logits = [[1, 0], [1, 0]]: row 0 -log(e/(e+1)), row 1 -log(1/(e+1)); rows only, temperature 1
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.e)) / 2
    assert losses.info_nce(s, t).item() == pytest.approx(expected, rel=1e-6)
    assert expected != pytest.approx(math.log(2))                        # the column-wise version would give log 2
    assert losses.info_nce(s[:1], t[:1]).item() == 0.0                   # batch of 1: no negatives, loss 0


@pytest.fixture(scope="module")
def real_teachers():
    # Real classes, random weights: a DINOv2-S (timm) and a CLIP ViT-B/32 (open_clip, smaller than L/14).
    specs = (None, "timm:vit_small_patch14_dinov2.lvd142m", "openclip:ViT-B-32:openai")
    torch.manual_seed(0)
    return teachers.build_teachers(specs, pretrained=False)


def test_teachers_are_frozen_with_official_widths(real_teachers):
    assert sorted(real_teachers) == [1, 2]
    dino, clip = real_teachers[1], real_teachers[2]
    assert dino.width == 384 and clip.width == 768
    for t in (dino, clip):
        t.train()
        assert not t.training and not any(p.requires_grad for p in t.parameters())
    # CLIP: CLS of the last block before ln_post and without projection (official_code.md §2.5)
    assert isinstance(clip.net.ln_post, nn.Identity) and clip.net.proj is None
    assert len(clip.net.transformer.resblocks) == 12                    # no block pruned away
    x = torch.rand(1, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        blocks_out = clip.net.transformer(clip.net._embeds(clip.preprocess(x)))   # (1, 1 + 7*7, 768)
    assert torch.equal(clip(x), blocks_out[:, 0])
    # the 'openai' tag was trained with QuickGELU; open_clip's plain ViT-B-32 config would build nn.GELU
    assert type(clip.net.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


def test_teacher_preprocessing_resizes_and_normalises(real_teachers):
    x = torch.zeros(2, 3, 256, 256)                                      # mid-grey in [-1, 1] -> 0.5 in [0, 1]
    for t, mean, std in ((real_teachers[1], (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                         (real_teachers[2], (0.48145466, 0.4578275, 0.40821073),
                          (0.26862954, 0.26130258, 0.27577711))):
        y = t.preprocess(x)
        assert y.shape == (2, 3, 224, 224) and t.image_size == (224, 224)
        want = (0.5 - torch.tensor(mean)) / torch.tensor(std)
        assert torch.allclose(y[0, :, 100, 100], want)
    z, dino = torch.rand(1, 3, 64, 64) * 2 - 1, real_teachers[1]        # nearest resize, as the official code
    want = (F.interpolate(z * 0.5 + 0.5, size=(224, 224), mode="nearest") - dino.mean) / dino.std
    assert torch.equal(dino.preprocess(z), want)


def test_representation_loss_grads_reach_student_only(real_teachers):
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    features = {1: torch.randn(2, 17, 384, requires_grad=True),           # simulated feature heads (B, 1+h*w, W)
                2: torch.randn(2, 17, 768, requires_grad=True)}
    out = losses.representation_loss(features, real_teachers, x)
    assert out["rep"].item() == pytest.approx(out["rep/1"].item() + out["rep/2"].item())   # summed over branches
    out["rep"].backward()
    for f in features.values():
        assert f.grad[:, 0].abs().sum() > 0 and torch.all(f.grad[:, 1:] == 0)   # only token 0 is supervised
    assert all(p.grad is None for t in real_teachers.values() for p in t.parameters())
    with pytest.raises(AssertionError, match="head width"):
        losses.representation_loss({1: torch.randn(2, 17, 100), 2: features[2]}, real_teachers, x)


def test_teacher_weights_load_from_local_file_and_fail_clearly(tmp_path, monkeypatch):
    import timm
    spec = "timm:vit_small_patch14_dinov2.lvd142m"
    torch.manual_seed(1)
    ref = timm.create_model(spec[5:], pretrained=False, num_classes=0, img_size=224)
    torch.save(ref.state_dict(), tmp_path / "dino.pth")
    t = teachers.load_teacher(spec, weights_path=str(tmp_path / "dino.pth"))
    assert torch.equal(t.net.cls_token, ref.cls_token) and torch.equal(t.net.norm.weight, ref.norm.weight)
    monkeypatch.setenv("FQGAN_WEIGHTS", str(tmp_path))
    hf = "https://huggingface.co/timm/"
    for spec, url in ((spec, hf + "vit_small_patch14_dinov2.lvd142m/resolve/main/model.safetensors"),
                      ("openclip:ViT-L-14:openai",
                       hf + "vit_large_patch14_clip_224.openai/resolve/main/open_clip_model.safetensors")):
        with pytest.raises(FileNotFoundError) as e:
            teachers.build_teachers([None, spec], weights_paths={1: str(tmp_path / "missing.safetensors")})
        msg = str(e.value)
        assert url in msg and str(tmp_path / (spec.replace(":", "-") + ".safetensors")) in msg
        assert "weights_paths" in msg and str(tmp_path / "missing.safetensors") in msg
    (tmp_path / "cut.safetensors").write_bytes(open(tmp_path / "dino.pth", "rb").read()[:4096])   # cut downloads
    (tmp_path / "cut.bin").write_bytes(open(tmp_path / "dino.pth", "rb").read()[:4096])
    for spec in ("timm:vit_small_patch14_dinov2.lvd142m", "openclip:ViT-B-32:openai"):
        for name in ("cut.safetensors", "cut.bin"):
            with pytest.raises(FileNotFoundError, match="not found or not loadable") as e:
                teachers.load_teacher(spec, weights_path=str(tmp_path / name))
            assert "Error" in str(e.value).rsplit("(", 1)[1]            # the cause: SafetensorError, UnpicklingError


# --------------------------------------------------------------------------------------------------------------
# Eq. (8) with a fake tokenizer output

class StubTeacher(teachers.Teacher):
    """A cheap Teacher: its 'CLS feature' is the flattened 4x4 resized image (width 48)."""

    def __init__(self):
        super().__init__(nn.Flatten(), 48, (4, 4), (0.5,) * 3, (0.5,) * 3, lambda net, x: net(x))


def fake_aux(k, B=4, teachers=(1,)):
    g = torch.Generator().manual_seed(k)
    terms = {f"{n}/{i}": torch.rand((), generator=g, requires_grad=True)
             for i in range(k) for n in ("codebook", "commit", "entropy")}
    z_q = [torch.randn(B, 8, 2, 2, generator=g, requires_grad=True) for _ in range(k)]   # Eq. (7) compares these
    features = {i: torch.randn(B, 5, 48, generator=g, requires_grad=True) for i in teachers}
    return {"codes": torch.zeros(B, k, 2, 2, dtype=torch.long), "z_q": z_q, "losses": terms, "features": features}


@pytest.mark.parametrize("step", [0, 19999])
def test_generator_loss_total_is_eq8(lpips, step):
    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    x_rec = (x + 0.1 * torch.randn_like(x)).requires_grad_()
    aux = fake_aux(3, B=3, teachers=(1, 2))
    stubs = {1: StubTeacher(), 2: StubTeacher()}
    g = losses.generator_loss(x, x_rec, aux, step, lpips=lpips, disc=losses.PatchGAN(), teachers=stubs)
    quant = sum(aux["losses"].values())
    lam_g = 0.5 if step == 19999 else 0.0
    # Eq. (8) with the official weights; triple: λ_rep NCE_mid + λ_rep NCE_high, λ_rep = 0.5 each
    want = (g["rec"] + 1.0 * g["perceptual"] + lam_g * g["gan"] + quant + 0.1 * losses.disentangle_loss(aux["z_q"])
            + 0.5 * g["rep/1"] + 0.5 * g["rep/2"])
    assert g["total"].item() == pytest.approx(want.item(), rel=1e-6)
    assert g["rec"].item() == pytest.approx(F.mse_loss(x_rec, x).item())
    assert g["gan_weight"].item() == lam_g
    g["total"].backward()
    assert x_rec.grad is not None and all(v.grad is not None for v in [*aux["losses"].values(), *aux["z_q"]])


def test_triple_representation_weighting_is_the_official_sum():
    """Two supervised branches with InfoNCE values known in closed form: the generator loss adds λ_rep·NCE per branch
    (the official Triple total), not λ_rep times their mean. Batch of 2 with one-hot teacher features e_1, e_2:
    a student equal to the teacher has cosine logits [[1, 0], [0, 1]] -> NCE = log(1 + 1/e); a swapped one has
    [[0, 1], [1, 0]] -> NCE = log(1 + e)."""
    eye = torch.eye(2)
    fixed = lambda feats: teachers.Teacher(nn.Identity(), 2, (4, 4), (0.5,) * 3, (0.5,) * 3, lambda net, x: feats)
    frozen = {1: fixed(eye), 2: fixed(eye)}
    features = {1: eye[:, None].clone(), 2: eye.flip(0)[:, None].clone()}      # token 0 of (B, 1, W) heads
    aux = {"codes": torch.zeros(2, 3, 1, 1, dtype=torch.long), "z_q": [], "losses": {}, "features": features}
    x = torch.zeros(2, 3, 8, 8)
    g = losses.generator_loss(x, x, aux, 0, teachers=frozen)
    nce_same, nce_swapped = math.log(1 + math.exp(-1)), math.log(1 + math.e)
    assert g["rep/1"].item() == pytest.approx(nce_same, rel=1e-6)
    assert g["rep/2"].item() == pytest.approx(nce_swapped, rel=1e-6)
    official = 0.5 * nce_same + 0.5 * nce_swapped                      # 0.8133; the mean would give half of it
    assert g["total"].item() == pytest.approx(official, rel=1e-6)      # rec = 0 here: the total is the rep term


def test_disentangle_loss_hand_computed():
    def unit(*v):                       # one patch, (B=1, d, h=1, w=1)
        return torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1)
    assert losses.disentangle_loss([unit(1, 0), unit(3, 0)]).item() == 1.0          # parallel: cos^2 = 1
    assert losses.disentangle_loss([unit(1, 0), unit(0, 2)]).item() == 0.0          # orthogonal
    assert math.isclose(losses.disentangle_loss([unit(1, 0), unit(1, 1)]).item(), 0.5, rel_tol=1e-12)
    # k = 3: the mean of the three pairs (1 + 0.5 + 0.5) / 3; patches are averaged: (1 + 0) / 2
    assert math.isclose(losses.disentangle_loss([unit(1, 0), unit(1, 0), unit(1, 1)]).item(), 2 / 3, rel_tol=1e-12)
    two = [torch.cat([unit(1, 0), unit(1, 0)], 2), torch.cat([unit(1, 0), unit(0, 1)], 2)]   # (1, 2, 2, 1)
    assert math.isclose(losses.disentangle_loss(two).item(), 0.5, rel_tol=1e-12)


def test_generator_loss_single_codebook_without_modules():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    aux = fake_aux(1, B=2, teachers=())
    g = losses.generator_loss(x, x.flip(0), aux, 0, lpips=None, disc=None, teachers=None)
    assert "disentangle" not in g and "perceptual" not in g and "gan" not in g and "rep" not in g
    want = g["rec"] + sum(aux["losses"].values())
    assert g["total"].item() == pytest.approx(want.item())


# --------------------------------------------------------------------------------------------------------------
# The bundled photo set (data/photos)

def _load(path):
    return np.asarray(Image.open(path).convert("RGB"))


def _contains(big, small):
    """True if `small` (h, w, 3) appears as a window of `big` (H, W, 3): match first rows, then whole tiles."""
    h, w = small.shape[:2]
    rows = np.lib.stride_tricks.sliding_window_view(big, w, axis=1)             # (H, W-w+1, 3, w)
    hits = (rows == small[0].T).all(axis=(2, 3))                                 # first row matches here
    return any(y + h <= big.shape[0] and np.array_equal(big[y:y + h, x:x + w], small)
               for y, x in zip(*hits.nonzero()))


def test_photos_every_class_has_train_and_val():
    train = torchvision.datasets.ImageFolder(os.path.join(PHOTOS, "train"))
    val = torchvision.datasets.ImageFolder(os.path.join(PHOTOS, "val"))
    assert train.class_to_idx == val.class_to_idx and len(train.classes) >= 8
    for i in range(len(train.classes)):
        assert train.targets.count(i) >= 2 and val.targets.count(i) >= 1
    assert all(Image.open(p).mode == "RGB" for p, _ in train.samples + val.samples)


def test_photos_val_pixels_never_in_train():
    for name in sorted(os.listdir(os.path.join(PHOTOS, "val"))):
        folder = os.path.join(PHOTOS, "train", name)
        trains = [_load(os.path.join(folder, f)) for f in os.listdir(folder)]
        for f in os.listdir(os.path.join(PHOTOS, "val", name)):
            val = _load(os.path.join(PHOTOS, "val", name, f))
            assert not any(_contains(t, val) for t in trains), f"val tile {name}/{f} found in a train tile"
    # the check itself works: a crop of a train tile is found
    t = _load(os.path.join(PHOTOS, "train", "chelsea", "chelsea_0.png"))
    assert _contains(t, t[40:168, 70:198])


def test_photos_total_size_under_10_mb():
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(ROOT, "data")) for f in fs)
    assert total <= 10 * 2**20
