"""FAR's stage 1, the codes: every training image encoded once by the tokenizer, and the dataset FAR trains on.

Paper: "Factorized Visual Tokenization and Generation", Bai et al., arXiv 2411.16681, Sec. 3.3 / 4.1: FAR models the
tokenizer's codes of ImageNet images. The paper does not describe how they are made; the released scripts take ten
crops + flips per image once and draw one of them per sample (# parity: §7.1, §7.2), and so does train_far.py:
  Views           image i -> its A crops (tencrop, flip, none, or random: 40 training crops for tiny data sets)
  extract_codes   every image once -> memory-mapped (N, A, k, h, w) codes, one shard per rank; meta.json records
                  what they were made from (tokenizer, crops, classes, files), so changed data is extracted again
  Codes           item -> (one view's codes (k, h, w), label), the view drawn from (seed, epoch, index): exact resume
Used by train_far.py (stage 2 trains on Codes). Tests: python -m pytest tests/test_train_far.py tests/test_own_data.py
"""
import glob
import hashlib
import json
import os
import signal
import sys

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from checkpoints import STOP, CheckpointError, codebook_fingerprint, memmap
from images import ImageFolder, center_crop, open_rgb, random_crop, release_free_memory, to_tensor

VIEWS = {"tencrop": 10, "flip": 2, "none": 1, "random": 40}   # views stored per image


class Views(Dataset):
    """Image i -> (A views (A, 3, H, W) in [-1, 1], label; -1 if unreadable). tencrop (# parity: §7.1): the 4 corners
    and the centre of the 1.1x ADM centre crop and their flips; flip: centre crop + its flip; none: centre crop
    (held-out images); random (tiny recipe): 40 training crops (images.random_crop, scale up to 1.25), seeded by the
    index."""

    def __init__(self, root, size, augment):   # the folder only lists the files: the crops are done here
        self.folder, self.size, self.augment = ImageFolder(root, size, train=False), size, augment

    def __len__(self):
        return len(self.folder.samples)

    def __getitem__(self, i):
        path, label = self.folder.samples[i]
        img, (h, w) = open_rgb(path), self.size                       # None when the file cannot be read
        if img is None:                                               # zeros keep the batch shape; -1 marks it
            return torch.zeros(VIEWS[self.augment], 3, h, w), -1
        if self.augment == "random":   # a few dozen photos: ten views are too few, the tiny FAR copied them
            g = torch.Generator().manual_seed(i)                      # the same views on every run and rank
            views = [random_crop(img, (h, w), g) for _ in range(VIEWS["random"])]
        elif self.augment == "tencrop":   # 256 px: centre crop to int(256 * 1.1) = 281, then five 256 crops x 2
            from torchvision.transforms.functional import ten_crop   # here: torchvision takes 1-2 s to import
            views = ten_crop(center_crop(img, (int(h * 1.1), int(w * 1.1))), [h, w])  # tl, tr, bl, br, c, flipped
        else:
            img = center_crop(img, (h, w))                            # ADM's centre crop, as evaluation (§4.1)
            views = [img, img.transpose(Image.FLIP_LEFT_RIGHT)] if self.augment == "flip" else [img]
        return torch.stack([to_tensor(v) for v in views]), label                         # (A, 3, H, W)


class Shards:
    """The row-interleaved shards of one extraction as one read-only array: row i is row i // W of shard i % W (rank r
    encoded images r, r + W, ...). Memory-mapped: loader workers share the pages, nothing is read twice."""

    def __init__(self, paths):
        self.parts = [np.load(p, mmap_mode="r") for p in paths]
        self.shape = (sum(len(p) for p in self.parts), *self.parts[0].shape[1:])

    def __getitem__(self, index):                                     # an image's row, or (row, view, ...)
        i, *rest = index if isinstance(index, tuple) else (index,)
        return self.parts[i % len(self.parts)][(i // len(self.parts), *rest)]

    def __array__(self, dtype=None, copy=None):                       # the whole array (small sets, tests)
        out = np.empty(self.shape, dtype or self.parts[0].dtype)
        for r, part in enumerate(self.parts):
            out[r::len(self.parts)] = part
        return out


@torch.no_grad()
def extract_codes(tok, root, out_dir, augment, batch_size, device, rank, world, workers=2):
    """Encode every image of root once into out_dir; returns (codes (N, A, k, h, w) as Shards, labels (N,)). Rank r
    encodes images r, r + W, ... into its own files codes.r.npy / labels.r.npy: no file is written by two processes,
    so any shared filesystem works across nodes. meta.json, written last (rank 0, after a barrier), marks a complete
    extraction and records W; an interrupted one starts over. Unreadable images get label -1: left out of training.
    `workers` processes per rank decode and crop the images while the tokenizer encodes."""
    # NOTE(paper≠code): batches into memory-mapped arrays, not one image per GPU step into one file per image and
    # branch; the same crops, in fp32 (# parity: §7.1)
    tcfg, size, views = tok.cfg, tok.cfg.image_shape, Views(root, tok.cfg.image_shape, augment)   # files listed
    # what the stored codes depend on: the model and crops (another one: refused) and the data (changed: again)
    meta = {"format": 3, "tokenizer": codebook_fingerprint(tok), "augment": augment, "size": list(size)}
    data = [{"classes": views.folder.classes, "files": len(views), "digest": data_digest(views.folder)}
            if rank == 0 else None]                                   # one rank reads the file system's metadata
    if dist.is_initialized():
        dist.broadcast_object_list(data, src=0)
    meta.update(data[0])
    shard, done = lambda name, r: os.path.join(out_dir, f"{name}.{r}.npy"), os.path.join(out_dir, "meta.json")
    stored = json.load(open(done)) if os.path.exists(done) else None   # a complete earlier extraction, if any
    if stored and stored.get("format") == 3 and {k: stored[k] for k in meta} == meta:
        return load_shards(out_dir, stored["shards"])                 # the same: reused
    if stored and stored.get("format") == 3 and any(stored[k] != meta[k] for k in ("tokenizer", "augment", "size")):
        raise CheckpointError(f"{out_dir} holds the codes of another tokenizer or other crops (made with "
                              f"{ {k: stored[k] for k in ('tokenizer', 'augment', 'size')} }); use another --out-dir")
    if stored and rank == 0:                                          # the data changed, or an older format
        print(f"the codes in {out_dir} were made from other data ({stored.get('files')} files, classes "
              f"{'the same' if stored.get('classes') == meta['classes'] else 'other'}): extracting again")
    k, A, mine = tcfg.num_codebooks, VIEWS[augment], list(range(rank, len(views), world))   # this rank's images
    dtype = np.uint16 if tcfg.codebook_size <= 2 ** 16 else np.int32  # 16384 codes fit in 2 bytes, not int64's 8
    if rank == 0 and os.path.isdir(out_dir):                          # the old marker and shards go first
        for old in glob.glob(os.path.join(glob.escape(out_dir), "*.npy")) + ([done] if stored else []):
            os.remove(old)
    if dist.is_initialized():
        dist.barrier()
    os.makedirs(out_dir, exist_ok=True)
    tmp = [shard(n, rank) + ".tmp.npy" for n in ("codes", "labels")]   # renamed into place once complete
    codes = memmap(tmp[0], dtype, (len(mine), A, k, *tcfg.grid))        # a full disk: one line now, not a bus error
    labels = memmap(tmp[1], np.int64, (len(mine),))
    loader = DataLoader(torch.utils.data.Subset(views, mine), batch_size=batch_size, num_workers=workers)   # in order
    row = 0                                                           # rows of this shard written so far
    release_free_memory() if workers > 0 else None                    # its workers are forked at the loop's start
    bar = tqdm(loader, desc=f"extract {os.path.basename(out_dir)}", disable=rank != 0, dynamic_ncols=True)
    for x, y in bar:
        b = x.shape[0]
        c = tok.encode(x.flatten(0, 1).to(device))                     # (b, A, 3, H, W) -> (b*A, 3, H, W) -> codes
        codes[row:row + b] = c.view(b, A, k, *tcfg.grid).cpu().numpy().astype(dtype)   # (b*A, ...) -> (b, A, ...)
        labels[row:row + b] = y.numpy()                               # -1 for unreadable files (Views)
        row += b
        if STOP:                                                      # preempted: nothing to save, it starts over
            bar.close()                                               # its line ends before the message
            print(f"stopped by {signal.Signals(STOP['signal']).name} during the code extraction; the next run "
                  f"extracts again", flush=True) if rank == 0 else None
            sys.exit(128 + STOP["signal"])
    codes.flush(), labels.flush()
    del codes, labels                                                 # close the maps before the rename
    for t, name in zip(tmp, ("codes", "labels")):
        os.replace(t, shard(name, rank))
    if dist.is_initialized():
        dist.barrier()                                                # every rank's shard is in place
    if rank == 0:
        bad = np.flatnonzero(np.asarray(load_shards(out_dir, world)[1]) < 0)   # unreadable: reported, skipped
        meta.update(shards=world, unreadable=len(bad))
        with open(done + ".tmp", "w") as f:
            json.dump(meta, f)
        os.replace(done + ".tmp", done)                               # last: the marker of a complete extraction
        print(f"extracted {len(views)} images x {A} views from {root} ({world} shards): {len(bad)} unreadable, "
              f"skipped" + "".join(f"\n  unreadable: {views.folder.samples[i][0]}" for i in bad[:5]))
    if dist.is_initialized():
        dist.barrier()                                                # no rank reads before meta.json exists
    return load_shards(out_dir, world)


def data_digest(folder):
    """16 hex digits of the file list with sizes, mtimes and labels: another value after an image is added, removed,
    replaced or moved to another class."""
    digest = hashlib.sha256()
    for path, label in folder.samples:
        st = os.stat(path)
        digest.update(f"{os.path.relpath(path, folder.root)}\t{st.st_size}\t{st.st_mtime_ns}\t{label}\n".encode())
    return digest.hexdigest()[:16]


def load_shards(out_dir, world):
    """(codes (N, A, k, h, w) as Shards, labels (N,) int64) of an extraction made by `world` ranks."""
    codes = Shards([os.path.join(out_dir, f"codes.{r}.npy") for r in range(world)])
    return codes, np.asarray(Shards([os.path.join(out_dir, f"labels.{r}.npy") for r in range(world)]))


class Codes(Dataset):
    """Item (index, epoch) -> (codes (k, h, w) int64 of one view, label). One of the A views is drawn uniformly per
    sample, the same view for all k sub-codes (# parity: §7.2); the draw is seeded by (seed, epoch, index), so resume
    is exact."""

    def __init__(self, codes, labels, seed=0):
        self.codes, self.labels, self.seed = codes, labels, seed
        self.index = np.flatnonzero(np.asarray(labels) >= 0)           # readable images only: item -> row

    def __len__(self):
        return len(self.index)

    def __getitem__(self, item):
        i, epoch = item if isinstance(item, tuple) else (item, 0)     # StreamSampler yields (index, epoch)
        # hash of a tuple of ints: the same in every process and run (no PYTHONHASHSEED salt on ints)
        g = torch.Generator().manual_seed(hash((self.seed, epoch, i)) % 2 ** 62)
        view, j = int(torch.randint(self.codes.shape[1], (), generator=g)), int(self.index[i])   # a view; its row
        return torch.from_numpy(self.codes[j, view].astype(np.int64)), int(self.labels[j])   # (k, h, w), label


if __name__ == "__main__":   # `python codes.py --help` says what is here; train_far.py runs it
    import argparse
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
