"""Images in and out, shared by the entry scripts: the ImageFolder layout, the official crops, uint8, atomic PNGs.

Paper: "Factorized Visual Tokenization and Generation", Bai et al., arXiv 2411.16681, Sec. 4.1 (ImageNet 256x256).
The crops follow the official scripts (docs/official_code.md §3.2, §4.1): a random resized crop + flip to train,
ADM's centre crop to evaluate, and ADM's truncating uint8 conversion for everything that is written or measured.
The models (quantizer, tokenizer, losses, far) never import this file; the scripts do.

  ImageFolder     root/<class>/<image> -> (image (3, H, W) in [-1, 1], class, ...); unreadable files skipped, counted
  StreamSampler   an endless, rank-sharded stream of epochs that resumes at an exact sample; stream: its batches
  release_free_memory  the heap's free pages back to the kernel before a DataLoader forks its workers
  to_uint8        [-1, 1] -> uint8 exactly as the official sampler writes its PNGs
  image_batches   uint8 batches (with their indices) streamed from an ADM npz or a folder, or a rank's share of
                  them (evaluate.py's generation mode; check_sample_set: can it read this path)
  write_npz_by_ranks  sample.py's npz, each rank's batches in its own part file (none left on any early end),
                  joined in order by write_npz (npz_parts); remove_left_parts: those a killed run left
  labelled_samples  a sample set with its class ids (npz labels or class folders); real_crops: seeded random crops
  save_png        atomic PNG writer (temp file + os.replace); save_grid draws a batch as one grid
"""
import atexit
import ctypes
import glob
import math
import multiprocessing
import os
import re
import signal
import sys
import zipfile

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from checkpoints import STOP, catch_stop_signals, check_free_space, memmap, release_stop_signals, wait_for_ranks

# The bundled photo set (data/README.md): 11 classes, train tiles and a held-out strip; the tiny presets' data.
BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "photos")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


# --------------------------------------------------------------------------------------------------------------
# Crops and conversions

def _halve_then_resize(img, short_side):
    """Resize so that the short side is `short_side`: BOX halvings first while the image is >= 2x too large (ADM's
    cheap anti-aliasing), then one bicubic resize."""
    while min(img.size) >= 2 * short_side:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = short_side / min(img.size)
    return img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)


def random_crop(img, size, g, max_scale=1 / 0.8, scale_of=None):
    """Official training augmentation (docs/official_code.md §3.2): short side to S ~ U{s..s/0.8} with s = max(size),
    a random (H, W) crop, a horizontal flip with probability 1/2. max_scale sets the top of the range, S ~ U{s..s *
    max_scale} (the tiny recipe's 3.0 also shows the photos at the scale of the 128 px val tiles). scale_of: draw S
    as for crops of that size instead (s = max(scale_of)), so that a smaller crop is a window of what a scale_of crop
    would see, at the same scale (train_tokenizer.py --low-res-steps), not the whole of it shrunk.

    Every random number comes from the torch.Generator g, which the dataset seeds per (seed, epoch, index): a resumed
    run sees the same crops as an uninterrupted one, whatever the number of loader workers.
    """
    h, w = size
    s = max(scale_of or size)                                         # the scale's reference size
    img = _halve_then_resize(img, int(torch.randint(s, round(s * max_scale) + 1, (1,), generator=g)))
    top = int(torch.randint(0, img.size[1] - h + 1, (1,), generator=g))
    left = int(torch.randint(0, img.size[0] - w + 1, (1,), generator=g))
    img = img.crop((left, top, left + w, top + h))
    return img.transpose(Image.FLIP_LEFT_RIGHT) if torch.rand((), generator=g) < 0.5 else img


def center_crop(img, size):
    """Evaluation crop (ADM's center_crop_arr, docs/official_code.md §4.1): short side to max(size), centre crop."""
    h, w = size
    img = _halve_then_resize(img, max(h, w))
    left, top = (img.size[0] - w) // 2, (img.size[1] - h) // 2
    return img.crop((left, top, left + w, top + h))


def to_tensor(img):
    """PIL RGB -> (3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.array(img, np.uint8)).permute(2, 0, 1).float() / 127.5 - 1   # (H, W, 3) -> (3, H, W)


def to_uint8(x):
    """Images (B, 3, H, W) in [-1, 1] -> uint8 (B, 3, H, W) as the official sampler writes its PNGs
    (docs/official_code.md §6.3): uint8(clamp(127.5 x + 128, 0, 255)), a truncating cast, i.e. round half up, so a
    crop that went through to_tensor comes back to its own pixels."""
    return (127.5 * x + 128).clamp(0, 255).to(torch.uint8)


def open_rgb(path):
    """The image at path as RGB (grayscale / RGBA / CMYK / 16-bit converted), or None if it cannot be read (missing,
    empty, truncated, not an image, a decompression bomb). Callers skip and count such files; nothing is substituted.
    PIL opens 16-bit grayscale as mode I;16 (I for 32-bit integers), whose convert("RGB") clips at 255: white. Those
    are scaled to 8 bits here (I: as 16-bit when any value exceeds 255), floats (F) from [0, 1]."""
    try:
        with Image.open(path) as img:
            if img.mode.startswith("I") or img.mode == "F":
                a = np.asarray(img, dtype=np.float64)
                top = 1.0 if img.mode == "F" else 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
                img = Image.fromarray((np.clip(a / top, 0, 1) * 255 + 0.5).astype(np.uint8))   # 257 v -> v exactly
            return img.convert("RGB")                                 # convert() forces the full decode
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def list_images(root):
    """Every image file under root, at any depth, sorted (a sample folder for evaluate.py)."""
    return sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names if f.lower().endswith(IMAGE_EXTS))


# --------------------------------------------------------------------------------------------------------------
# Datasets

class ImageFolder(Dataset):
    """root/<class>/<image>, classes in alphabetical order (as torchvision's ImageFolder).

    Item (index, epoch), or a plain index for epoch 0 -> (image (3, H, W) in [-1, 1], label, index, skipped):
      train=True   random_crop seeded by (seed, epoch, index). An unreadable file is replaced by the next readable one
                   (batches keep their size); `skipped` files were passed over, namely index, index+1, ... (mod N),
                   so the loop can count distinct unreadable files, not draws.
      train=False  center_crop. An unreadable file gives zeros and label -1 (skipped = 1): evaluation drops and counts
                   it, never measures a neighbour twice.
    cache_mib: training photos stay decoded in memory, up to that many MiB of pixels per process (each loader worker
    fills its own; the crops are still cut fresh from them): a folder that fits (the 44 bundled photos: 8.25 MiB) is
    decoded once per worker instead of once per crop; 0 decodes every time (ImageNet-sized folders).
    """

    def __init__(self, root, size, train=True, seed=0, only=None, exclude=(), max_scale=1 / 0.8, scale_of=None,
                 cache_mib=0):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data folder not found: {root} (expected root/<class>/<image> files)")
        entries = os.listdir(root)
        self.classes = sorted(d for d in entries if os.path.isdir(os.path.join(root, d)))
        # a flat folder of images (no class folders) is one class, "" (label 0): enough for the tokenizer, not FAR
        self.flat = not self.classes and any(f.lower().endswith(IMAGE_EXTS) for f in entries)
        self.classes = [""] if self.flat else self.classes
        unknown = sorted((set(only or ()) | set(exclude)) - set(self.classes))
        if unknown:
            raise ValueError(f"no class {', '.join(unknown)} under {root}; its classes: {', '.join(self.classes)}")
        # only / exclude pick classes (held-out photos); labels stay the alphabetical rank among all classes
        keep = [c for c in self.classes if (only is None or c in only) and c not in exclude]
        self.samples = [(os.path.join(root, c, f), i) for i, c in enumerate(self.classes) if c in keep
                        for f in sorted(os.listdir(os.path.join(root, c))) if f.lower().endswith(IMAGE_EXTS)]
        # class folders without images keep their id (the ids of the others do not move); scripts name them
        self.empty = sorted(set(keep) - {self.classes[label] for _, label in self.samples})
        if not self.samples:
            raise FileNotFoundError(f"no images under {root}/<class>/ (extensions {', '.join(IMAGE_EXTS)})")
        self.root, self.size, self.train, self.seed, self.max_scale = root, tuple(size), train, seed, max_scale
        self.scale_of = scale_of                                      # random_crop's: crops at another size's scale
        self.cache, self.cache_room = {}, cache_mib * 2**20           # path -> decoded photo; bytes still free

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, item):
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        if not self.train:
            path, label = self.samples[index]
            img = open_rgb(path)
            if img is None:
                return torch.zeros(3, *self.size), -1, index, 1
            return to_tensor(center_crop(img, self.size)), label, index, 0
        for skipped in range(len(self.samples)):                      # the next readable file stands in
            path, label = self.samples[(index + skipped) % len(self.samples)]
            img = self._photo(path)
            if img is not None:
                g = torch.Generator().manual_seed(hash((self.seed, epoch, index)) % 2**62)
                return to_tensor(random_crop(img, self.size, g, self.max_scale, self.scale_of)), label, index, skipped
        raise RuntimeError(f"none of the {len(self.samples)} images under the data folder could be read")

    def first_readable(self, start=0):
        """The first item at or after index `start` whose file can be read (eval crops: an unreadable one has label
        -1), or None: one read for a healthy folder."""
        return next((item for item in map(self.__getitem__, range(start, len(self))) if item[1] >= 0), None)

    def _photo(self, path):
        """open_rgb(path), decoded once while the cache has room (an unreadable file is tried again each time)."""
        img = self.cache.get(path)
        if img is None:
            img = open_rgb(path)
            if img is not None and img.width * img.height * 3 <= self.cache_room:   # RGB, 8 bits per channel
                self.cache[path], self.cache_room = img, self.cache_room - img.width * img.height * 3
        return img


def unreadable_files(index, skipped, n):
    """The dataset indices an ImageFolder batch passed over: for each item, index .. index + skipped - 1 (mod n)."""
    return {(i + j) % n for i, s in zip(index.tolist(), skipped.tolist()) for j in range(s)}


class StreamSampler(DistributedSampler):
    """This rank's share of an endless stream of epochs, each a DistributedSampler permutation (seed + epoch),
    starting `start` samples in; yields (index, epoch). Resuming at step s starts at s * local batch, so one
    DataLoader serves the whole run (no worker restarts at epoch ends) and the data position is exact."""
    start = 0

    def __iter__(self):
        epoch, offset = divmod(self.start, self.num_samples)
        while True:
            self.set_epoch(epoch)
            yield from ((i, epoch) for i in list(super().__iter__())[offset:])
            epoch, offset = epoch + 1, 0


def release_free_memory():
    """Call right before a DataLoader forks its workers. On a CPU the scripts keep freed memory in the heap
    (checkpoints.keep_freed_memory), resident; a forked worker shares those pages copy-on-write, so each one the main
    process then reuses for an activation is copied at a page fault while the workers live. glibc's malloc_trim(0)
    hands the free pages back first, and the main process faults fresh zero pages in as on its first use: without it
    a second code extraction (2 workers) in one process took about twice the first (docs/results.md, "The test suite").
    No-op where the libc has no malloc_trim (musl, macOS)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def stream(dataset, batch, seed, rank, world, step, num_workers, pin_memory=False):
    """This rank's endless batches of dataset from training step `step` on, exactly as an uninterrupted run would
    see them: one StreamSampler (every rank the same permutation per epoch, each its share), started at step * batch.
    The loader draws its worker seeds from its own generator, not from the global RNG that dropout uses."""
    sampler = StreamSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    sampler.start = step * batch                                      # the exact data position on resume
    if num_workers > 0:                                               # registered once, after multiprocessing's
        atexit.unregister(kill_loader_workers)
        atexit.register(kill_loader_workers)
        release_free_memory()                                         # the workers are forked just below
    return iter(DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                           persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed + rank),
                           worker_init_fn=ignore_stop_signals))


def ignore_stop_signals(_worker_id):
    """Loader workers leave SIGTERM / SIGINT to the main process, which saves and then shuts them down."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def kill_loader_workers():
    """At exit, kill the loader workers still alive. An uncaught exception (a bug, CUDA out of memory) leaves its
    DataLoader open: the traceback keeps the training loop's frame, and so the loader, alive. multiprocessing's own
    exit handler then stops the workers with SIGTERM, which they ignore (above), and waits for them: forever, and the
    job would hold its GPUs. SIGKILL cannot be ignored; registered after multiprocessing's handler, this runs first."""
    for worker in multiprocessing.active_children():
        worker.kill()


# --------------------------------------------------------------------------------------------------------------
# Sample sets: ADM's npz (arr_0 uint8 N x H x W x 3, what sample.py writes) or a folder of images

def npz_header(path):
    """(N, H, W) of the ADM npz at path, or ValueError naming the file and what is wrong with it."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = getattr(np.lib.format, f"read_array_header_{version[0]}_0")(f)
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not an npz file (not a zip archive; truncated?)") from None
    except KeyError:
        raise ValueError(f"{path} has no arr_0 array (the ADM layout: arr_0 uint8 N x H x W x 3)") from None
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran:
        raise ValueError(f"{path}: arr_0 must be uint8 N x H x W x 3 (ADM layout), got {dtype} {shape}")
    if shape[0] == 0:
        raise ValueError(f"{path} holds 0 images")
    return shape[:3]


def check_sample_set(path):
    """ValueError naming the file and the fault unless path is a sample set image_batches can read: an npz in ADM's
    layout (only its header is read) or a folder with images."""
    if os.path.isfile(path) and not path.endswith(".npz"):
        raise ValueError(f"{path}: a file that is not an .npz; give an npz (arr_0: N x H x W x 3 uint8, what "
                         "sample.py --out-npz writes) or a folder of images")
    if path.endswith(".npz"):
        npz_header(path)
    elif not list_images(path):
        raise ValueError(f"{path}: no images (extensions {', '.join(IMAGE_EXTS)})")


def image_batches(path, batch_size, size=None, unreadable=None, shard=(0, 1)):
    """(index (B,), uint8 (B, 3, H, W)) batches from an npz (arr_0: N x H x W x 3 uint8, the ADM layout sample.py
    writes; streamed from the zip, never loaded whole) or from the images of a folder at any depth (center crop to
    `size`, default the first readable image's size, of this share; unreadable files are skipped and appended to
    `unreadable`).
    index: each image's position in the npz, or in the folder's sorted listing (list_images). shard=(r, W): rank r's
    share of W: a folder's files r, r + W, ... (decoding them is the cost: each rank decodes only its own), an npz's
    batches r, r + W, ... (the others are read past)."""
    rank, world = shard
    if path.endswith(".npz"):
        n, h, w = npz_header(path)
        if size is not None and (h, w) != tuple(size):
            raise ValueError(f"{path}: images are {h}x{w}, the samples {size[0]}x{size[1]}")
        with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            getattr(np.lib.format, f"read_array_header_{version[0]}_0")(f)   # skip the header
            for b, start in enumerate(range(0, n, batch_size)):
                m = min(batch_size, n - start)
                data = f.read(m * h * w * 3)                          # read past the batches of other ranks
                if b % world == rank:
                    arr = np.frombuffer(data, np.uint8).reshape(m, h, w, 3)
                    x = torch.from_numpy(arr.copy()).permute(0, 3, 1, 2)   # (B, H, W, 3) -> (B, 3, H, W)
                    yield torch.arange(start, start + m), x
        return
    files, batch, index = list_images(path), [], []
    for i in range(rank, len(files), world):
        img = open_rgb(files[i])
        if img is None:
            unreadable.append(files[i]) if unreadable is not None else None
            continue
        size = size or (img.size[1], img.size[0])
        batch.append(torch.from_numpy(np.array(center_crop(img, size))).permute(2, 0, 1))   # (H, W, 3) -> (3, H, W)
        index.append(i)
        if len(batch) == batch_size:
            yield torch.tensor(index), torch.stack(batch)
            batch, index = [], []
    if batch:
        yield torch.tensor(index), torch.stack(batch)


def labelled_samples(path, classes):
    """A labelled sample set, its labels as ids into `classes` (the stand-in teacher's, evaluate.py): an npz with
    `labels` (sample.py's: the FAR's ids, and their names in `classes` when the FAR has them) or a folder
    root/<class name>/<image> of names in `classes` -> (uint8 (N, 3, H, W), labels (N,), unreadable files)."""
    unreadable = []
    if path.endswith(".npz"):
        with np.load(path) as f:
            if "labels" not in f:
                raise ValueError(f"{path} has no labels array (sample.py --out-npz writes one)")
            labels = torch.from_numpy(f["labels"]).long()             # (N,) the FAR's class ids
            names = list(f["classes"]) if "classes" in f else None    # (C,) the FAR's class names, id = index
        if names is not None:                                         # FAR's id -> the teacher's id of that name
            if len(labels) and not 0 <= labels.min() <= labels.max() < len(names):
                raise ValueError(f"{path}: labels in [{labels.min()}, {labels.max()}] for {len(names)} class names")
            if set(names) - set(classes):                             # a FAR of other classes than the teacher's
                raise ValueError(f"{path}: the FAR's classes {', '.join(sorted(set(names) - set(classes))[:10])} are "
                                 f"not among the teacher's ({', '.join(classes)})")
            labels = torch.tensor([classes.index(n) for n in names])[labels]   # e.g. a FAR of 3 of the 11 photos
        x = torch.cat([x for _, x in image_batches(path, 1024)])      # (N, 3, H, W) uint8: sample sets are small here
    else:
        folders = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
        if not folders or set(folders) - set(classes):
            raise ValueError(f"{path}: needs class folders named as the teacher's classes ({', '.join(classes)}), "
                             f"found {', '.join(folders) or 'none'}")
        parts = [(torch.cat([x for _, x in image_batches(os.path.join(path, c), 1024, unreadable=unreadable)]),
                  classes.index(c))
                 for c in folders if list_images(os.path.join(path, c))]
        x, labels = torch.cat([p for p, _ in parts]), torch.cat([torch.full((len(p),), c) for p, c in parts])
    if len(x) != len(labels) or labels.min() < 0 or labels.max() >= len(classes):
        raise ValueError(f"{path}: {len(labels)} labels in [{labels.min()}, {labels.max()}] for {len(x)} images; the "
                         f"teacher knows {len(classes)} classes (ids 0..{len(classes) - 1})")
    return x, labels, unreadable


def real_crops(root, size, n, seed):
    """n random crops (uint8 (n, 3, H, W), labels (n,)) of the photos under root, cycling through them: the crops FAR's
    tiny recipe trains on (images.random_crop, scale up to 1.25, flips), drawn from one seeded generator."""
    folder = ImageFolder(root, size, train=False)                     # lists root/<class>/<image>
    photos = [(open_rgb(path), label) for path, label in folder.samples]
    photos = [(img, label) for img, label in photos if img is not None]   # unreadable files: left out
    g = torch.Generator().manual_seed(seed)
    x = torch.stack([to_uint8(to_tensor(random_crop(photos[i % len(photos)][0], size, g))) for i in range(n)])
    return x, torch.tensor([photos[i % len(photos)][1] for i in range(n)]), folder.classes


def write_npz(path, files, batch, labels, classes=None):
    """The ADM npz (arr_0 uint8 (N, H, W, 3), labels (N,), and the class names of the ids when known: classes (C,)
    str, so that a reader maps them by name, evaluate.py) at path, atomically, from the per-rank part files of
    sample.py (.npy, removed here, whatever happens): global batch b is rows (b // W) * batch onwards of part b % W.
    arr_0 is streamed into the zip batch by batch, in global order: no N x H x W x 3 array in memory (50,000 x 256 x
    256 x 3 is 9.8 GB). A failed write (a full disk) is an OSError of one line, with no npz and no temp file left."""
    parts = [np.load(f, mmap_mode="r") for f in files]
    n, (h, w), tmp = len(labels), parts[0].shape[1:3], f"{path}.tmp{os.getpid()}"
    try:
        with zipfile.ZipFile(tmp, "w") as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:   # what np.savez would write, piece by piece
                np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (n, h, w, 3)})
                for b in range(-(-n // batch)):
                    rows = parts[b % len(parts)][(b // len(parts)) * batch:][:min(batch, n - b * batch)]
                    f.write(np.ascontiguousarray(rows).tobytes())
            with zf.open("labels.npy", "w") as f:
                np.lib.format.write_array(f, np.asarray(labels))
            if classes:                                               # a unicode array: no pickle to read it
                with zf.open("classes.npy", "w") as f:
                    np.lib.format.write_array(f, np.asarray(classes, dtype=str))
        os.replace(tmp, path)                                         # complete or absent
    except OSError as e:
        raise OSError(f"could not write {path} ({e.strerror or e})") from None
    finally:
        for f in [tmp, *files]:
            os.remove(f) if os.path.exists(f) else None


def npz_parts(path, world):
    """The part files of sample.py's ranks for the npz at path, one per rank: path.part<rank>.npy (write_npz's
    input)."""
    return [f"{path}.part{r}.npy" for r in range(world)]


def remove_left_parts(path, world):
    """Remove the files beside path that a killed sample.py run left (SIGKILL: no handler runs; GBs each): its part
    files (npz_parts) and write_npz's temp file path.tmp<pid>, but for this run's world parts (each rank rewrites its
    own, and may have opened it already). Returns their names."""
    keep = npz_parts(path, world)
    left = sorted(f for f in glob.glob(glob.escape(path) + ".*")
                  if re.fullmatch(r"\.(part\d+\.npy|tmp\d+)", f[len(path):]) and f not in keep)
    for f in left:
        os.remove(f)
    return left


def write_npz_by_ranks(path, labels, batch, image_shape, make_batch, rank, world, classes=None):
    """The ADM npz of labels' images at path (write_npz), made across the ranks in global batches of `batch` labels:
    rank b % world calls make_batch(b, labels of batch b) -> uint8 (B, 3, H, W) and keeps the images in its own part
    file (never two writers of a file: a uint8 memory map, its blocks allocated now, so a full disk is one line, not a
    bus error); rank 0 streams the parts into path in global order: the same npz for any number of ranks. Rank 0 first
    removes what killed runs left (GBs) and checks room for the images twice (the parts, the npz). A stop signal is
    acted on after the batch: one line, exit 128 + signal. Whatever ends early (a signal, an error, a second Ctrl-C)
    leaves no part file: rank 0 removes every rank's (the others may be past their wait), the others their own."""
    n, parts = len(labels), npz_parts(path, world)
    mine = range(rank, -(-n // batch), world)                         # this rank's global batches, of ceil(n / batch)
    rows = sum(len(labels[b * batch:(b + 1) * batch]) for b in mine)  # its images: the last batch may be short
    catch_stop_signals()                     # SIGTERM / Ctrl-C: noted, acted on after the batch (a second: at once)
    try:
        if rank == 0:
            for f in remove_left_parts(path, world):
                print(f"removed {f}, left by a run of sample.py that was killed")
            check_free_space(os.path.dirname(os.path.abspath(path)), 2 * n * 3 * math.prod(image_shape), "the samples")
        part = memmap(parts[rank], np.uint8, (rows, *image_shape, 3))
        try:
            for i, b in enumerate(bar := tqdm(mine, desc="sample", disable=rank != 0, dynamic_ncols=True)):
                x = make_batch(b, labels[b * batch:(b + 1) * batch])
                part[i * batch:i * batch + len(x)] = x.permute(0, 2, 3, 1).numpy()   # (B, 3, H, W) -> (B, H, W, 3)
                if STOP:
                    break
            bar.close()
            part.flush()                                              # in the file for write_npz (and any rank)
            if STOP or not wait_for_ranks():                          # every rank's part written, or a signal
                print(f"stopped by {signal.Signals(STOP['signal']).name}; no {path} written", flush=True) \
                    if rank == 0 else None
                sys.exit(128 + STOP["signal"])                        # nothing to resume from: nothing is kept
            if rank == 0:                        # a signal now is noted and the npz finished: the work is done
                write_npz(path, parts, batch, labels.numpy(), classes)   # atomic; the parts are removed
        except BaseException:
            del part                                                  # the only reference to the map
            for f in parts if rank == 0 else parts[rank:rank + 1]:
                os.remove(f) if os.path.exists(f) else None
            raise
    finally:
        release_stop_signals()


# --------------------------------------------------------------------------------------------------------------
# Writing PNGs

def save_png(img, path):
    """Write a PIL image atomically: a temp file beside `path`, then os.replace; a failed write removes the temp file,
    so a crash never leaves a half-written PNG at `path` nor a stray temp file."""
    tmp = f"{path}.tmp{os.getpid()}.png"
    try:
        img.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_grid(x, path, nrow):
    """Images (N, 3, H, W), in [-1, 1] or already uint8, as one PNG grid, nrow images a row, 2-px black gaps."""
    x = (x if x.dtype == torch.uint8 else to_uint8(x.float())).cpu()
    n, _, h, w = x.shape                                              # one image: itself, no border
    cols, rows = min(nrow, n), -(-n // nrow)
    grid = torch.zeros(3, rows * (h + 2) + 2, cols * (w + 2) + 2, dtype=torch.uint8) if n > 1 else x[0]
    for i, image in enumerate(x if n > 1 else []):                    # black gaps: 2 px around every image
        top, left = 2 + (i // nrow) * (h + 2), 2 + (i % nrow) * (w + 2)
        grid[:, top:top + h, left:left + w] = image
    save_png(Image.fromarray(grid.permute(1, 2, 0).numpy()), path)                   # (3, H', W') -> (H', W', 3)
