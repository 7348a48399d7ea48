"""Train the offline stand-in teacher for representation learning (Sec. 3.2.2) on the bundled photos.

Paper: "Factorized Visual Tokenization and Generation", Bai et al., arXiv 2411.16681, Sec. 3.2.2: one sub-codebook
learns to predict a frozen teacher's feature (CLIP ViT-L/14 for FQGAN-Dual). CLIP's weights cannot be downloaded
here, so the tiny-dual preset uses this stand-in: a small CNN (teachers.PhotoCNN, 0.1 M parameters) trained to tell
the 11 bundled photos apart from random 64-px crops. Its pooled feature says which photo a crop comes from; that is
all it knows, where CLIP's feature describes what an image shows in general. It is plainly a stand-in: a teacher
with the same interface (teachers.load_teacher("cnn:tiny_teacher.pt")), whose effect on a sub-codebook can be measured
offline (evaluate.py's class probe, figures.py's Fig. 4).

  python train_teacher.py                                   # -> runs/teacher/tiny_teacher.pt
  python train_teacher.py --out weights/tiny_teacher.pt     # remakes the shipped file (the same weights, bit for bit)
"""
import argparse
import math
import os
import shlex
import sys

import torch
import torch.nn.functional as F

from checkpoints import CheckpointError, check_flags, check_writable, one_process_only
from images import BUNDLED, ImageFolder, open_rgb, random_crop, to_tensor
from teachers import PhotoCNN


@torch.no_grad()
def accuracy(net, dataset):
    """Top-1 accuracy of net on every item of dataset (centre crops for a val folder)."""
    net.eval()                                                        # BatchNorm: running statistics
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])     # (N, 3, S, S): the held-out set is small
    y = torch.tensor([label for _, label in dataset.samples])         # (N,) class = photo
    acc = (net(x).argmax(1) == y).float().mean().item()
    net.train()                                                       # back to batch statistics for training
    return acc


def main(argv=None):
    """Parse the flags, train PhotoCNN on random crops, write --out atomically."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", default=os.path.join(BUNDLED, "train"), help="ImageFolder of training photos")
    p.add_argument("--val-path", default=os.path.join(BUNDLED, "val"), help="held-out photos for the accuracy")
    p.add_argument("--image-size", type=int, default=64, help="crop size = the tiny tokenizer's input (%(default)s)")
    p.add_argument("--width", type=int, default=128, help="feature width, the teacher's CLS width (%(default)s)")
    p.add_argument("--steps", type=int, default=800, help="Adam steps (%(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="random crops per step (%(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate, cosine to 0 (%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (%(default)s)")
    p.add_argument("--out", help="output file (default: runs/teacher/tiny_teacher.pt; the shipped file, which the "
                   "tiny-dual preset and evaluate.py use, is weights/tiny_teacher.pt: a run never replaces it unasked)")
    args = p.parse_args(argv)
    one_process_only(p)
    default = args.out is None                                        # its folder is ours to make, when written
    args.out = args.out or os.path.join("runs", "teacher", "tiny_teacher.pt")
    check_flags(p, args, *((n, getattr(args, n) >= 1, "an integer >= 1")          # before any work: exit 2
                           for n in ("image_size", "width", "steps", "batch_size")),
                ("lr", math.isfinite(args.lr) and args.lr > 0, "finite and > 0"))
    size = (args.image_size, args.image_size)                         # square crops, the tiny tokenizer's input
    try:   # the output and both folders before any training: a bad path fails now, not after it
        check_writable(args.out, "--out", default=default)
        # the training folder is only listed here (photos are decoded below); val gives centre crops for accuracy()
        train, val = (ImageFolder(args.data_path, size, train=True, seed=args.seed),
                      ImageFolder(args.val_path, size, train=False))
    except (CheckpointError, FileNotFoundError) as e:
        p.error(str(e))
    if train.flat or val.classes != train.classes:                    # accuracy() compares labels, index = class
        found = lambda f: "images directly in it" if f.flat else ", ".join(f.classes) or "no class folder"
        p.error(f"--data-path {args.data_path} and --val-path {args.val_path} need the same class folders, "
                f"root/<class>/<image>; found {found(train)} and {found(val)}")
    torch.manual_seed(args.seed)                                      # the initial weights
    net = PhotoCNN(len(train.classes), args.width, args.image_size)   # one class per photo subject
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)   # lr -> 0 at the last step
    g = torch.Generator().manual_seed(args.seed)                      # every crop's randomness: reproducible
    photos = [open_rgb(path) for path, _ in train.samples]             # 44 photos: decode once, crop every step
    if any(img is None for img in photos):                            # a teacher needs every class: no skipping
        bad = [path for (path, _), img in zip(train.samples, photos) if img is None]
        p.error(f"--data-path {args.data_path}: {len(bad)} unreadable image{'s' * (len(bad) > 1)}, "
                f"{', '.join(bad)}; fix or remove them")
    for step in range(1, args.steps + 1):
        # random crops (images.random_crop: scale + position + flip) of random photos, a fresh draw each step
        idx = torch.randint(len(photos), (args.batch_size,), generator=g).tolist()
        x = torch.stack([to_tensor(random_crop(photos[i], size, g)) for i in idx])    # (B, 3, S, S)
        y = torch.tensor([train.samples[i][1] for i in idx])          # (B,) the photo each crop came from
        loss = F.cross_entropy(net(x), y)                             # which photo: the features are a by-product
        if not math.isfinite(loss.item()):                            # nothing written: the old file stays
            sys.exit(f"train_teacher.py: the loss is {loss.item()} at step {step}; nothing written (lower --lr)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()                                                  # one cosine step per optimizer step
        if step % 250 == 0 or step == args.steps:
            print(f"step {step}: loss {loss.item():.3f}, held-out accuracy {accuracy(net, val):.3f}", flush=True)
    config = {"num_classes": len(train.classes), "width": args.width, "image_size": args.image_size}   # PhotoCNN(**)
    # plain types only: teachers.load_teacher reads it with torch.load(weights_only=True)
    state = {"model": net.state_dict(), "config": config, "classes": train.classes, "steps": args.steps,
             "val_accuracy": accuracy(net, val),
             "command": shlex.join(["python", "train_teacher.py", *(sys.argv[1:] if argv is None else argv)])}
    tmp = args.out + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)   # the default runs/teacher
    torch.save(state, tmp)
    os.replace(tmp, args.out)                                         # atomic: never a half-written teacher
    print(f"wrote {args.out}: held-out accuracy {state['val_accuracy']:.3f} on {len(val)} photos "
          f"(chance {1 / len(train.classes):.3f})")


if __name__ == "__main__":
    main()
