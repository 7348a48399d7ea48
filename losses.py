"""Training losses of the FQGAN tokenizer: reconstruction, LPIPS, PatchGAN, representation learning, Eq. (8).

Paper: "Factorized Visual Tokenization and Generation", Bai et al., arXiv 2411.16681.
  Eq. (2)        L_VQGAN = L_rec + L_VQ + λ_P·L_P + λ_G·L_G  (L_VQ comes weighted from the quantizer, aux["losses"])
  Eq. (7)        λ_dis = 0.1 on the disentanglement term (the term itself is computed in quantizer.py)
  Sec. 3.2.2     representation learning: feature head token 0 vs a frozen CLIP / DINOv2 teacher's CLS
  Eq. (8)        L = L_VQGAN + λ_dis·L_dis + λ_rep·L_rep
Numbers follow the official code as described in docs/official_code.md §2-§3.

Used by the training script, once per step, with the tokenizer output `x_rec, aux = tokenizer(x)`:
    lpips, disc = LPIPS(), PatchGAN()
    teachers = build_teachers(cfg.teachers, device=device)    # {branch i: frozen Teacher}; never wrap in DDP
    g = generator_loss(x, x_rec, aux, step, lpips=lpips, disc=disc, teachers=teachers)   # g["total"].backward()
    d = discriminator_loss(x, x_rec, step, disc)                                          # d["total"].backward()
Nothing here prints; every function returns a dict of named scalar tensors for the loop to log.
Weights for LPIPS and the teachers are looked up in $FQGAN_WEIGHTS (default: torch.hub.get_dir()/checkpoints).
Tests: python -m pytest tests/test_losses.py -q
"""
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision


@dataclass(frozen=True)
class LossConfig:
    rec_weight: float = 1.0          # L_rec = MSE in [-1, 1] (official_code.md §2.1)
    perceptual_weight: float = 1.0   # λ_P, Eq. (2) (official_code.md §2.2)
    gan_weight: float = 0.5          # λ_G, Eq. (2), on the G and the D loss once the GAN is on (official_code §2.3)
    gan_start: int = 20000           # the GAN starts at the official 1-based step 20000 (official_code.md §2.3)
    disentangle_weight: float = 0.1  # λ_dis, Eq. (8)
    rep_weight: float = 0.5          # λ_rep, Eq. (8), once per teacher-supervised branch (representation_loss)


def weights_dir():
    """Folder searched for weight files: $FQGAN_WEIGHTS, else torch's hub cache, where torchvision keeps VGG16."""
    return os.environ.get("FQGAN_WEIGHTS", os.path.join(torch.hub.get_dir(), "checkpoints"))


# --------------------------------------------------------------------------------------------------------------
# LPIPS perceptual loss, L_P of Eq. (2) (official_code.md §2.2; Zhang et al. 2018, VGG16 v0.1, as taming/LlamaGen)

VGG_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision VGG16_Weights.IMAGENET1K_V1
LIN_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-vgg16-lpips.pth"


class LPIPS(nn.Module):
    """d(x, y) per image for x, y (B, 3, H, W) in [-1, 1] -> (B,). Frozen; gradients flow to the inputs only.

    We write it out instead of using torch-fidelity's LPIPS: that class downloads on construction, takes uint8-range
    inputs and needs the full 138 M-parameter VGG16 file loaded into a model; this one needs only the conv trunk.
    """
    taps = (3, 8, 15, 22, 29)        # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16.features
    channels = (64, 128, 256, 512, 512)

    def __init__(self, vgg_path=None, lin_path=None):
        super().__init__()
        vgg_path = vgg_path or os.path.join(weights_dir(), os.path.basename(VGG_URL))
        lin_path = lin_path or os.path.join(weights_dir(), os.path.basename(LIN_URL))
        missing = [f"  {p}\n    download: {u}" for p, u in ((vgg_path, VGG_URL), (lin_path, LIN_URL))
                   if not os.path.isfile(p)]
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
        self.net = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])[: self.taps[-1] + 1]
        sd = torch.load(vgg_path, map_location="cpu", weights_only=True)
        sd = {k.removeprefix("features."): v for k, v in sd.items() if not k.startswith("classifier.")}
        self.net.load_state_dict({k: v for k, v in sd.items() if int(k.split(".")[0]) <= self.taps[-1]})
        # one 1x1 conv per tap, no bias: the learned per-channel weights of LPIPS ("lin0".."lin4")
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.channels)
        sd = torch.load(lin_path, map_location="cpu", weights_only=True)
        for i, lin in enumerate(self.lins):   # official keys: lin{i}.model.1.weight (model = [Dropout, Conv])
            lin.weight.data.copy_(sd.get(f"lin{i}.model.1.weight", sd.get(f"lins.{i}.weight")))
        self.requires_grad_(False).eval()

    def train(self, mode=True):
        # NOTE(paper≠code): the official loss module calls .train() on LPIPS, which turns on a Dropout(0.5) in front
        # of each lin conv during training (official_code.md §2.2). We keep LPIPS deterministic: always eval.
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
# PatchGAN discriminator and hinge losses, L_G of Eq. (2) (official_code.md §2.3; taming's NLayerDiscriminator)

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
        self.main = nn.Sequential(*layers)  # name kept from taming so official discriminator weights load
        for m in self.modules():            # taming's weights_init: conv weights N(0, 0.02), BN N(1, 0.02) and 0
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)


def adversarial_weight(step, cfg=LossConfig()):
    """λ_G at `step` = optimizer steps already taken (0 on the first iteration, the official `train_steps`).

    The official code passes train_steps + 1 to adopt_weight and switches on at >= gan_start, so the GAN terms
    first count at step gan_start - 1 (the 20,000th iteration). Before that both are multiplied by 0.
    """
    return cfg.gan_weight if step + 1 >= cfg.gan_start else 0.0


def hinge_d_loss(logits_real, logits_fake):
    """Hinge loss of the discriminator: (mean relu(1 - D(x)) + mean relu(1 + D(x_rec))) / 2."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def discriminator_loss(x, x_rec, step, disc, cfg=LossConfig()):
    """D step after the G step, on the same images and the pre-update x_rec (detached here). Key "total" trains D.

    D sees real and fake batches in two calls, as the official code does, so BatchNorm normalises each separately.
    """
    logits_real, logits_fake = disc(x.detach()), disc(x_rec.detach())
    hinge = hinge_d_loss(logits_real, logits_fake)
    return {"total": adversarial_weight(step, cfg) * hinge, "hinge": hinge.detach(),
            "logits_real": logits_real.detach().mean(), "logits_fake": logits_fake.detach().mean()}


# --------------------------------------------------------------------------------------------------------------
# Representation learning, Sec. 3.2.2 (official_code.md §2.5): frozen teachers and the official InfoNCE objective

class Teacher(nn.Module):
    """A frozen vision model: x (B, 3, H, W) in [-1, 1] -> its CLS feature (B, width), computed without gradient.

    CLIP (open_clip): the CLS token of the last transformer block, before ln_post and without the projection, as
    the official code takes hidden_states[-1][:, 0] from HF's CLIPVisionModel: 1024 for ViT-L/14, 768 for ViT-B/16.
    DINOv2 (timm): the CLS token after the final norm (HF last_hidden_state[:, 0]): 384 for ViT-S/14.
    """

    def __init__(self, net, width, image_size, mean, std, cls_fn, interpolation="nearest"):
        super().__init__()
        self.net, self.width, self.image_size, self.cls_fn = net, width, tuple(image_size), cls_fn
        self.interpolation = interpolation
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def train(self, mode=True):
        return super().train(False)  # frozen: always eval (the official code lets them go back to train; dropout 0)

    def preprocess(self, x):
        """[-1, 1] -> [0, 1] -> teacher resolution -> teacher mean/std (official_code.md §2.5). It sees the INPUT x."""
        x = x * 0.5 + 0.5
        # NOTE(paper≠code): the official code resizes 256 -> 224 with F.interpolate's default mode, nearest (no
        # antialias), and hard-codes 224. We keep nearest by default for parity; "bicubic" (antialiased) is closer
        # to the teachers' own training-time preprocessing. Size: CLIP's from its config, DINOv2's DINO_SIZE.
        extra = {} if self.interpolation == "nearest" else {"antialias": True, "align_corners": False}
        x = F.interpolate(x, size=self.image_size, mode=self.interpolation, **extra)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, x):
        return self.cls_fn(self.net, self.preprocess(x))


DINO_SIZE = 224  # the official teacher input size (official_code.md §2.5); CLIP's is its own


def _clip_cls(net, x):
    return net(x)  # after prune_intermediate_layers(prune_norm, prune_head) this is CLS before ln_post, no proj


def _cnn_cls(net, x):
    return net.features(x)                # the stand-in's pooled features (PhotoCNN below)


def _dino_cls(net, x):
    return net.forward_features(x)[:, 0]  # timm ViT: tokens after the final norm; token 0 is CLS


class PhotoCNN(nn.Module):
    """The offline stand-in teacher (spec "cnn:tiny_teacher.pt", trained by train_teacher.py): a 4-stage CNN that
    classifies the 11 bundled photos. Its pooled features (B, width) play the role of CLIP's CLS feature: they encode
    which photo (class) a crop comes from, and nothing a pretrained model knows about the world."""

    def __init__(self, num_classes=11, width=128, image_size=64):
        super().__init__()
        chans, layers = (3, width // 8, width // 4, width // 2, width), []
        for cin, cout in zip(chans, chans[1:]):                        # each stage halves H and W
            layers += [nn.Conv2d(cin, cout, 3, 2, 1), nn.BatchNorm2d(cout), nn.ReLU()]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())   # (B, 3, S, S) -> (B, width)
        self.classifier = nn.Linear(width, num_classes)
        self.width, self.image_size = width, image_size

    def forward(self, x):
        return self.classifier(self.features(x))                       # class logits (B, num_classes)


def teacher_file(spec):
    """(the local weight file of a teacher spec, or None; the path where it is expected): $FQGAN_WEIGHTS/<spec with
    ':' and '/' -> '-'>.safetensors, or the same name with .bin; for "cnn:<file>" the file itself, else the
    repository's weights/<file> (where the stand-in teacher is shipped)."""
    if spec.startswith("cnn:"):
        local = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", spec[4:])
        found = [f for f in (spec[4:], local) if os.path.isfile(f)]
        return (found[0] if found else None), local
    local = os.path.join(weights_dir(), spec.replace(":", "-").replace("/", "-") + ".safetensors")
    found = [f for f in (local, local.removesuffix(".safetensors") + ".bin") if os.path.isfile(f)]
    return (found[0] if found else None), local


def load_teacher(spec, weights_path=None, pretrained=True, interpolation="nearest"):
    """Build one teacher from a spec string (see build_teachers). pretrained=False gives random weights (tests)."""
    kind, _, name = spec.partition(":")
    found, local = teacher_file(spec)                                 # the explicit path wins over a local file
    path = weights_path or found
    if kind == "cnn":                                                 # the offline stand-in (train_teacher.py)
        if pretrained and path is None:
            raise FileNotFoundError(f"Weights of teacher {spec!r} not found at {local}; make them with "
                                    f"`python train_teacher.py --out {local}` (about a minute on a CPU)")
        ckpt = torch.load(path, map_location="cpu", weights_only=True) if pretrained else {"config": {}}
        net = PhotoCNN(**ckpt["config"])
        if pretrained:
            net.load_state_dict(ckpt["model"])
        # the tokenizer's input is the teacher's: [-1, 1] -> [0, 1] -> (x - 0.5) / 0.5 is [-1, 1] again
        return Teacher(net, net.width, (net.image_size,) * 2, (0.5,) * 3, (0.5,) * 3, _cnn_cls, "bilinear")
    if kind == "openclip":
        import open_clip
        name, _, tag = name.partition(":")
        cfg = open_clip.get_pretrained_cfg(name, tag) if tag else {}  # {} when the tag is a file path
        repo = cfg.get("hf_hub", "<repo>/").rstrip("/")
        url = f"https://huggingface.co/{repo}/resolve/main/open_clip_model.safetensors"
        source = path or tag
    elif kind == "timm":
        import timm
        cfg = timm.models.get_pretrained_cfg(name)
        url = f"https://huggingface.co/{getattr(cfg, 'hf_hub_id', '<repo>')}/resolve/main/model.safetensors"
        source = path
    else:
        raise ValueError(f"teacher spec {spec!r} must start with 'openclip:', 'timm:' or 'cnn:'")
    message = (f"Weights of teacher {spec!r} not found or not loadable. Download {url} and save it as {local} (folder: "
               f"$FQGAN_WEIGHTS, default torch.hub.get_dir()/checkpoints), or pass its path through "
               f"build_teachers(..., weights_paths={{branch: path}}). With internet, open_clip/timm download it "
               f"into the Hugging Face cache ($HF_HOME/hub) themselves; offline, HF_HUB_OFFLINE=1 skips their retries.")
    if pretrained and path is not None and not os.path.isfile(path):
        raise FileNotFoundError(message + f" (no file at {path})")
    try:
        if kind == "openclip":
            # open_clip builds ViT-L-14 with nn.GELU unless told otherwise; OpenAI's weights were trained with
            # QuickGELU, which the tag's config records, so we force it (a bare "ViT-L-14" would be wrong).
            model = open_clip.create_model(name, pretrained=source if pretrained else None,
                                           force_quick_gelu=bool(cfg.get("quick_gelu", False)))
            net = model.visual  # drop the text tower
            net.prune_intermediate_layers(indices=1, prune_norm=True, prune_head=True)  # keep all blocks
            mean, std = (cfg.get(k, net.preprocess_cfg[k]) for k in ("mean", "std"))  # the tag's, if known
            return Teacher(net, net.class_embedding.shape[0], net.image_size, mean, std, _clip_cls, interpolation)
        # NOTE(paper≠code): the official DINOv2 (HF) gets 224 px and interpolates its 518-px position table on the
        # fly; timm resamples the table once to the 16x16 grid at load time (both bicubic, not bit-identical).
        net = timm.create_model(name, pretrained=pretrained, num_classes=0, img_size=DINO_SIZE,
                                pretrained_cfg_overlay={"file": path} if path else None)
        cfg = net.pretrained_cfg
        return Teacher(net, net.embed_dim, net.patch_embed.img_size, cfg["mean"], cfg["std"], _dino_cls, interpolation)
    except (OSError, RuntimeError) as e:  # no internet / not cached / not a weight file
        raise FileNotFoundError(message + f" ({type(e).__name__}: {e})") from e


def build_teachers(specs, weights_paths=None, device=None, pretrained=True, interpolation="nearest"):
    """{branch i: Teacher} for every non-None entry of `specs` (TokenizerConfig.teachers).

    specs: "openclip:<model>:<tag or file>" (e.g. "openclip:ViT-L-14:openai"), "timm:<model.tag>"
    (e.g. "timm:vit_small_patch14_dinov2.lvd142m") or "cnn:<file>" (the offline stand-in PhotoCNN).
    weights_paths: optional {i: local weight file}; for open_clip the
    tag still decides QuickGELU and mean/std. Teachers have no trainable parameters: keep them out of DDP and of
    checkpoints. pretrained=False builds randomly initialised teachers of the same classes (tests only).
    """
    weights_paths = weights_paths or {}
    return {i: load_teacher(spec, weights_paths.get(i), pretrained, interpolation).to(device)
            for i, spec in enumerate(specs) if spec is not None}


# paper-map: Representation loss
def info_nce(student, teacher):
    """The official representation loss (official_code.md §2.5): rows-only, temperature-free InfoNCE on cosines.

    student, teacher (B, W). s = l2norm(student), t = l2norm(teacher), M = exp(s tᵀ):
    loss = -mean_i log(M_ii / Σ_j M_ij); the other images of the (per-GPU) batch are the negatives.
    """
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    logits = s @ t.t()                                            # (B, B) cosine similarities, temperature 1
    # NOTE(paper≠code): the paper calls this "predicting the teacher's features"; the official code is this
    # contrastive loss on the CLS token only, per GPU (no all-gather), so its minimum depends on the batch size
    # (log(1 + 31/e^2) ≈ 1.648 for 32 images). With B = 1 it is exactly 0 (no gradient); the official .squeeze()
    # would crash there instead. Columns (teacher -> student) are not used.
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
        # Eq. (8): L_rep sums the supervised branches, each weighted by λ_rep in generator_loss, as the official
        # generator loss adds λ_rep·NCE_mid + λ_rep·NCE_high for Triple (0.5 each) and λ_rep·NCE for Dual.
        out["rep"] = torch.stack(list(out.values())).sum()
    return out


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
    quant = [v for k, v in aux["losses"].items() if k != "disentangle"]
    out.update(aux["losses"])                                      # codebook/i, commit/i, entropy/i, disentangle
    if quant:
        out["quant"] = torch.stack(quant).sum()                    # L_VQ, Eq. (2): already weighted (β, entropy)
        total = total + out["quant"]
    if "disentangle" in aux["losses"]:
        # paper-map: Eq. (7)
        total = total + cfg.disentangle_weight * aux["losses"]["disentangle"]   # λ_dis · L_dis, Eq. (7)-(8)
    if teachers:
        out.update(representation_loss(aux["features"], teachers, x))
        total = total + cfg.rep_weight * out["rep"]                # λ_rep · L_rep, Eq. (8)
    # paper-map: Eq. (8)
    out["total"] = total                                           # Eq. (8)
    return out


if __name__ == "__main__":   # `python losses.py --help` says what is here; the file itself is a library
    import argparse
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print("losses.py is imported by train_tokenizer.py; run its tests with: python -m pytest tests/test_losses.py -q")
