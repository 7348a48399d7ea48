"""sample.py: PNG grids, the ADM npz (same for 1 and 2 processes), pair checks, and the shipped tiny weights.

Run: python -m pytest tests/test_sample.py -q
"""
import os
import signal
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sample  # noqa: E402
from checkpoints import far_ours_to_official  # noqa: E402
from far import FAR, generate  # noqa: E402
from images import to_uint8  # noqa: E402
from tokenizer import PRESETS, Tokenizer, TokenizerConfig  # noqa: E402


def test_png_grid_matches_generate_and_decode(pair, tmp_path):
    d, tok, far = pair
    out = tmp_path / "grid.png"
    sample.main(["--far-ckpt", str(d / "far.pt"), "--class-id", "1", "3", "--per-class", "3", "--out", str(out)])
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 + 2 * 34, 2 + 3 * 34, 3)                   # 2 rows x 3 images of 32 px, padding 2
    # the first image is generate() with the generator of (seed 0, batch 0), decoded, then the official uint8
    g = torch.Generator().manual_seed(0)
    codes = generate(far, torch.tensor([1, 1, 1, 3, 3, 3]), cfg_scale=2.0, generator=g)
    expected = to_uint8(tok.decode_codes(codes))[0].permute(1, 2, 0).numpy()
    assert np.array_equal(grid[2:34, 2:34], expected)


def test_to_uint8_is_the_official_truncation():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 1.5]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    assert to_uint8(x)[0, 0, 0].tolist() == [0, 0, 128, 191, 255, 255, 255]   # 127.5 x + 128, floor


def test_npz_is_class_balanced_and_the_same_for_two_processes(pair, tmp_path, two_ranks):
    d = pair[0]
    flags = [os.path.join(ROOT, "sample.py"), "--far-ckpt", str(d / "far.pt"), "--num-samples", "7",
             "--batch-size", "2"]
    # both runs at one thread per process: only the number of processes differs (the CPU kernels round differently
    # at 1 and 2 threads, which can move a pixel by one step of the uint8 truncation). One process: sample.main in
    # this one, where a model this small samples on 1 thread anyway (sample.py's --threads default); two: 1 thread each
    for left in ("one.npz.part0.npy", "one.npz.part1.npy", "one.npz.tmp123", "two.npz.part3.npy"):   # by killed runs
        (tmp_path / left).write_bytes(b"x" * 100)
    sample.main(flags[1:] + ["--out-npz", str(tmp_path / "one.npz")])
    two_ranks([*flags, "--out-npz", str(tmp_path / "two.npz")], cwd=tmp_path)
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert one["arr_0"].shape == (7, 32, 32, 3) and one["arr_0"].dtype == np.uint8
    assert sorted(np.bincount(one["labels"], minlength=5)) == [1, 1, 1, 2, 2] and list(one["classes"]) == list("vwxyz")
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["labels"], two["labels"])
    assert sorted(os.listdir(tmp_path)) == ["one.npz", "two.npz"]      # no parts or temp files left, old ones gone


class NeverDone:
    is_completed = staticmethod(lambda: False)


@pytest.mark.parametrize("stop", ["SIGTERM", "error", "SIGTERM at the wait"])
def test_a_stopped_npz_run_leaves_no_part_file(stop, pair, tmp_path, monkeypatch, capsys):
    # the part file is the npz's size (9.8 GB for 50,000 images at 256 px): a SIGTERM (a scheduler, torchrun passing
    # on a failure) or an error in batch 2 of 4 removes it; a SIGTERM exits 143 after its batch, naming the signal.
    # At the wait: rank 0 of 2, its two batches done, is stopped while it waits for the other rank, which has passed
    # the wait and left its part to rank 0 (the barrier completes for a rank once all have entered it): rank 0
    # removes both parts
    real, calls = sample.sample, []
    if stop == "SIGTERM at the wait":
        def at_the_wait(async_op=False):
            np.save(tmp_path / "s.npz.part1.npy", np.zeros(1))               # rank 1's part
            os.kill(os.getpid(), signal.SIGTERM)
            return NeverDone()
        monkeypatch.setattr(sample, "init_distributed", lambda device: (False, 0, 2, 0, torch.device("cpu")))
        monkeypatch.setattr(sample.dist, "is_initialized", lambda: True)
        monkeypatch.setattr(sample.dist, "barrier", at_the_wait)

    def sample_then_stop(*a, **kw):
        calls.append(1)
        if len(calls) == 2 and stop == "error":
            raise RuntimeError("out of memory")
        out = real(*a, **kw)
        if len(calls) == 2 and stop == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)                        # noted by sample.py, acted on after the batch
        return out
    monkeypatch.setattr(sample, "sample", sample_then_stop)
    with pytest.raises(SystemExit if stop.startswith("SIGTERM") else RuntimeError) as e:
        sample.main(["--far-ckpt", str(pair[0] / "far.pt"), "--num-samples", "7", "--batch-size", "2", "--out-npz",
                     str(tmp_path / "s.npz")])
    assert len(calls) == 2 and os.listdir(tmp_path) == []
    if stop.startswith("SIGTERM"):
        assert e.value.code == 143 and f"stopped by SIGTERM; no {tmp_path / 's.npz'} written" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL            # sample.py's handler is gone again


def test_a_signal_to_a_rank_waiting_for_the_others_stops_the_run(pair, tmp_path, two_ranks):
    # rank 1 has its one batch done and waits for rank 0's two when its SIGTERM comes (as torchrun sends it when
    # another rank failed; with NCCL a blocking barrier would hold it until torchrun's SIGKILL): it stops there, exit
    # 143, rank 0 is stopped in turn (SIGTERM, as torchrun does), and no part file or npz is left. The wait is polled
    # so the signal is acted on.
    (tmp_path / "run.py").write_text(f"""import os, signal, sys, time
sys.path.insert(0, {ROOT!r})
import sample, torch.distributed as dist
real_sample, real_barrier = sample.sample, dist.barrier
def slow(*a, **kw):                                   # rank 0: its two batches take a while
    time.sleep(0.5 if os.environ["RANK"] == "0" else 0)
    return real_sample(*a, **kw)
def signalled(*a, **kw):                              # rank 1: SIGTERM on arrival at the wait for the others' parts
    if os.environ["RANK"] == "1" and kw.get("async_op"):
        os.kill(os.getpid(), signal.SIGTERM)
    return real_barrier(*a, **kw)
sample.sample, dist.barrier = slow, signalled
sample.main(sys.argv[1:])
""")
    ranks = two_ranks([str(tmp_path / "run.py"), "--far-ckpt", str(pair[0] / "far.pt"), "--num-samples", "6",
                       "--batch-size", "2", "--out-npz", str(tmp_path / "s.npz")], cwd=tmp_path, check=False)
    assert ranks.codes[1] == 143 and ranks.codes[0] != 0, ranks.out
    assert sorted(os.listdir(tmp_path)) == ["run.py"]                   # no part file, no npz


def test_bad_arguments_exit_2(pair, tmp_path, capsys):
    d, tok, _ = pair
    def fails(*flags):
        with pytest.raises(SystemExit) as e:
            sample.main(["--far-ckpt", str(d / "far.pt"), "--out", str(tmp_path / "x.png"), *flags])
        assert e.value.code == 2
        return capsys.readouterr().err
    assert "classes 0..4 (0 v, 1 w" in fails("--class-id", "5")
    assert "no such file" in fails("--class-id", "0", "--tokenizer-ckpt", str(tmp_path / "missing.pt"))
    assert "--top-p 1.5 is out of range" in fails("--class-id", "0", "--top-p", "1.5")
    assert f"--threads {os.cpu_count() + 1} is out of range: must be an integer in 1..{os.cpu_count()}" in fails(
        "--class-id", "0", "--threads", str(os.cpu_count() + 1))
    # a tokenizer of another shape, and one of the same shape with other codebooks
    cfg = TokenizerConfig(**{**PRESETS["tiny"], "image_size": 32, "codebook_size": 256})
    torch.save({"model": Tokenizer(cfg).state_dict(), "config": asdict(cfg)}, tmp_path / "other.pt")
    assert "(2, 512, (4, 4))" in fails("--class-id", "0", "--tokenizer-ckpt", str(tmp_path / "other.pt"))
    torch.save({"model": Tokenizer(tok.cfg).state_dict(), "config": asdict(tok.cfg)}, tmp_path / "retrained.pt")
    assert "fingerprint" in fails("--class-id", "0", "--tokenizer-ckpt", str(tmp_path / "retrained.pt"))
    swapped = fails("--class-id", "0", "--far-ckpt", str(d / "tok.pt"))    # the tokenizer given as FAR: named
    assert f"FAR checkpoint {d / 'tok.pt'} is not a FAR" in swapped and ": it holds a tokenizer (" in swapped


def test_shipped_tiny_weights_sample_with_no_arguments(tmp_path):
    # the README's first command: no checkpoint flags, the committed weights/ files
    out = tmp_path / "samples.png"
    sample.main(["--class-id", "3", "--per-class", "2", "--out", str(out)])
    img = np.asarray(Image.open(out))
    assert img.shape == (2 + 66, 2 + 2 * 66, 3) and img.std() > 10     # 2 images of 64 px, not a flat colour


def test_official_far_file_samples_with_a_tokenizer(pair, tmp_path, capsys):
    # an official-layout FAR file (tok_embeddings_1, output_1, ..., a pickled argparse.Namespace, no tokenizer
    # record): sample.py loads it safely, needs --tokenizer-ckpt, and draws the same images as our layout
    import argparse
    d, _, far = pair
    args = argparse.Namespace(image_size=32, downsample_size=8, gpt_model="FAR-tiny")
    torch.save({"model": far_ours_to_official(far.state_dict()), "args": args, "steps": 10}, tmp_path / "official.pt")
    with pytest.raises(SystemExit) as e:
        sample.main(["--far-ckpt", str(tmp_path / "official.pt"), "--class-id", "0"])
    assert e.value.code == 2 and "--tokenizer-ckpt is needed: " in capsys.readouterr().err
    flags = ["--class-id", "2", "--per-class", "2", "--tokenizer-ckpt", str(d / "tok.pt")]
    sample.main(["--far-ckpt", str(tmp_path / "official.pt"), "--out", str(tmp_path / "a.png"), *flags])
    sample.main(["--far-ckpt", str(d / "far.pt"), "--out", str(tmp_path / "b.png"), *flags])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


def test_compile_and_no_compile_give_identical_pngs(pair, tmp_path):
    """--compile runs far.generate's decode step through torch.compile (static KV cache): the same seed gives the same
    PNG as eager. A one-layer FAR over the pair's tokenizer keeps the compile short on a CPU."""
    import dataclasses
    d, tok, far = pair
    small = FAR(dataclasses.replace(far.cfg, n_layer=1, ar_head_layers=1))
    for out in small.output:                                             # not the uniform zero init
        torch.nn.init.normal_(out.weight, std=0.5)
    ckpt = torch.load(d / "far.pt", weights_only=True)
    torch.save({**ckpt, "model": small.state_dict(), "config": dataclasses.asdict(small.cfg)}, tmp_path / "far1.pt")
    flags = ["--far-ckpt", str(tmp_path / "far1.pt"), "--class-id", "0", "4", "--per-class", "3"]
    sample.main([*flags, "--compile", "--out", str(tmp_path / "compiled.png")])
    sample.main([*flags, "--no-compile", "--out", str(tmp_path / "eager.png")])
    compiled, eager = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("compiled", "eager"))
    assert np.array_equal(compiled, eager) and eager.std() > 10


def test_png_mode_under_torchrun_is_written_once(pair, tmp_path, two_ranks):
    """The PNG grid is one file: under torchrun rank 0 alone samples and writes it; the other ranks only join."""
    ranks = two_ranks([os.path.join(ROOT, "sample.py"), "--far-ckpt", str(pair[0] / "far.pt"), "--class-id", "1",
                       "--per-class", "2", "--out", str(tmp_path / "grid.png")], cwd=tmp_path)
    assert [out.count("wrote") for out in ranks.out] == [1, 0] and sorted(os.listdir(tmp_path)) == ["grid.png"]


def test_small_models_sample_on_one_thread_and_the_count_is_restored(pair, tmp_path, monkeypatch):
    """A tiny FAR's matmuls gain nothing from a second CPU thread and lose much when the machine is busy (README):
    sample.py uses 1 thread for models under 50 M parameters unless --threads says otherwise, then restores it."""
    calls, real = [], torch.set_num_threads
    monkeypatch.setattr(sample.torch, "set_num_threads", lambda n: (calls.append(n), real(n)))
    before = torch.get_num_threads()
    flags = ["--far-ckpt", str(pair[0] / "far.pt"), "--class-id", "1", "--per-class", "1", "--out"]
    sample.main(flags + [str(tmp_path / "a.png")])
    sample.main(flags + [str(tmp_path / "b.png"), "--threads", "2"])
    assert calls == [1, before, 2, before] and torch.get_num_threads() == before
