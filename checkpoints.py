"""Checkpoints and the torchrun set-up they depend on, shared by the entry scripts (the models never import it).

Paper: "Factorized Visual Tokenization and Generation", Bai et al., arXiv 2411.16681.
Every file the project reads or writes that holds weights passes through here:
  init_distributed        torchrun's RANK / WORLD_SIZE / LOCAL_RANK -> process group (NCCL on CUDA, gloo on CPU),
                          the CUDA numerics, the CPU allocator (keep_freed_memory); distribute: DDP, then
                          torch.compile; device_flag: --device; check_flags: the scripts' value checks;
                          gather_on_rank0: any object of every rank, on rank 0
  start_training, native_bf16, lr_at, resume, init_weights, open_run, save_checkpoint, mean_over_ranks_or_stop
                          a training run as both training scripts use it: set-up, the lr schedule, exact resume
                          (weights, optimizers, RNG of every rank, data position), the JSONL log, atomic checkpoints
                          (save_last), and the non-finite-loss stop that leaves the last good checkpoint as it was
  catch_stop_signals, stop_requested, exit_stopped, wait_for_ranks
                          SIGTERM / Ctrl-C noted and acted on after a step (training) or a batch (sample.py's npz,
                          whose ranks wait for each other in a barrier that a signal ends)
  read_checkpoint         torch.load(weights_only=True) with one clear line for every way a file can be wrong
  load_tokenizer, load_far
                          our checkpoints and the official FQGAN / FAR ones (renamed, config inferred from shapes)
  codebook_fingerprint, check_pair, load_pair
                          which tokenizer a FAR was trained on, the refusal of a mismatched pair, a checked pair
  peak_mib                the extra peak resident memory of one call (bench.py, ablate.py's runs)
Nothing pickled is ever executed: weights_only=True, with argparse.Namespace as the one allowed class (the official
files store their training arguments that way).
"""
import argparse
import atexit
import ctypes
import datetime
import fcntl
import glob
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import time
import zipfile
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from far import FAR, FARConfig, PRESETS as FAR_PRESETS
from tokenizer import PRESETS as TOKENIZER_PRESETS, Tokenizer, TokenizerConfig


class CheckpointError(ValueError):
    """A file that cannot be used as asked; the message is one line naming the file, the problem and what to do.
    Entry scripts turn it into `parser.error` (exit 2), never a traceback."""


# --------------------------------------------------------------------------------------------------------------
# torchrun set-up and RNG states

# NCCL's default 10 minutes is shorter than what one rank may legitimately do while the others wait in a collective:
# write a FAR-L checkpoint (~11 GB), finish its share of a code extraction, sample the evaluation grid. 60 minutes
# (FQGAN_DIST_TIMEOUT_MIN to change it) still turns a real hang into an error instead of a silent stall.
DIST_TIMEOUT = datetime.timedelta(minutes=float(os.environ.get("FQGAN_DIST_TIMEOUT_MIN", 60)))


def keep_freed_memory():
    """CPU runs: glibc gives every allocation over 32 MiB its own mmap and unmaps it when freed, so each step's large
    activations and gradients are page-faulted in afresh (zeroed by the kernel, one fault per 4 KiB page). With mmap
    off and a high trim threshold, freed memory stays in the heap and the next step reuses it; the resident memory
    stays near the run's peak. An FQGAN-Dual fp32 step at 256 px runs 1.08-1.28x faster with it (four runs of
    python bench.py --only train-dual). FQGAN_KEEP_FREED_MEMORY=0 keeps glibc's default. Returns whether it applied
    (a libc without mallopt, e.g. musl or macOS, is left alone)."""
    if os.environ.get("FQGAN_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4                         # glibc's <malloc.h> parameter numbers
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**30))
    except (OSError, AttributeError):
        return False


def init_distributed(device=None):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: join the group (NCCL on CUDA, gloo on CPU) and take the device
    from LOCAL_RANK (multi-node works the same). Plain `python script.py` is rank 0 of a world of 1. `device` ("cpu",
    "cuda", "cuda:1") overrides the choice (sample.py / evaluate.py --device); a bare "cuda" means cuda:LOCAL_RANK.
    Returns (ddp, rank, world, local_rank, device)."""
    ddp, local_rank = "RANK" in os.environ, int(os.environ.get("LOCAL_RANK", 0))   # torchrun always sets RANK
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)   # one GPU per process
        torch.cuda.set_device(device)                                 # so NCCL and bare .cuda() use this GPU
        # NOTE(paper≠code): the official scripts allow TF32 for all fp32 matmuls. We keep matmuls in true fp32: under
        # bf16 autocast only the quantizer's distances and its IBQ / entropy logits (T = 0.01 multiplies TF32's 1e-3
        # error by 100) run fp32 matmuls. Convolutions keep TF32 (torch's default); evaluate.py turns it off.
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
        torch.backends.cudnn.benchmark = True                         # fixed shapes: pick the fastest conv once
    else:
        keep_freed_memory()                                           # no page faults on reused activations
    if ddp:   # device_id binds NCCL to this GPU now (no lazy init at the first collective)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=DIST_TIMEOUT,
                                device_id=device if device.type == "cuda" else None)
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1                                            # plain python: one process
    return ddp, rank, world, local_rank, device


def gather_on_rank0(obj):
    """[rank 0's obj, rank 1's obj, ...] on rank 0 (pickled: any sizes, any types), None on the others; [obj] in a
    plain one-process run. evaluate.py's features and unreadable files: the metrics are computed once, on rank 0."""
    if not dist.is_initialized():
        return [obj]
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, parts, dst=0)
    return parts


def one_process_only(parser):
    """ablate.py, figures.py, train_teacher.py and bench.py run in one process (ablate starts its own training runs):
    started by torchrun with more than one process, each would do all of the work, writing the same files. Exit 2."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world != "1":
        parser.error(f"runs in one process, and torchrun started {world}: start it with python, not torchrun")


def check_flags(parser, args, *rules):
    """Every script's value checks, before any work: rules are (flag's dest, ok, the valid range in words); the first
    that is not ok is one line naming the flag, its value and the range, exit 2 (argparse's error)."""
    for name, ok, valid in rules:
        if not ok:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)} is out of range: must be {valid}")


def device_flag(text):
    """argparse type of --device: "cpu", "cuda" or "cuda:N" -> the string, checked against this machine."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda or cuda:N") from None
    n = torch.cuda.device_count() if device.type == "cuda" else 0
    limit = n if device.type == "cuda" else 1                         # one CPU device: cpu:1 is none
    if device.type not in ("cpu", "cuda") or (device.index or 0) >= limit:
        raise argparse.ArgumentTypeError(f"{text!r}: use cpu" + (f", cuda or cuda:0..{n - 1}" if n else
                                         " (this machine has no CUDA device)"))
    return text


def distribute(raw, ddp, device, compile_):
    """The module a training loop calls: raw in DDP (gradients all-reduced in backward), then compiled. In this order
    the compiled backward is split at DDP's gradient buckets, so each bucket's all-reduce overlaps the rest of the
    backward; compiled first, the backward would be one node. Keep `raw` for EMA, saving and evaluation: no
    `module.` / `_orig_mod.` prefix reaches a checkpoint."""
    model = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None) if ddp else raw
    return torch.compile(model) if compile_ else model


def rng_states():
    """Every rank's CPU (and CUDA) RNG state, gathered so that rank 0 stores them all in the checkpoint."""
    rng = {"cpu": [torch.get_rng_state()], "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else []}
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rng)                         # a collective: every rank must call it
        rng = {k: [s for r in gathered for s in r[k]] for k in rng}    # world x {cpu, cuda} -> {cpu: world states}
    return rng


def set_rng_states(rng, rank):
    """Inverse of rng_states for this rank (a checkpoint from another world size reuses states modulo its size)."""
    torch.set_rng_state(rng["cpu"][rank % len(rng["cpu"])])          # dropout, label drop, etc. continue exactly
    if torch.cuda.is_available() and rng["cuda"]:                      # saved without CUDA: keep the seeded one
        torch.cuda.set_rng_state(rng["cuda"][rank % len(rng["cuda"])])


# --------------------------------------------------------------------------------------------------------------
# Writing: atomic files, stale temp files of killed runs

def atomic_save(obj, path):
    """torch.save to a temp file in the same folder, then os.replace: a crash never leaves a half-written `path`, and
    a failed write (disk full) removes its temp file. A kill -9 mid-write leaves it: see remove_stale_temps."""
    tmp = f"{path}.tmp{os.getpid()}"                                  # same folder: os.replace is a rename
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)                                         # atomic (a POSIX rename)
    finally:
        if os.path.exists(tmp):                                       # only if save or replace failed
            os.remove(tmp)


def save_last(state, folder, numbered, keep=0):
    """Rank 0: state -> folder/last.pt atomically; numbered=True also makes folder/<step:07d>.pt, a hard link to the
    same file (written once, not twice: FAR-L's is ~11 GB; a later last.pt replaces the name, not the linked file),
    and keeps the `keep` newest numbered files (0: all). Too little free space is a CheckpointError before anything is
    written; a write that fails (disk full) leaves no temp file and the previous last.pt as it was."""
    last, path = os.path.join(folder, "last.pt"), os.path.join(folder, f"{state['step']:07d}.pt")
    check_free_space(folder, state_bytes(state), "a checkpoint")
    try:
        atomic_save(state, last)
    except OSError as e:                                              # ENOSPC, EDQUOT, EIO: one line, the cause named
        raise CheckpointError(f"could not write {last} ({e.strerror or e}); the previous last.pt is left as it "
                              f"was") from None
    if numbered:
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            try:
                os.link(last, tmp)                                    # the same file under a second name
            except OSError:                                           # a filesystem without hard links: copy
                shutil.copyfile(last, tmp)
            os.replace(tmp, path)
        except OSError as e:                                          # the copy on a full disk: last.pt is written
            raise CheckpointError(f"wrote {last}, but not its copy {path} ({e.strerror or e})") from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    for old in numbered_checkpoints(folder)[:-keep] if keep else []:  # the oldest beyond --keep-checkpoints
        os.remove(old)


def numbered_checkpoints(folder):
    """folder/<step:07d>.pt files, oldest first."""
    return sorted(glob.glob(os.path.join(glob.escape(folder), "[0-9]" * 7 + ".pt")))


def state_bytes(obj):
    """Bytes of the tensors in a (nested) checkpoint dict: about its size on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return sum(state_bytes(v) for v in values)


def check_free_space(folder, nbytes, what):
    """CheckpointError "no space left on <folder>" unless it has nbytes (+ 5% and 16 MB) free."""
    free = shutil.disk_usage(folder).free
    if free < nbytes * 1.05 + 2**24:
        raise CheckpointError(f"no space left on {folder}: {what} needs ~{nbytes / 2**20:.0f} MB, "
                              f"{free / 2**20:.0f} MB free; free some space (older numbered checkpoints: "
                              f"--keep-checkpoints)")


def memmap(path, dtype, shape):
    """np.lib.format.open_memmap(path, "w+", ...) with its blocks allocated at once: a full disk is a CheckpointError
    here (nothing left behind), not a bus error at a later write into the map."""
    check_free_space(os.path.dirname(os.path.abspath(path)), math.prod(shape) * np.dtype(dtype).itemsize, path)
    array = np.lib.format.open_memmap(path, "w+", dtype, shape)
    try:
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
    except OSError as e:                                              # (the open map goes with the file)
        os.remove(path)
        raise CheckpointError(f"no space left on {os.path.dirname(os.path.abspath(path))} for {path} "
                              f"({e.strerror})") from None
    return array


def remove_stale_temps(folder):
    """Delete the `*.tmp<pid>*` files that killed runs left in folder (called by rank 0 at start-up, before any write
    of this run). Returns their names."""
    # atomic_save's temp names contain .tmp<pid>: no checkpoint name does
    stale = sorted(f for f in glob.glob(os.path.join(glob.escape(folder), "*.tmp*")) if re.search(r"\.tmp\d+", f))
    for f in stale:
        os.remove(f)
    return [os.path.basename(f) for f in stale]


def check_writable(path, flag, suffix=None, default=False):
    """Raise CheckpointError naming `flag` unless `path` is a file that can be created or replaced (and its name ends
    in `suffix`, the format it is written in): checked when the arguments are parsed, so a bad output path fails
    before hours of work, not after. `default`: the script's own default path (runs/...), whose folders it makes
    when it writes the file (so a refused run leaves none): the nearest folder above it that exists must be writable."""
    folder = os.path.dirname(os.path.abspath(path))                   # a bare name: the working directory
    while default and not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if os.path.isdir(path) or path.endswith(os.sep):                  # "out/" names a folder, not a file
        raise CheckpointError(f"{flag} {path} is a directory; give a file name, e.g. {os.path.join(path, 'out.png')}")
    if suffix and not path.lower().endswith(suffix):                  # e.g. PNG bytes in a file named .jpg
        raise CheckpointError(f"{flag} {path}: it is written as {suffix[1:].upper()}; the file name must end in "
                              f"{suffix}")
    if not os.path.isdir(folder):
        raise CheckpointError(f"{flag} {path}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise CheckpointError(f"{flag} {path}: the folder {folder} is not writable")


# --------------------------------------------------------------------------------------------------------------
# Reading: one clear line per problem

def read_checkpoint(path, what="checkpoint", map_location="cpu", mmap=False):
    """torch.load(path, weights_only=True), allowing argparse.Namespace; every failure is a CheckpointError that says
    which file, what is wrong with it (missing / empty / truncated or not a checkpoint / pickled code), what to do.
    mmap=True maps the tensors instead of reading them (a look at the entries costs no I/O)."""
    if not os.path.isfile(path):                                      # cheap checks first, each its own message
        raise CheckpointError(f"{what} {path}: no such file")
    if os.path.getsize(path) == 0:                                    # e.g. a full disk during a copy
        raise CheckpointError(f"{what} {path} is empty (0 bytes): an interrupted copy or write? Copy it again")
    if not zipfile.is_zipfile(path):                                  # torch.save writes a zip since torch 1.6
        raise CheckpointError(f"{what} {path} is not a complete PyTorch checkpoint (truncated, or another kind of "
                              f"file: {os.path.getsize(path)} bytes without a zip directory). Copy or train it again")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):   # official files' "args" (§3.3)
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:                                            # noqa: BLE001 - every torch.load failure
        text = " ".join(str(e).split())
        if "weights_only" in text or "Unsupported global" in text:
            raise CheckpointError(f"{what} {path} holds pickled objects other than tensors and plain types; refusing "
                                  f"to run its code ({text[:160]})") from None
        raise CheckpointError(f"{what} {path} cannot be read ({type(e).__name__}: {text[:160]}); the file is "
                              f"damaged. Copy or train it again") from None


def read_resume(out_dir, cfg, args, mmap=False):
    """The checkpoint that --resume continues from, OUT/checkpoints/last.pt, or None when there is none yet. A damaged
    last.pt, one of another kind (a FAR run's in a tokenizer's --out-dir, weights without a training state), or one of
    another model config, --global-batch-size or --seed (its data position would mean something else: the data order is
    drawn from the seed), is a CheckpointError that names the numbered checkpoints to fall back on. mmap=True: checked
    without reading the weights (train_far.py, before its extraction)."""
    folder = os.path.join(out_dir, "checkpoints")
    last = os.path.join(folder, "last.pt")
    if not os.path.exists(last):                                      # a fresh run: --resume starts from scratch
        return None
    numbered = numbered_checkpoints(folder)
    fallback = (f"; to resume from an earlier step, copy one of {', '.join(os.path.basename(n) for n in numbered)} "
                f"over last.pt" if numbered else "; there is no numbered checkpoint to fall back on")
    try:
        ckpt = read_checkpoint(last, "--resume: checkpoint", mmap=mmap)
    except CheckpointError as e:
        raise CheckpointError(f"{e}{fallback}") from None
    wanted, kind = _holds({"config": asdict(cfg)}), _holds(ckpt)       # "a tokenizer" or "a FAR"
    if kind != wanted:                                                # e.g. a FAR run's folder given to train_tokenizer
        raise CheckpointError(f"--resume: {last} holds {kind or 'no model of this project'}, not {wanted}'s training "
                              f"state; use another --out-dir{fallback}")
    if not {"step", "rng"} <= set(ckpt):                             # e.g. weights/tiny_tokenizer.pt copied there
        raise CheckpointError(f"--resume: {last} holds {wanted}'s weights without a training state (step, RNG states); "
                              f"fine-tune from it with --init-from instead{fallback}")
    run = ("global_batch_size", "seed")                               # the flags that place the run in its data
    stored = {**(ckpt.get("config") or {}), **{k: ckpt.get("args", {}).get(k) for k in run}}
    ours = {**asdict(cfg), **{k: getattr(args, k) for k in run}}
    differ = [f"{k} {ours.get(k)} (the checkpoint's: {stored.get(k)})" for k in sorted(set(stored) | set(ours))
              if stored.get(k) != ours.get(k)]                        # e.g. another --preset, --codebook-size
    if differ:
        raise CheckpointError(f"--resume: {last} was written with another model config, --global-batch-size or --seed: "
                              f"{'; '.join(differ[:4])}{' ...' if len(differ) > 4 else ''}; resume with its flags or "
                              f"use another --out-dir")
    return ckpt


def mean_over_ranks_or_stop(terms, step, last, bar=None):
    """{name: scalar tensor} -> {name: float} averaged over ranks. A non-finite term stops training (exit 1, naming
    the step and the term) before anything is written, so `last` stays the last good checkpoint. `bar`, the loop's
    tqdm bar, is closed first: the message gets a line of its own."""
    device, ddp = next(iter(terms.values())).device, dist.is_initialized()
    values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).detach().reshape(())
                          for v in terms.values()])                   # (n_terms,): one all-reduce for all terms
    if ddp:
        dist.all_reduce(values)                                       # sum, so a NaN on one rank reaches every rank
        values /= dist.get_world_size()
    if not torch.isfinite(values).all():                              # every rank sees the same values: all stop
        bad = [k for k, v in zip(terms, values.tolist()) if not math.isfinite(v)]
        if bar is not None:
            bar.close()
        if int(os.environ.get("RANK", 0)) == 0:                       # one message, not one per rank
            print(f"non-finite loss at step {step}: {', '.join(bad)}; stopping. The last good checkpoint {last} is "
                  f"left as it was.", file=sys.stderr)
        if ddp:
            dist.destroy_process_group()
        sys.exit(1)
    return dict(zip(terms, values.tolist()))


# --------------------------------------------------------------------------------------------------------------
# A training run, as both training scripts use it: start, resume, log, save

def add_checkpoint_flags(p):
    """The checkpoint and resume flags of both training scripts (argparse parser p)."""
    p.add_argument("--ckpt-every", type=int, default=1000, help="steps between numbered checkpoints (%(default)s)")
    p.add_argument("--ckpt-minutes", type=float, default=30, help="also write last.pt when this many minutes have "
                   "passed since the last write: a hard kill loses at most that much (%(default)s)")
    p.add_argument("--keep-checkpoints", type=int, default=5, help="numbered checkpoints kept, the newest; 0 = all "
                   "(%(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt: exact step, data "
                   "position and random state (a stopped or preempted run says so)")


def start_training(args, parser):
    """torchrun set-up of a training script -> (ddp, rank, world, device, per-rank batch). Exits 2 (parser.error)
    when --global-batch-size does not split over the ranks. --precision and --compile default by device: bf16 and
    compiled on CUDA (the paper's runs), fp32 and eager on a CPU; --precision auto (the tiny recipes) is bf16 where
    the device has bf16 instructions (native_bf16), else fp32."""
    ddp, rank, world, _, device = init_distributed()
    if args.global_batch_size % world:                                # each rank takes global / world samples
        parser.error(f"--global-batch-size {args.global_batch_size} is not divisible by the world size {world}")
    problem = [own_out_dir(args) if rank == 0 else None]              # before any rank writes a file there
    if ddp:
        dist.broadcast_object_list(problem, src=0)                    # every rank stops with the same line
    if problem[0]:
        parser.error(problem[0])
    catch_stop_signals()
    if args.precision == "auto":                                      # the tiny recipes: bf16 where it is fast
        args.precision = "bf16" if native_bf16(device) else "fp32"
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    return ddp, rank, world, device, args.global_batch_size // world


def native_bf16(device):
    """Whether bf16 autocast on `device` runs on bf16 instructions: a GPU that has them (Ampere on), or a CPU with
    AVX512-BF16 or AMX. On other CPUs oneDNN converts every bf16 operand to fp32 and back, and a tiny recipe's step
    takes 2.2-2.7x as long as in fp32 (docs/results.md, "Time to quality"); there --precision auto gives fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    caps = torch.cpu.get_capabilities()                               # cpuinfo's flags, e.g. {"avx512_bf16": True}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def lr_at(args, step):
    """lr of the update that step `step` (0-based) makes, both training scripts: linear warm-up over --warmup-steps,
    then constant (the official scripts) or a cosine from --lr to 0 at --max-steps (the tiny recipes: a short run
    ends annealed). Computed from the step alone, so a resumed run needs no scheduler state."""
    warm = min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else 1.0
    if args.lr_decay == "cosine":
        warm *= 0.5 * (1 + math.cos(math.pi * min(step, args.max_steps) / args.max_steps))
    return args.lr * warm


_LOCKS = {}                                                           # out_dir -> open file holding its lock
_MADE = {}                                                            # {out_dir own_out_dir made: its first new folder}


@atexit.register
def remove_unused_out_dirs():
    """At exit: a folder own_out_dir made for a run that was refused after it (a bad flag, file or data found later)
    holds no file but its .lock, perhaps in empty subfolders: removed, and so are the parents the run made for it
    (--out-dir a/b/c where only a existed: b too) while they are empty, so a refused run leaves nothing behind."""
    for out, first in list(_MADE.items()):
        del _MADE[out]
        files = [os.path.relpath(os.path.join(d, f), out) for d, _, names in os.walk(out) for f in names]
        if files != [".lock"]:
            continue
        shutil.rmtree(out, ignore_errors=True)
        parent = os.path.dirname(os.path.abspath(out))
        while parent != os.path.dirname(first):                       # up to `first`, stopping at one not empty
            try:
                os.rmdir(parent)
            except OSError:
                break
            parent = os.path.dirname(parent)


def own_out_dir(args):
    """Rank 0 takes OUT for this run, or returns why not: an exclusive lock on OUT/.lock held until the process ends
    (the kernel drops it however the process ends, so a crashed run leaves no stale lock), which refuses a second run
    on the same folder, so no run ever deletes another live run's temp files; and without --resume, an existing
    OUT/checkpoints/last.pt (a new run would overwrite it). A path that cannot be a folder is refused too."""
    first, path = None, os.path.abspath(args.out_dir)                 # the outermost folder makedirs will make
    while not os.path.isdir(path) and path != os.path.dirname(path):
        first, path = path, os.path.dirname(path)
    try:
        os.makedirs(args.out_dir, exist_ok=True)                      # a file there, or in its path: FileExistsError
    except OSError as e:
        return f"--out-dir {args.out_dir}: cannot be made a folder ({e.strerror}); give a folder's path"
    if first:                                                         # a refused run: removed at exit, if unused
        _MADE[args.out_dir] = first
    if args.out_dir in _LOCKS:                                        # an earlier main() of this process: it is over
        _LOCKS.pop(args.out_dir).close()
    lock = open(os.path.join(args.out_dir, ".lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        return f"--out-dir {args.out_dir} is in use by a running training ({holder}); wait for it or use another folder"
    lock.seek(0), lock.truncate(), lock.write(f"pid {os.getpid()} on {os.uname().nodename}"), lock.flush()
    _LOCKS[args.out_dir] = lock
    last = os.path.join(args.out_dir, "checkpoints", "last.pt")
    if not args.resume and os.path.exists(last):
        return (f"--out-dir {args.out_dir} holds a run already ({last}): add --resume to continue it, or use another "
                f"folder")
    return None


# Preemption: SIGTERM (what Slurm and cloud schedulers send before a kill; torchrun passes it on to every rank) and
# SIGINT (Ctrl-C) are noted instead of killing the process; the loop asks stop_requested() after each step, and all
# ranks save last.pt and exit with 128 + the signal (143, 130). A second signal acts at once.
STOP = {}                                                             # {"signal": number} once one arrived
REPLACED = {}                                                         # {signal: handler catch_stop_signals replaced}


def catch_stop_signals():
    """Note SIGTERM / SIGINT in STOP from now on (main thread only; the data loader's workers ignore them). A signal
    the process was started ignoring stays ignored, as Python leaves it: a shell script's `python train_... &` ignores
    SIGINT, so a Ctrl-C meant for the script's foreground command does not stop the run."""
    STOP.clear()

    def note(signum, frame):
        if STOP:                                                      # asked twice: do what the signal does
            signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)
            signal.raise_signal(signum)
        STOP["signal"] = signum
    for signum in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(signum) == signal.SIG_IGN:
            continue
        REPLACED.setdefault(signum, signal.getsignal(signum))        # not `note` if an earlier run ended in an error
        signal.signal(signum, note)


def release_stop_signals():
    """The handlers from before catch_stop_signals again, at the end of a run: in a process that goes on (ablate.py
    between its training runs) a Ctrl-C interrupts at once, instead of being noted for a loop that no longer asks."""
    for signum, handler in REPLACED.items():
        if handler is not None:                                       # None: not set from Python
            signal.signal(signum, handler)
    REPLACED.clear()
    STOP.clear()


def stop_requested(device, save_due):
    """(stop, save) after a step, the same on every rank (one all-reduce of two numbers): a stop signal reached some
    rank; save_due, rank 0's --ckpt-minutes clock. All ranks then stop, or save, after the same step."""
    flags = torch.tensor([float(bool(STOP)), float(save_due)], device=device)
    if dist.is_initialized():
        dist.all_reduce(flags)                                        # sums: any rank's flag counts
    return bool(flags[0]), bool(flags[1])


def wait_for_ranks():
    """dist.barrier() that a stop signal ends: True once every rank got here (at once in one process), False as soon
    as a signal is noted in STOP, e.g. torchrun's SIGTERM when another rank failed, instead of blocking until its
    SIGKILL (sample.py's ranks waiting for each other's part files)."""
    done = dist.barrier(async_op=True) if dist.is_initialized() else None
    while done is not None and not done.is_completed():
        if STOP:
            return False
        time.sleep(0.05)
    return True


def exit_stopped(args, step, argv, script):
    """After the checkpoint of a stopped run: one line naming the step and the resume command, exit 128 + signal."""
    signum = STOP.get("signal", signal.SIGTERM)
    if not dist.is_initialized() or dist.get_rank() == 0:
        resume_cmd = shlex.join(["python", script, *[a for a in argv if a != "--resume"], "--resume"])
        print(f"stopped by {signal.Signals(signum).name} after step {step}; "
              f"{os.path.join(args.out_dir, 'checkpoints', 'last.pt')} holds it. Resume with: {resume_cmd} (or your "
              f"torchrun command plus --resume)", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(128 + signum)


def resume(args, parser, cfg, state, rank):
    """Seed this rank (seed + rank: dropout, label drop) and, with --resume and an OUT/checkpoints/last.pt, load every
    entry of state ({name in the file: module or optimizer}) and this rank's RNG -> the step to continue from (0 for a
    fresh run). A file that does not fit the run exits 2 with the reason (read_resume)."""
    try:
        ckpt = read_resume(args.out_dir, cfg, args) if args.resume else None
    except CheckpointError as e:
        parser.error(str(e))
    torch.manual_seed(args.seed + rank)                               # per-rank randomness from here on
    if ckpt is None:
        return 0
    for name, obj in state.items():
        obj.load_state_dict(ckpt[name])                               # strict: the same config (read_resume)
    set_rng_states(ckpt["rng"], rank)                                 # after the reseed above, which it replaces
    step, flags = ckpt["step"], ("lr", "lr_decay", "warmup_steps", "max_steps")   # what lr_at reads
    theirs = {k: ckpt.get("args", {}).get(k, getattr(args, k)) for k in flags}
    own = argparse.Namespace(**{**vars(args), **theirs})             # this run on the checkpoint's schedule
    if rank == 0 and step < args.max_steps and lr_at(own, step) != lr_at(args, step):   # e.g. cosine, new --max-steps
        changed = ", ".join(f"--{k.replace('_', '-')} {theirs[k]} -> {getattr(args, k)}" for k in flags
                            if theirs[k] != getattr(args, k))
        print(f"--resume: the lr schedule is not the checkpoint's ({changed}): the next step's lr is "
              f"{lr_at(args, step):.3g}, {lr_at(own, step):.3g} on the schedule it was trained with")
    return step                                                       # the loop continues at step + 1


def open_run(args, master, summary, step):
    """Rank 0 prepares OUT (checkpoints/, samples/ unless --sample-every is 0, the temp files of a killed write removed)
    and prints the summary. Returns log(record), which appends one JSON line to OUT/log.jsonl on rank 0 (and does
    nothing elsewhere)."""
    if not master:
        return lambda record: None
    folder = os.path.join(args.out_dir, "checkpoints")
    if args.sample_every:                                               # 0 (train_far.py): no sample grids, no folder
        os.makedirs(os.path.join(args.out_dir, "samples"), exist_ok=True)
    os.makedirs(folder, exist_ok=True)
    stale = remove_stale_temps(folder)
    print(summary + (f"; removed stale {', '.join(stale)}" if stale else ""))
    if args.resume and step == 0:
        print(f"--resume: no {os.path.join(folder, 'last.pt')} yet, starting from scratch")
    if step >= args.max_steps:                                        # a finished run resumed: the loop never runs
        print(f"--resume: {os.path.join(folder, 'last.pt')} is at step {step}, --max-steps is {args.max_steps}: "
              f"nothing to train (a larger --max-steps trains on)")

    def log(record):
        with open(os.path.join(args.out_dir, "log.jsonl"), "a") as f:   # appended to on --resume
            f.write(json.dumps(record) + "\n")
    return log


def init_weights(model, source, what, flexible=()):
    """Fine-tuning (--init-from): model's weights from `source`, a model loaded by load_tokenizer / load_far (ours, a
    shipped fp16 export, a released file); the caller keeps fresh optimizers and step 0. Every tensor must match in
    name and shape, except the `flexible` ones of another shape, which keep their fresh initialisation (FAR's class
    table for another number of classes); they are returned. Anything else is a CheckpointError naming the first
    differences, and the preset the file was made with when one fits it exactly."""
    ours, theirs = model.state_dict(), source.state_dict()
    fresh = [k for k in flexible if k in theirs and k in ours and theirs[k].shape != ours[k].shape]
    wrong = ([f"{k} missing" for k in ours if k not in theirs] + [f"{k} not in this model" for k in theirs if k not in
             ours] + [f"{k} {tuple(theirs[k].shape)} in the file, {tuple(ours[k].shape)} here" for k in ours
                      if k in theirs and k not in fresh and theirs[k].shape != ours[k].shape])
    if wrong:
        presets = TOKENIZER_PRESETS if isinstance(source, Tokenizer) else FAR_PRESETS
        fits = [name for name, preset in presets.items() if type(source.cfg)(**preset) == source.cfg]
        raise CheckpointError(f"{what} has another architecture than this run ({'; '.join(wrong[:3])}"
                              f"{' ...' if len(wrong) > 3 else ''}): " + (f"it is --preset {fits[0]}" if fits else
                              "choose its --preset (and --image-size, --codebook-size)"))
    model.load_state_dict({**theirs, **{k: ours[k] for k in fresh}})
    return fresh


def save_checkpoint(args, cfg, step, batch, state, extra=None, numbered=True):
    """Every rank calls it: the RNG states of all ranks are gathered, rank 0 writes OUT/checkpoints/last.pt (and
    <step>.pt, save_last) with every entry of state ({name: module or optimizer}) as a state dict, the step, config,
    arguments and data position (each rank's StreamSampler resumes at step * batch), plus extra (plain values); then
    the ranks meet, so that none runs ahead of a half-written file. torch.load(weights_only=True) reads it. A disk
    that cannot take it stops the run with one line, exit 2, the previous last.pt intact."""
    rng = rng_states()                                                # a collective: every rank must call it
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            save_last({**{name: obj.state_dict() for name, obj in state.items()}, "step": step, "config": asdict(cfg),
                       "args": vars(args), "rng": rng, "data": {"samples_per_rank": step * batch}, **(extra or {})},
                      os.path.join(args.out_dir, "checkpoints"), numbered, args.keep_checkpoints)
        except CheckpointError as e:                                  # the other ranks are stopped by torchrun
            print(f"step {step}: {e}", file=sys.stderr)
            sys.exit(2)
    if dist.is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------------------------------------------
# Tokenizer files: ours ({"model", "ema", "config", ...}) and the official FQGAN ones (`fqgan_*_ds{8,16}.pt`)

# Official module names per branch (docs/official_code.md §1.4, §1.7): the adapter, and the feature head if any.
_OFFICIAL_ADAPTER = {"vis": "visual_head", "sem": "semantic_head", "sem_mid": "semantic_head_mid",
                     "sem_high": "semantic_head_high"}
_OFFICIAL_HEAD = {"sem": "feat_pred_head", "sem_mid": "mid_sem_feat_pred", "sem_high": "high_sem_feat_pred"}


def _official_prefixes(cfg):
    """(official prefix, our prefix) pairs. Everything else (encoder trunk, post_quant_conv, decoder) has the official
    names already. The official `encoder.<adapter>.0` is a one-element ModuleList, ours a module."""
    pairs = []
    for i, b in enumerate(cfg.branch_names):
        pairs += [(f"encoder.{_OFFICIAL_ADAPTER[b]}.0.", f"branches.{i}.adapter."),
                  (f"encoder.norm_out_{b}.", f"branches.{i}.norm_out."),
                  (f"encoder.conv_out_{b}.", f"branches.{i}.conv_out."),
                  (f"quant_conv_{b}.", f"branches.{i}.quant_conv."),
                  (f"quantize_{b}.", f"branches.{i}.quantize.")]
        if cfg.head_dims[i]:
            pairs.append((f"{_OFFICIAL_HEAD[b]}.", f"branches.{i}.feat_head."))
    return pairs


def config_from_official(sd):
    """Infer the TokenizerConfig of an official FQGAN state dict from its keys and shapes (Tab. 1 presets)."""
    triple = "quantize_sem_mid.embedding.weight" in sd               # Triple: vis, sem_mid, sem_high (§1.1)
    names = ("vis", "sem_mid", "sem_high") if triple else ("vis", "sem")
    if f"quantize_{names[1]}.embedding.weight" not in sd:
        raise CheckpointError("not an FQGAN Dual/Triple tokenizer: no quantize_vis / quantize_sem* weights")
    levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.conv_blocks."))   # VQ-16: 5, VQ-8: 4
    cfg = dict(TOKENIZER_PRESETS[f"fqgan-{'triple' if triple else 'dual'}-{2 ** (levels - 1)}"])
    cfg["codebook_size"], cfg["codebook_dim"] = sd[f"quantize_{names[0]}.embedding.weight"].shape   # (K, d)
    # the heads are in the file only when it was trained with representation learning
    cfg["head_dims"] = tuple(sd[f"{_OFFICIAL_HEAD[b]}.class_embedding"].shape[1]
                             if b in _OFFICIAL_HEAD and f"{_OFFICIAL_HEAD[b]}.class_embedding" in sd else 0
                             for b in names)
    grid = sd[f"encoder.{_OFFICIAL_ADAPTER['vis']}.0.positional_embedding"].shape[0] ** 0.5   # h*w tokens, square
    cfg["image_size"] = int(round(grid)) * 2 ** (levels - 1)          # official files: 256 (§1.2)
    return TokenizerConfig(**cfg)


def tokenizer_official_to_ours(sd, cfg):
    """Rename an official state dict to ours. Drops the official `codebook_used` usage FIFO buffers (we count code
    usage per batch instead, docs/official_code.md §1.6; they hold no model state)."""
    pairs, out = _official_prefixes(cfg), {}
    for key, value in sd.items():
        if not key.endswith(".codebook_used"):                        # the usage FIFO is dropped (§1.6)
            out[next((ours + key[len(off):] for off, ours in pairs if key.startswith(off)), key)] = value
    return out


def tokenizer_ours_to_official(sd, cfg):
    """The inverse of tokenizer_official_to_ours, with zero `codebook_used` buffers (65536,) as the official module."""
    pairs, out = _official_prefixes(cfg), {}
    for key, value in sd.items():
        new = next((off + key[len(ours):] for off, ours in pairs if key.startswith(ours)), key)
        out[new] = value
        if new.endswith("embedding.weight") and new.startswith("quantize_"):
            out[new.replace("embedding.weight", "codebook_used")] = torch.zeros(65536)
    return out


def _holds(ckpt):
    """"a FAR", "a tokenizer", "the stand-in teacher (train_teacher.py)" or None: what a loaded checkpoint holds, by our
    configs' fields or the official parameter names. The loaders' errors say so when a file of another kind was given
    (a swapped pair of paths)."""
    if not isinstance(ckpt, dict):
        return None
    sd = next((ckpt[k] for k in ("ema", "model", "module", "state_dict") if isinstance(ckpt.get(k), dict)), ckpt)
    names = set(ckpt.get("config") or {}) | {str(n).split(".")[0] for n in sd}
    if names & {"n_layer", "tok_embeddings_1", "tok_embeddings"}:    # our FARConfig; FAR's code embeddings
        return "a FAR"
    if names & {"ch", "encoder"}:                                     # our TokenizerConfig; the tokenizer's encoder
        return "a tokenizer"
    if {"width", "num_classes"} <= names:                             # teachers.PhotoCNN's config (train_teacher.py)
        return "the stand-in teacher (train_teacher.py)"
    return None


# The meta device builds a model without initialising the weights a state dict then replaces, but its first use in a
# process imports torch's Python meta kernels (torch._meta_registrations, sympy): about a second, more than an ordinary
# build of the tiny models costs. So models under META_ABOVE stored numbers are built as usual, larger ones (FQGAN-Dual
# 150 M, FAR-B 417 M) on the meta device, which spares seconds of init and a second copy of the weights in memory
# (docs/results.md, "Loading a model").
META_ABOVE = 100_000_000


def model_to_load(build, sd):
    """build() -> the module whose weights are the state dict sd (loaded with assign=True next): on the meta device for
    large sd, as usual for small ones, then without drawing from torch's random generator (loading a model leaves
    the random numbers of what follows, e.g. sample.py's seeded codes, as the meta device left them)."""
    if sum(t.numel() for t in sd.values() if torch.is_tensor(t)) >= META_ABOVE:
        with torch.device("meta"):
            return build()
    with torch.random.fork_rng(devices=[]):                           # the CPU generator's state, restored after
        return build()


def load_tokenizer(path, device="cpu"):
    """Our checkpoint or an official FQGAN one (detected by its keys) -> Tokenizer on `device` in eval mode, loaded
    strictly. Ours prefers the EMA weights; fp16 exports (weights/) come back as fp32. CheckpointError otherwise."""
    ckpt = read_checkpoint(path, "tokenizer checkpoint", device)      # the tensors are read straight onto device
    try:
        if isinstance(ckpt, dict) and "config" in ckpt:               # ours, written by train_tokenizer.py
            cfg = TokenizerConfig(**ckpt["config"])
            sd, official = (ckpt["ema"] if ckpt.get("ema") else ckpt["model"]), False
        else:                                                         # official: {"model"|"ema"|"state_dict": sd}
            sd = next((ckpt[k] for k in ("ema", "model", "state_dict") if isinstance(ckpt, dict) and k in ckpt), ckpt)
            cfg = config_from_official(sd)
            sd, official = tokenizer_official_to_ours(sd, cfg), True
        tok = model_to_load(lambda: Tokenizer(cfg), sd)               # no init of large weights that are overwritten
        # assign=True: the module takes the loaded tensors (on device); fp16 / bf16 exports back to fp32 first
        tok.load_state_dict({n: t.float() if t.is_floating_point() else t for n, t in sd.items()}, strict=True,
                            assign=True)
    except (CheckpointError, KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        text = " ".join(str(e).split())
        swapped = f": it holds {_holds(ckpt)}" if _holds(ckpt) not in (None, "a tokenizer") else ""
        raise CheckpointError(f"tokenizer checkpoint {path} is not a tokenizer of this project or the official FQGAN"
                              f"{swapped} ({type(e).__name__}: {text[:200]})") from None
    for branch in tok.branches:     # the official straight-through rounding, for bit-exact parity (quantizer.py)
        branch.quantize.paper_ste = official
    return tok.to(device).eval()                                      # .to: anything the file did not hold


def codebook_fingerprint(tok):
    """16 hex digits identifying the sub-codebooks (raw rows rounded to fp16, so an fp16 export keeps it). FAR
    checkpoints record the fingerprint of the tokenizer whose codes they model; check_pair refuses another one."""
    digest = hashlib.sha256()
    for branch in tok.branches:                                       # in branch order: a swapped pair differs
        digest.update(branch.quantize.embedding.weight.detach().to("cpu", torch.float16).numpy().tobytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------
# FAR files: ours ({"model", "config", "tokenizer", "classes", ...}) and the official ones (tok_embeddings_1, output_1)

def far_official_to_ours(state_dict):
    """Official names -> ours: tok_embeddings_{j} -> tok_embeddings.{j-1}, output_{j} -> output.{j-1}. Drops the
    KV-cache buffers that an official state dict saved after sampling carries (docs/official_code.md §5.7)."""
    rename = lambda m: f"{m[1]}.{int(m[2]) - 1}."                     # 1-based names -> 0-based ModuleList index
    return {re.sub(r"^(tok_embeddings|output)_(\d+)\.", rename, n): t
            for n, t in state_dict.items() if ".kv_cache." not in n}


def far_ours_to_official(state_dict):
    """Inverse of far_official_to_ours (for exporting a FAR with the "ar" head to the official code)."""
    rename = lambda m: f"{m[1]}_{int(m[2]) + 1}."
    return {re.sub(r"^(tok_embeddings|output)\.(\d+)\.", rename, n): t for n, t in state_dict.items()}


def far_official_config(state_dict, args=None):
    """FARConfig of an official FAR state dict, from its shapes (+ image_size / downsample_size of its args)."""
    n_blocks = lambda prefix: 1 + max(int(m[1]) for n in state_dict if (m := re.match(prefix + r"\.(\d+)\.", n)))
    V, dim = state_dict["tok_embeddings_1.weight"].shape              # (codebook size, model width)
    shape = dict(dim=dim, n_layer=n_blocks("layers"), ar_head_layers=n_blocks("ar_head"))
    # The official configs all have head_dim 64 (docs/official_code.md §5.1); use a preset's n_head where it matches.
    preset = next((p for p in FAR_PRESETS.values() if shape.items() <= p.items()), dict(shape, n_head=dim // 64))
    side = getattr(args, "image_size", 256) // getattr(args, "downsample_size", 16)   # official: ImageNet 256, ds16
    k = sum(1 for n in state_dict if re.fullmatch(r"tok_embeddings_\d+\.weight", n))   # one table per sub-code
    num_classes = state_dict["cls_embedding.embedding_table.weight"].shape[0] - 1     # the last row is the null class
    return FARConfig(**{**preset, "num_codebooks": k, "codebook_size": V, "grid": (side, side),
                        "num_classes": num_classes})


def load_far(path_or_ckpt, device="cpu", name=None):
    """Our FAR checkpoint, an official one, or an already loaded dict of either (read_checkpoint; `name`: its file, for
    the error) -> FAR on `device` in eval mode.

    Ours: {"model": sd, "config": asdict(FARConfig), ...}. Official: {"model"|"module"|"state_dict": sd, "args":
    argparse.Namespace, ...} or a bare state dict with names like tok_embeddings_1.weight. fp16 exports -> fp32."""
    ckpt = path_or_ckpt if isinstance(path_or_ckpt, dict) else read_checkpoint(path_or_ckpt, "FAR checkpoint", device)
    try:
        if "config" in ckpt:  # ours
            cfg, sd = FARConfig(**ckpt["config"]), ckpt["model"]
        else:                 # official: find the state dict, infer the config, rename
            sd = next((ckpt[n] for n in ("model", "module", "state_dict") if n in ckpt), ckpt)
            cfg, sd = far_official_config(sd, ckpt.get("args")), far_official_to_ours(sd)
        model = model_to_load(lambda: FAR(cfg), sd)  # no init of large weights (up to ~1e9) overwritten anyway
        # assign=True takes the stored tensors as they are, so bring fp16 / bf16 exports back to fp32 first
        model.load_state_dict({n: t.float() if t.is_floating_point() else t for n, t in sd.items()}, strict=True,
                              assign=True)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, AssertionError) as e:
        name = name or ("the given dict" if isinstance(path_or_ckpt, dict) else path_or_ckpt)
        swapped = f": it holds {_holds(ckpt)}" if _holds(ckpt) not in (None, "a FAR") else ""
        raise CheckpointError(f"FAR checkpoint {name} is not a FAR of this project or the official code{swapped} "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    return model.to(device).eval()                                    # a dict read on the CPU moves here


def check_pair(far_cfg, tok, recorded, far_path, tok_path):
    """Refuse (CheckpointError) a tokenizer that cannot decode this FAR's codes: another (k, codebook size, grid), or
    other codebooks than the ones FAR was trained on (`recorded`: our FAR checkpoint's "tokenizer" entry)."""
    mine = (far_cfg.num_codebooks, far_cfg.codebook_size, tuple(far_cfg.grid))   # as tuples, whatever the stored type
    theirs = (tok.cfg.num_codebooks, tok.cfg.codebook_size, tuple(tok.cfg.grid))
    if mine != theirs:
        raise CheckpointError(f"mismatched pair: {far_path} models (k, codebook_size, grid) = {mine}, but {tok_path} "
                              f"has {theirs}")
    if recorded.get("fingerprint") and recorded["fingerprint"] != codebook_fingerprint(tok):   # official: none
        raise CheckpointError(f"mismatched pair: {far_path} was trained on the codes of the tokenizer with codebook "
                              f"fingerprint {recorded['fingerprint']}, but {tok_path} has {codebook_fingerprint(tok)}")


def load_pair(far_path, tok_path=None, device="cpu"):
    """(FAR, tokenizer, the tokenizer's path, {"classes": the FAR's class names, "step": its training step}, None where
    the file has none) on device, in eval mode, checked against each other (check_pair), or a CheckpointError of one
    line (sample.py, ablate.py --table cfg). Without tok_path: the tokenizer our FAR checkpoint records, at its
    recorded path or beside the FAR file (a released FAR file records none)."""
    ckpt = read_checkpoint(far_path, "--far-ckpt")                    # weights_only=True: no pickled code runs
    model, recorded = load_far(ckpt, device, far_path), ckpt.get("tokenizer", {})   # ours or released
    if tok_path is None:
        rec = recorded.get("path")                                    # absolute path at training time
        near = rec and os.path.join(os.path.dirname(os.path.abspath(far_path)), os.path.basename(rec))
        tok_path = next((f for f in (rec, near) if f and os.path.isfile(f)), None)
        if tok_path is None:
            raise CheckpointError(f"--tokenizer-ckpt is needed: {far_path} names no tokenizer file found here")
    tok = load_tokenizer(tok_path, device)
    check_pair(model.cfg, tok, recorded, far_path, tok_path)          # same (k, K, grid), same codebooks
    return model, tok, tok_path, {k: ckpt.get(k) for k in ("classes", "step")}   # classes: train_far.py's folders


def _status_mib(field):
    """A memory field of /proc/self/status ("VmRSS", "VmHWM") in MiB."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) / 1024


def peak_mib(fn):
    """(extra peak resident memory in MiB, return value) of one fn() call; the peak is None where /proc cannot
    measure it (not Linux). bench.py's peak MiB column (its warm-up run) and ablate.py's peak_train_mib."""
    try:
        # hand freed heap pages back first, so that memory reused from an earlier call counts as new
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                              # resets the peak (VmHWM) to the current RSS
        before = _status_mib("VmRSS")
    except (OSError, AttributeError):
        return None, fn()
    out = fn()                                                        # the peak since the reset includes this call
    return _status_mib("VmHWM") - before, out
