"""Draw the paper's Fig. 3 (what each sub-codebook encodes) and Fig. 4 (how each sub-codebook's codes cluster) for a
tokenizer, as PNGs.

Paper: "Factorized Visual Tokenization and Generation", Bai et al., arXiv 2411.16681.
  Fig. 3  reconstruction from each sub-codebook alone, the other sub-codes zeroed (Tokenizer.decode_codes(keep=...))
  Fig. 4  t-SNE of the codebook vectors of the tokens of the images of a few classes, one panel per sub-codebook:
          with a teacher on a branch (Sec. 3.2.2), that branch's codes cluster by class, the other's do not
Default: the shipped tiny tokenizer on the bundled held-out photos, written under runs/figures/ (never over the
tracked docs/ figures unless asked):
  python figures.py                                        # runs/figures/fig3.png and fig4.png
  python figures.py --tokenizer-ckpt TOK.pt --data-path /data/imagenet/val --fig4-classes 4 --out-dir figs
"""
import argparse
import math
import os

import torch
from PIL import Image, ImageDraw

from checkpoints import CheckpointError, check_flags, load_tokenizer, one_process_only
from images import BUNDLED, ImageFolder, save_png, to_uint8

ROOT = os.path.dirname(os.path.abspath(__file__))                     # for the shipped weights/ default
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0)]   # class colours: tab10 + black


# --------------------------------------------------------------------------------------------------------------
# Fig. 3 and Fig. 4

def write_figure(img, path):
    """Write a PIL figure as a PNG and say where it went."""
    save_png(img, path)                                       # atomic: temp file + os.replace
    print(f"wrote {path}")


@torch.no_grad()
# paper-map: Fig. 3
def figure3(tok, x, path, header=20):
    """Fig. 3: one row per image: original | reconstruction | from each sub-codebook alone (the others zeroed)."""
    codes = tok.encode(x)                                     # (n, k, h, w), one index map per sub-codebook
    # Eq. (6) with all k sub-codes, then with only sub-code i (the others' embeddings zeroed), as in the paper's Fig. 3
    cols = [x, tok.decode_codes(codes)] + [tok.decode_codes(codes, keep=[i]) for i in range(tok.cfg.num_codebooks)]
    titles = ["original", "reconstruction"] + [f"only {i} ({b})" for i, b in enumerate(tok.cfg.branch_names)]
    s = max(1, 128 // max(x.shape[-2:]))                      # small images are enlarged so that the titles fit
    grid = torch.stack([to_uint8(c) for c in cols], 1).repeat_interleave(s, -1).repeat_interleave(s, -2)
    n, c, _, h, w = grid.shape                                # (n, c, 3, h, w) -> (n*h, c*w, 3)
    img = Image.new("RGB", (c * w, header + n * h), "white")  # a white strip on top for the column titles
    img.paste(Image.fromarray(grid.permute(0, 3, 1, 4, 2).reshape(n * h, c * w, 3).cpu().numpy()), (0, header))
    for j, title in enumerate(titles):                        # PIL's default font: no font file needed
        ImageDraw.Draw(img).text((j * w + 4, 4), title, fill="black")
    write_figure(img, path)


def pca(x, dims=2):
    """x (N, d) projected on its top `dims` principal axes -> (N, dims)."""
    x = x - x.mean(0)                                         # centre: the axes of the covariance
    return x @ torch.linalg.svd(x, full_matrices=False).Vh[:dims].T   # rows of Vh = principal axes, largest first


def tsne(x, perplexity=30.0, steps=750):
    """Exact t-SNE (van der Maaten & Hinton 2008) of x (N, d) -> (N, 2), the embedding of the paper's Fig. 4: Gaussian
    affinities with a per-point bandwidth bisected to the perplexity, a Student-t kernel, gradient descent on
    KL(P || Q) with momentum, gains and early exaggeration 12 for 250 steps, PCA start. O(N^2): ~5 s for 1000 points."""
    x, n = x.float(), len(x)
    d2 = torch.cdist(x, x).pow(2)                             # (N, N) squared distances
    # scale-free: distances over their mean; eye masks p_ii (a point is not its own neighbour)
    d2, eye = d2 / d2.mean().clamp(min=1e-12), torch.eye(n, dtype=torch.bool, device=x.device)
    lo, hi = torch.full_like(d2[:, :1], -20.0), torch.full_like(d2[:, :1], 20.0)   # (N, 1) log(beta) brackets
    for _ in range(64):                                       # bisection on log(beta), beta = 1 / (2 sigma_i^2)
        mid = (lo + hi) / 2
        p = torch.softmax((-d2 * mid.exp()).masked_fill(eye, -math.inf), 1)   # p_j|i, rows sum to 1
        # entropy above log(perplexity): the kernel is too wide, raise beta. The perplexity is capped at (N - 1) / 3
        # so that a small set (few images, a test) still has a reachable target: it cannot exceed N - 1
        wide = torch.special.entr(p).sum(1, keepdim=True) > math.log(min(perplexity, (n - 1) / 3))
        lo, hi = torch.where(wide, mid, lo), torch.where(wide, hi, mid)   # keep the half that holds the target
    p = (p + p.T) / (2 * n)                                   # symmetric joint affinities
    y = pca(x)                                                # PCA start: deterministic, no random init
    y = y / y[:, 0].std().clamp(min=1e-12) * 1e-4             # tiny start, std 1e-4 on the first axis
    # velocity, per-coordinate gains and scikit-learn's "auto" learning rate max(N / early exaggeration / 4, 50)
    v, gains, lr = torch.zeros_like(y), torch.ones_like(y), max(n / 48, 50.0)
    for step in range(steps):
        sq = y.pow(2).sum(1)                                  # Student-t kernel 1 / (1 + |y_i - y_j|^2); Q = num / sum
        num = torch.addmm(sq[:, None] + sq + 1, y, y.T, alpha=-2).reciprocal().masked_fill(eye, 0)
        m = ((12.0 if step < 250 else 1.0) * p - num / num.sum()) * num   # (P_ij (x12 early) - Q_ij) num_ij
        grad = 4 * (m.sum(1, keepdim=True) * y - m @ y)       # dKL/dy_i = 4 sum_j m_ij (y_i - y_j)
        # gains (Jacobs 1988): +0.2 where grad and v differ in sign (still heading downhill), x0.8 where they agree
        gains = torch.where((grad > 0) != (v > 0), gains + 0.2, gains * 0.8).clamp(min=0.01)
        v = (0.5 if step < 250 else 0.8) * v - lr * gains * grad   # momentum 0.5, then 0.8 after exaggeration
        y = y + v
    return y


@torch.no_grad()
# paper-map: Fig. 4
def figure4(tok, dataset, path, n_classes, method, batch_size, max_points=1000, panel=320, header=20, legend=24):
    """Fig. 4: the codebook vector of each token of the images of n_classes classes (evenly spaced in the class list,
    <= 50 images each, max_points tokens at random) in 2-D, one panel per sub-codebook, coloured by class."""
    classes = torch.linspace(0, len(dataset.classes) - 1, n_classes).round().long().unique().tolist()
    idx = [i for c in classes for i in [j for j, (_, y) in enumerate(dataset.samples) if y == c][:50]]   # <= 50 each
    images = {i: x for i, x in ((i, dataset[i]) for i in idx) if x[1] >= 0}        # unreadable files left out
    idx, device = [i for i in idx if i in images], next(tok.parameters()).device  # the images go to the tokenizer
    if not idx:                                               # every file of these classes unreadable (or none)
        raise ValueError(f"no readable image in the Fig. 4 classes {', '.join(dataset.classes[c] for c in classes)}")
    classes = [c for c in classes if any(dataset.samples[i][1] == c for i in idx)]   # a class of unreadable files: out
    codes = torch.cat([tok.encode(torch.stack([images[i][0] for i in idx[s:s + batch_size]]).to(device))
                       for s in range(0, len(idx), batch_size)])                    # (N, k, h, w)
    # one label per token: the image's position in `classes` (a PALETTE index), repeated h*w times -> (N*h*w,)
    labels = torch.tensor([classes.index(dataset.samples[i][1]) for i in idx]).repeat_interleave(codes[0, 0].numel())
    keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:max_points]   # same tokens per run
    img = Image.new("RGB", (tok.cfg.num_codebooks * panel, header + panel + legend), "white")
    draw = ImageDraw.Draw(img)
    for i, branch in enumerate(tok.branches):
        z = branch.quantize.codebook()[codes[:, i]].flatten(0, 2)[keep.to(device)]   # (N, h, w, d) -> (max_points, d)
        y = (tsne(z) if method == "tsne" else pca(z)).cpu()       # (max_points, 2)
        y = (y - y.min(0).values) / (y.max(0).values - y.min(0).values).clamp(min=1e-12) * (panel - 20) + 10  # px
        draw.text((i * panel + 6, 4), f"sub-codebook {i} ({tok.cfg.branch_names[i]})", fill="black")
        draw.rectangle([i * panel, header, (i + 1) * panel - 1, header + panel - 1], outline=(200, 200, 200))
        for (u, w), c in zip(y.tolist(), labels[keep].tolist()):   # one dot of radius 2 px per token
            draw.ellipse([i * panel + u - 2, header + w - 2, i * panel + u + 2, header + w + 2], fill=PALETTE[c])
    x0 = 6
    for c, name in enumerate(dataset.classes[j] for j in classes):     # legend: a coloured square per class
        draw.rectangle([x0, header + panel + 7, x0 + 10, header + panel + 17], fill=PALETTE[c])
        draw.text((x0 + 14, header + panel + 6), name, fill="black")
        x0 += 24 + int(draw.textlength(name))
    write_figure(img, path)


def line_plot(panels, path, panel=(380, 280), margin=(48, 26, 16, 40)):
    """Line plots side by side, one per panel dict: "title", "x" (axis name), "series" {name: [(x, mean, std or
    None)]}, optional "levels" {name: y} (dashed, grey) and "log_x" (log2 x axis). Error bars are +- std.
    Used by ablate.py for its sweeps (--table cfg)."""
    (pw, ph), (left, top, right, bottom) = panel, margin
    legend = 16 * max(len(p["series"]) + len(p.get("levels", {})) for p in panels)
    img = Image.new("RGB", (pw * len(panels), ph + legend), "white")
    draw = ImageDraw.Draw(img)
    for n, p in enumerate(panels):
        fx = (lambda v: math.log2(v)) if p.get("log_x") else float
        pts = [(fx(x), y, e or 0) for s in p["series"].values() for x, y, e in s]
        ys = [y + d for _, y, e in pts for d in (-e, e)] + list(p.get("levels", {}).values())
        (x0, x1), (y0, y1) = (min(v[0] for v in pts), max(v[0] for v in pts)), (min(ys), max(ys))
        pad = 0.05 * (y1 - y0 or 1)                                   # a little air above and below, none below 0
        y0, y1 = (y0 - pad if y0 < 0 or y0 - pad >= 0 else 0), y1 + pad
        u = lambda x: n * pw + left + (fx(x) - x0) / ((x1 - x0) or 1) * (pw - left - right)   # data -> pixels
        v = lambda y: top + (y1 - y) / (y1 - y0) * (ph - top - bottom)
        draw.rectangle([n * pw + left, top, (n + 1) * pw - right, ph - bottom], outline=(160, 160, 160))
        draw.text((n * pw + left, 6), p["title"], fill="black")
        draw.text((n * pw + left, ph - 16), p["x"], fill="black")
        for y in (y0, (y0 + y1) / 2, y1):                             # three y ticks
            draw.text((n * pw + 4, v(y) - 6), f"{y:.3g}", fill="black")
        for x in sorted({x for s in p["series"].values() for x, _, _ in s}):   # x ticks at the measured points
            draw.text((u(x) - 8, ph - bottom + 4), f"{x:g}", fill="black")
        for c, (name, y) in enumerate(p.get("levels", {}).items()):   # dashed reference levels
            for a in range(n * pw + left, (n + 1) * pw - right, 8):
                draw.line([a, v(y), a + 4, v(y)], fill=(120, 120, 120))
            draw.text(((n + 1) * pw - right - draw.textlength(name) - 2, v(y) - 12), name, fill=(90, 90, 90))
            draw.text((n * pw + left, ph + 16 * (len(p["series"]) + c)), f"- - {name} ({y:.3g})", fill=(90, 90, 90))
        for c, (name, s) in enumerate(p["series"].items()):
            s = sorted(s, key=lambda t: fx(t[0]))
            draw.line([(u(x), v(y)) for x, y, _ in s], fill=PALETTE[c], width=2)
            for x, y, e in s:                                         # a dot and its error bar per point
                draw.line([u(x), v(y - (e or 0)), u(x), v(y + (e or 0))], fill=PALETTE[c])
                draw.ellipse([u(x) - 3, v(y) - 3, u(x) + 3, v(y) + 3], fill=PALETTE[c])
            draw.rectangle([n * pw + left, ph + 16 * c + 3, n * pw + left + 10, ph + 16 * c + 13], fill=PALETTE[c])
            draw.text((n * pw + left + 14, ph + 16 * c + 2), name, fill="black")
    write_figure(img, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer-ckpt", default=os.path.join(ROOT, "weights", "tiny_tokenizer.pt"),
                   help="our checkpoint or an official FQGAN one (default: the shipped weights/tiny_tokenizer.pt)")
    p.add_argument("--data-path", default=os.path.join(BUNDLED, "val"), help="ImageFolder root, center-cropped at the "
                   "model's resolution (default: data/photos/val)")
    p.add_argument("--out-dir", default=os.path.join("runs", "figures"), help="fig3.png and fig4.png go here "
                   "(default: %(default)s)")
    p.add_argument("--fig3-images", type=int, default=4, help="rows of Fig. 3, images spread over the data set (4)")
    p.add_argument("--fig4-classes", type=int, default=4, help=f"classes in Fig. 4, 1..{len(PALETTE)} (the paper: 4)")
    p.add_argument("--fig4-method", default="tsne", choices=["tsne", "pca"], help="2-D embedding (the paper: t-SNE)")
    p.add_argument("--batch-size", type=int, default=32, help="images per encode (32)")
    args = p.parse_args(argv)
    one_process_only(p)
    # every value checked before any work: one line naming the flag and its range, exit 2
    check_flags(p, args, ("fig3_images", 1 <= args.fig3_images <= 64, "an integer in 1..64"),
                ("fig4_classes", 1 <= args.fig4_classes <= len(PALETTE), f"an integer in 1..{len(PALETTE)}"),
                ("batch_size", args.batch_size >= 1, "an integer >= 1"))
    try:                                                      # a bad file or folder: one line, exit 2
        tok = load_tokenizer(args.tokenizer_ckpt)             # ours or official FQGAN, eval mode
        dataset = ImageFolder(args.data_path, tok.cfg.image_shape, train=False)
    except (CheckpointError, FileNotFoundError) as e:
        p.error(str(e))
    # Fig. 3 rows: images evenly spread over the (class-sorted) data set, so different classes show; an unreadable
    # file gives way to the next readable image
    spread = torch.linspace(0, len(dataset) - 1, min(args.fig3_images, len(dataset))).round().long().tolist()
    rows = [dataset.first_readable(i) for i in spread]        # (image, label, index, skipped) or None
    if rows[0] is None:                                       # not even the first spread position has one after it
        p.error(f"--data-path {args.data_path}: none of its {len(dataset)} images could be read")
    made = not os.path.isdir(args.out_dir)
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:                                      # a file there, or in its path
        p.error(f"--out-dir {args.out_dir}: cannot be made a folder ({e.strerror})")
    try:                                                      # first: no Fig. 3 is written without its Fig. 4
        figure4(tok, dataset, os.path.join(args.out_dir, "fig4.png"), args.fig4_classes, args.fig4_method,
                args.batch_size)
    except ValueError as e:                                   # every image of the chosen classes unreadable
        os.rmdir(args.out_dir) if made else None             # refused: the folder it made goes (it is empty)
        p.error(f"--data-path {args.data_path}: {e}")
    figure3(tok, torch.stack([r[0] for r in rows if r is not None]), os.path.join(args.out_dir, "fig3.png"))


if __name__ == "__main__":
    main()
