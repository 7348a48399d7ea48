"""Training losses of the FQGAN tokenizer: reconstruction, LPIPS, PatchGAN, representation learning, Eq. (8).

Paper: "Factorized Visual Tokenization and Generation", Bai et al., arXiv 2411.16681.
  Eq. (2)        L_VQGAN = L_rec + L_VQ + λ_P·L_P + λ_G·L_G  (L_VQ comes weighted from the quantizer, aux["losses"])
  Eq. (7)        the disentanglement regularizer and its weight λ_dis = 0.1
  Sec. 3.2.2     representation learning: feature head token 0 vs a frozen teacher's CLS (teachers.py), InfoNCE
  Eq. (8)        L = L_VQGAN + λ_dis·L_dis + λ_rep·L_rep
Weights and forms follow the released training code (`# parity: §n` tags; docs/official_code.md §n says how).

Used by the training script, once per step, with the tokenizer output `x_rec, aux = tokenizer(x)`:
    lpips, disc = LPIPS(), PatchGAN()
    frozen = build_teachers(cfg.teachers)                     # teachers.py: {branch i: frozen Teacher}
    g = generator_loss(x, x_rec, aux, step, lpips=lpips, disc=disc, teachers=frozen)     # g["total"].backward()
    d = discriminator_loss(x, x_rec, step, disc)                                          # d["total"].backward()
Nothing here prints; every function returns a dict of named scalar tensors for the loop to log.
Weights for LPIPS are looked up in $FQGAN_WEIGHTS (default: torch.hub.get_dir()/checkpoints).
Tests: python -m pytest tests/test_losses.py -q
"""
import itertools
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class LossConfig:
    rec_weight: float = 1.0          # L_rec = MSE in [-1, 1] (# parity: §2.1)
    perceptual_weight: float = 1.0   # λ_P, Eq. (2) (# parity: §2.2)
    gan_weight: float = 0.5          # λ_G, Eq. (2), on the G and the D loss once the GAN is on (# parity: §2.3)
    gan_start: int = 20000           # the GAN switches on at the 1-based step 20000 (# parity: §2.3)
    disentangle_weight: float = 0.1  # λ_dis, Eq. (8)
    rep_weight: float = 0.5          # λ_rep, Eq. (8), once per teacher-supervised branch (representation_loss)


def weights_dir():
    """Folder searched for weight files: $FQGAN_WEIGHTS, else torch's hub cache, where torchvision keeps VGG16."""
    return os.environ.get("FQGAN_WEIGHTS", os.path.join(torch.hub.get_dir(), "checkpoints"))


def read_weights(path, url):
    """torch.load(path, weights_only=True) of a downloaded weight file; one that cannot be read (a cut download, other
    bytes) is a ValueError that names it and where to download it again."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                                            # noqa: BLE001 - every torch.load failure
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:120]}): a damaged or "
                         f"incomplete download? Download {url} again") from None


# --------------------------------------------------------------------------------------------------------------
# LPIPS perceptual loss, L_P of Eq. (2) (Zhang et al. 2018, VGG16 v0.1, as taming/LlamaGen; # parity: §2.2)

VGG_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision VGG16_Weights.IMAGENET1K_V1
LIN_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-vgg16-lpips.pth"


class LPIPS(nn.Module):
    """d(x, y) per image for x, y (B, 3, H, W) in [-1, 1] -> (B,). Frozen; gradients flow to the inputs only.

    We write it out instead of using torch-fidelity's LPIPS: that class downloads on construction, takes uint8-range
    inputs and needs the full 138 M-parameter VGG16 file loaded into a model; this one needs only the conv trunk.
    """
    taps = (3, 8, 15, 22, 29)        # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16.features
    channels = (64, 128, 256, 512, 512)

    def __init__(self, vgg_path=None, lin_path=None, pretrained=True):
        super().__init__()
        vgg_path = vgg_path or os.path.join(weights_dir(), os.path.basename(VGG_URL))
        lin_path = lin_path or os.path.join(weights_dir(), os.path.basename(LIN_URL))
        missing = [f"  {p}\n    download: {u}" for p, u in ((vgg_path, VGG_URL), (lin_path, LIN_URL))
                   if not os.path.isfile(p)] if pretrained else []    # pretrained=False: random weights (bench.py)
        if missing:
            raise FileNotFoundError(
                "LPIPS weights not found:\n" + "\n".join(missing) + "\nPut the files at these paths (the folder is "
                "$FQGAN_WEIGHTS, default torch.hub.get_dir()/checkpoints) or pass LPIPS(vgg_path=..., lin_path=...). "
                "The linear-layer file is LPIPS v0.1 'vgg.pth' (richzhang/PerceptualSimilarity, also taming's vgg.pth)"
                "; any copy with keys lin{0..4}.model.1.weight works.")
        # (x - shift) / scale maps [-1, 1] images to ImageNet statistics (LPIPS' ScalingLayer)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        # VGG16 conv trunk up to relu5_3 (no classifier: 14.7 M parameters instead of 138 M)
        from torchvision.models import vgg                            # here: 1-2 s to import, for LPIPS only
        self.net = vgg.make_layers(vgg.cfgs["D"])[: self.taps[-1] + 1]
        # one 1x1 conv per tap, no bias: the learned per-channel weights of LPIPS ("lin0".."lin4")
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.channels)
        if pretrained:
            sd = read_weights(vgg_path, VGG_URL)
            sd = {k.removeprefix("features."): v for k, v in sd.items() if not k.startswith("classifier.")}
            self.net.load_state_dict({k: v for k, v in sd.items() if int(k.split(".")[0]) <= self.taps[-1]})
            sd = read_weights(lin_path, LIN_URL)
            for i, lin in enumerate(self.lins):   # LPIPS' keys: lin{i}.model.1.weight (model = [Dropout, Conv])
                lin.weight.data.copy_(sd.get(f"lin{i}.model.1.weight", sd.get(f"lins.{i}.weight")))
        self.requires_grad_(False).eval()

    def train(self, mode=True):
        # NOTE(paper≠code): always eval, so the loss is deterministic (the released training turns LPIPS' Dropout(0.5)
        # on: # parity: §2.2)
        return super().train(False)

    def forward(self, x, y):
        h = (torch.cat([x, y]) - self.shift) / self.scale  # one pass over both batches: (2B, 3, H, W)
        d = 0
        for i, layer in enumerate(self.net):
            h = layer(h)
            if i in self.taps:
                f = h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)   # unit-normalise over channels
                fx, fy = f.chunk(2)
                lin = self.lins[self.taps.index(i)]
                d = d + lin((fx - fy).pow(2)).mean((2, 3))               # weighted squared diff, spatial mean
        return d.flatten()                                                # (B, 1) -> (B,)


# --------------------------------------------------------------------------------------------------------------
# PatchGAN discriminator and hinge losses, L_G of Eq. (2) (taming's NLayerDiscriminator; # parity: §2.3)

class PatchGAN(nn.Module):
    """(B, 3, H, W) -> (B, 1, H/8 - 2, W/8 - 2) real/fake logits; 2,765,633 parameters with the defaults."""

    def __init__(self, in_channels=3, ndf=64, n_layers=3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1  # the last hidden layer keeps the resolution
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),  # bias is redundant before BN
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
        self.main = nn.Sequential(*layers)  # taming's name: released discriminator weights load
        for m in self.modules():            # taming's weights_init: conv weights N(0, 0.02), BN N(1, 0.02) and 0
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)


def adversarial_weight(step, cfg=LossConfig()):
    """λ_G at `step` = optimizer steps already taken (0 on the first iteration): the GAN terms first count at step
    gan_start - 1, the 20,000th iteration (# parity: §2.3, its 1-based count); before that both are multiplied by 0.
    """
    return cfg.gan_weight if step + 1 >= cfg.gan_start else 0.0


def hinge_d_loss(logits_real, logits_fake):
    """Hinge loss of the discriminator: (mean relu(1 - D(x)) + mean relu(1 + D(x_rec))) / 2."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def discriminator_loss(x, x_rec, step, disc, cfg=LossConfig()):
    """D step after the G step, on the same images and the pre-update x_rec (detached here). Key "total" trains D.

    D sees real and fake batches in two calls, so BatchNorm normalises each separately (# parity: §2.3).
    """
    logits_real, logits_fake = disc(x.detach()), disc(x_rec.detach())
    hinge = hinge_d_loss(logits_real, logits_fake)
    return {"total": adversarial_weight(step, cfg) * hinge, "hinge": hinge.detach(),
            "logits_real": logits_real.detach().mean(), "logits_fake": logits_fake.detach().mean()}


# --------------------------------------------------------------------------------------------------------------
# Representation learning, Sec. 3.2.2: an InfoNCE objective against a frozen teacher (teachers.py)

# paper-map: Representation loss
def info_nce(student, teacher):
    """The representation loss: rows-only, temperature-free InfoNCE on cosines (# parity: §2.5).

    student, teacher (B, W). s = l2norm(student), t = l2norm(teacher), M = exp(s tᵀ):
    loss = -mean_i log(M_ii / Σ_j M_ij); the other images of the (per-GPU) batch are the negatives.
    """
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    logits = s @ t.t()                                            # (B, B) cosine similarities, temperature 1
    # NOTE(paper≠code): the paper says "predicting the teacher's features"; the released code is this contrastive
    # loss on the CLS token, per GPU (no all-gather), so its minimum depends on the batch size (log(1 + 31/e^2) ≈
    # 1.648 for 32 images). B = 1 gives exactly 0 here (no gradient) where the released code crashes.
    return F.cross_entropy(logits, torch.arange(len(s), device=s.device))


def representation_loss(features, teachers, x):
    """Sec. 3.2.2: {"rep/i": InfoNCE of branch i, "rep": their sum}; features[i] (B, 1 + h*w, W) from the head."""
    out = {}
    for i, teacher in teachers.items():
        assert i in features, f"branch {i} has a teacher but the tokenizer returned no head features for it"
        student = features[i][:, 0]                                # (B, 1 + h*w, W) -> (B, W): token 0 = CLS guess
        assert student.shape[-1] == teacher.width, \
            f"branch {i}: head width {student.shape[-1]} != teacher width {teacher.width}"
        out[f"rep/{i}"] = info_nce(student, teacher(x))
    if out:
        # Eq. (8): L_rep sums the supervised branches, each weighted by λ_rep in generator_loss: Triple adds
        # λ_rep·NCE_mid + λ_rep·NCE_high (0.5 each), Dual λ_rep·NCE (# parity: §2.1)
        out["rep"] = torch.stack(list(out.values())).sum()
    return out


# --------------------------------------------------------------------------------------------------------------
# The disentanglement regularizer, Sec. 3.2.1

# paper-map: Eq. (7)
def disentangle_loss(z_qs):
    """Eq. (7): L_dis = mean over patches of (z_q^a . z_q^b)^2 of the l2-normalised sub-codes z_qs (k >= 2 tensors
    (B, d, h, w), the tokenizer's aux["z_q"]), pushing the sub-codebooks towards orthogonal, complementary codes; for
    k = 3 the mean over the three pairs (# parity: the Triple loss). λ_dis weighs it in generator_loss (Eq. 8)."""
    pairs = [(F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1).pow(2).mean()   # (B, h, w) -> mean
             for a, b in itertools.combinations(z_qs, 2)]
    return torch.stack(pairs).mean()


# --------------------------------------------------------------------------------------------------------------
# The generator objective, Eq. (8)

def generator_loss(x, x_rec, aux, step, *, lpips=None, disc=None, teachers=None, cfg=LossConfig()):
    """Eq. (8) for one G step: {"total", "rec", "perceptual", "gan", "gan_weight", "quant", quantizer terms,
    "disentangle", "rep", "rep/i"}. A term whose module is None (lpips, disc, teachers) is left out of the total
    and the dict, e.g. for CPU runs without pretrained weights; aux is the tokenizer's second output.
    """
    # paper-map: Eq. (2)
    out = {"rec": F.mse_loss(x_rec.float(), x.float())}           # L_rec, Eq. (2): MSE in [-1, 1]
    total = cfg.rec_weight * out["rec"]
    if lpips is not None:
        out["perceptual"] = lpips(x_rec, x).mean()                 # L_P, Eq. (2): batch mean of LPIPS
        total = total + cfg.perceptual_weight * out["perceptual"]
    if disc is not None:
        # L_G = -mean D(x_rec), Eq. (2). D also accumulates gradient here; the loop zeroes it before the D step.
        out["gan"] = -disc(x_rec).mean()
        out["gan_weight"] = torch.tensor(adversarial_weight(step, cfg), device=x.device)
        total = total + out["gan_weight"] * out["gan"]             # λ_G(step) · L_G, Eq. (2)
    out.update(aux["losses"])                                      # codebook/i, commit/i, entropy/i: weighted
    if aux["losses"]:
        out["quant"] = torch.stack(list(aux["losses"].values())).sum()   # L_VQ, Eq. (2): already weighted (β, entropy)
        total = total + out["quant"]
    if len(aux["z_q"]) > 1:                                        # k >= 2 sub-codebooks
        out["disentangle"] = disentangle_loss(aux["z_q"])          # L_dis, Eq. (7)
        total = total + cfg.disentangle_weight * out["disentangle"]   # λ_dis · L_dis, Eq. (8)
    if teachers:
        out.update(representation_loss(aux["features"], teachers, x))
        total = total + cfg.rep_weight * out["rep"]                # λ_rep · L_rep, Eq. (8)
    # paper-map: Eq. (8)
    out["total"] = total
    return out


if __name__ == "__main__":   # `python losses.py --help` says what is here; the file itself is a library
    import argparse
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print("losses.py is imported by train_tokenizer.py; run its tests with: python -m pytest tests/test_losses.py -q")
