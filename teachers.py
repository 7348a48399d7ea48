"""Frozen teachers for representation learning (Sec. 3.2.2): CLIP, DINOv2 and the offline stand-in PhotoCNN.

Paper: "Factorized Visual Tokenization and Generation", Bai et al., arXiv 2411.16681.
  Sec. 3.2.2     a semantic sub-codebook's feature head is trained to predict a frozen vision model's feature:
                 CLIP ViT-L/14 for Dual, DINOv2 ViT-S/14 + CLIP ViT-B/16 for Triple (Tab. 1); the loss is
                 losses.info_nce. Preprocessing and the feature taken follow docs/official_code.md §2.5.
Offline, none of the pretrained teachers can be downloaded; "cnn:tiny_teacher.pt" is a small CNN trained on the
bundled photos (train_teacher.py) behind the same interface: a stand-in, not CLIP (README "Representation learning").

    teachers = build_teachers(cfg.teachers, device=device)    # {branch i: frozen Teacher}; never wrap in DDP
    feature = teachers[1](x)                                   # x (B, 3, H, W) in [-1, 1] -> (B, width)
Weights are looked up in $FQGAN_WEIGHTS (default: torch.hub.get_dir()/checkpoints); a missing file raises an error
that names the file to download and where to put it.
Tests: python -m pytest tests/test_losses.py -q
"""
import os
import pickle
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError   # a cut .safetensors download (safetensors comes with timm)

from losses import weights_dir


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
CLS = {  # kind -> (net, x) -> the CLS feature (B, width)
    "openclip": lambda net, x: net(x),     # after prune_intermediate_layers(...): CLS before ln_post, no projection
    "cnn": lambda net, x: net.features(x),  # the stand-in's pooled features (PhotoCNN below)
    "timm": lambda net, x: net.forward_features(x)[:, 0],  # timm ViT: tokens after the final norm; token 0 is CLS
}


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
        candidates = (spec[4:], local)
    else:
        local = os.path.join(weights_dir(), spec.replace(":", "-").replace("/", "-") + ".safetensors")
        candidates = (local, local.removesuffix(".safetensors") + ".bin")
    return next((f for f in candidates if os.path.isfile(f)), None), local


def load_teacher(spec, weights_path=None, pretrained=True, interpolation="nearest"):
    """Build one teacher from a spec string (see build_teachers). pretrained=False gives random weights (tests)."""
    kind, _, name = spec.partition(":")
    found, local = teacher_file(spec)                                 # the explicit path wins over a local file
    path = weights_path or found
    if kind == "cnn":                                                 # the offline stand-in (train_teacher.py)
        if pretrained and path is None:
            raise FileNotFoundError(f"Weights of teacher {spec!r} not found at {local}; make them with "
                                    f"`python train_teacher.py --out {local}` (about a minute on a CPU)")
        if pretrained and not zipfile.is_zipfile(path):              # torch.save writes a zip: truncated, other bytes
            raise ValueError(f"{path} is not a stand-in teacher of train_teacher.py: it is not a complete PyTorch "
                             f"checkpoint (no zip directory); make it with `python train_teacher.py --out {path}`")
        try:                                                          # pickled code, a damaged zip
            ckpt = torch.load(path, map_location="cpu", weights_only=True) if pretrained else {"config": {}}
        except Exception as e:                                        # noqa: BLE001 - every torch.load failure
            raise ValueError(f"{path} is not a stand-in teacher of train_teacher.py: it cannot be read as a "
                             f"checkpoint ({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict):
            raise ValueError(f"{path} is not a stand-in teacher of train_teacher.py (no config in it)")
        try:                                                          # a tokenizer or FAR file given in its place
            net = PhotoCNN(**ckpt["config"])
            net.load_state_dict(ckpt["model"]) if pretrained else None
        except (KeyError, TypeError, RuntimeError) as e:
            raise ValueError(f"{path} is not a stand-in teacher of train_teacher.py (config "
                             f"{sorted(ckpt.get('config', {}))[:6]}; {type(e).__name__}: {str(e)[:200]})") from None
        # the tokenizer's input is the teacher's: [-1, 1] -> [0, 1] -> (x - 0.5) / 0.5 is [-1, 1] again
        return Teacher(net, net.width, (net.image_size,) * 2, (0.5,) * 3, (0.5,) * 3, CLS[kind], "bilinear")
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
            return Teacher(net, net.class_embedding.shape[0], net.image_size, mean, std, CLS[kind], interpolation)
        # NOTE(paper≠code): the official DINOv2 (HF) gets 224 px and interpolates its 518-px position table on the
        # fly; timm resamples the table once to the 16x16 grid at load time (both bicubic, not bit-identical).
        net = timm.create_model(name, pretrained=pretrained, num_classes=0, img_size=DINO_SIZE,
                                pretrained_cfg_overlay={"file": path} if path else None)
        cfg = net.pretrained_cfg
        return Teacher(net, net.embed_dim, net.patch_embed.img_size, cfg["mean"], cfg["std"], CLS[kind], interpolation)
    except (OSError, RuntimeError, pickle.UnpicklingError, SafetensorError) as e:   # no internet, not cached, a cut
        raise FileNotFoundError(message + f" ({type(e).__name__}: {e})") from e     # download, not a weight file


def stand_in_teacher(path, device):
    """The stand-in teacher (train_teacher.py's PhotoCNN) on device, frozen, and its class names (index = class id)."""
    return (load_teacher(f"cnn:{path}").to(device),
            torch.load(path, map_location="cpu", weights_only=True)["classes"])


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


if __name__ == "__main__":   # `python teachers.py --help` says what is here; the file itself is a library
    import argparse
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print("teachers.py is imported by train_tokenizer.py; run its tests with: python -m pytest tests/test_losses.py -q")
