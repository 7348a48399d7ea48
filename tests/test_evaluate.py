"""evaluate.py: the uint8 protocol, FID with a random Inception, every metric equal to a direct computation over the
images, code usage over a whole set, 2 processes equal 1, figures, npz streaming, missing weights and bad flags
(the formulas alone: tests/test_metrics.py).

No network: torch-fidelity's Inception is built with random weights and saved to a temp file; the Inception metrics
run on its first pooled layer ("64", three convolutions) of 75 px inputs so that they take a fraction of a second.
Run: python -m pytest tests/test_evaluate.py -q
"""
import json
import math
import os
import sys
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import evaluate  # noqa: E402
import figures  # noqa: E402
import images  # noqa: E402
import metrics  # noqa: E402
from checkpoints import load_tokenizer  # noqa: E402
from images import BUNDLED, ImageFolder, center_crop, image_batches, to_uint8  # noqa: E402
from losses import LPIPS  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

VAL = os.path.join(BUNDLED, "val")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tests run many small ops, which extra threads only slow down on a shared CPU; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    """A randomly initialised torch-fidelity Inception, saved as a weight file (its constructor would download)."""
    path = tmp_path_factory.mktemp("weights") / "inception-random.pth"
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None), \
            mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: {}):
        torch.manual_seed(0)
        torch.save(FeatureExtractorInceptionV3("inception-v3-compat", ["64"]).state_dict(), path)
    return str(path)


@pytest.fixture
def small_layers(monkeypatch):
    """Inception metrics on the first pooled layer of a 75 px input: about 100x cheaper than "2048" at 299 px."""
    for metric in ("fid", "isc", "prc"):
        monkeypatch.setitem(metrics.LAYERS, metric, "64")
    monkeypatch.setattr(FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75)


def photos(n, size=32):
    """The first n bundled val photos, center-cropped, uint8 (n, 3, size, size)."""
    ds = ImageFolder(VAL, (size, size), train=False)
    return torch.stack([to_uint8(ds[i][0]) for i in range(n)])


def run_main(tmp_path, *flags):
    out = tmp_path / "res.json"
    evaluate.main([*flags, "--out-json", str(out)])
    return json.loads(out.read_text())


# --------------------------------------------------------------------------------------------------------------
# The uint8 protocol

def test_to_uint8_gives_back_the_crop_pixels():
    ds = ImageFolder(VAL, (32, 32), train=False)
    path = ds.samples[5][0]
    expected = np.asarray(center_crop(Image.open(path).convert("RGB"), (32, 32)))
    assert np.array_equal(to_uint8(ds[5][0]).permute(1, 2, 0).numpy(), expected)


# --------------------------------------------------------------------------------------------------------------
# torch-fidelity metrics

def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(inception, small_layers):
    fe = metrics.load_inception("cpu", inception)
    x = photos(16)
    g = torch.Generator().manual_seed(0)

    def feats(sigma):
        noisy = (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 255).to(torch.uint8)
        return fe.convert_features_tuple_to_dict(fe(noisy))
    ref = feats(0)
    fids = [metrics.fidelity(feats(sigma), ref)["fid"] for sigma in (0, 8, 32, 96)]
    assert abs(fids[0]) < 1e-3 * fids[1] and fids[1] < fids[2] < fids[3], fids


def test_missing_inception_weights_name_the_file_and_url(tok_ckpt, tmp_path, monkeypatch, capsys):
    """--fid asks for rFID (no silent null), and generation mode needs Inception: without its file, one error line that
    names the path and the download, exit 2, no result file; both modes."""
    monkeypatch.setenv("FQGAN_WEIGHTS", str(tmp_path))
    name = "weights-inception-2015-12-05-6726825d.pth"
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((2, 32, 32, 3), np.uint8))
    for mode in (["--tokenizer-ckpt", tok_ckpt, "--fid", "--num-images", "1"],
                 ["--samples", str(tmp_path / "s.npz"), "--reference", str(tmp_path / "s.npz")]):
        with pytest.raises(SystemExit) as e:
            evaluate.main(mode + ["--out-json", str(tmp_path / "r.json")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err and "error: Inception weights not found: " \
            f"{tmp_path / name} (download: https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{name})" \
            in err, err
        assert not os.path.exists(tmp_path / "r.json")
    assert evaluate.INCEPTION_FILE == os.path.basename(URL_INCEPTION_V3)   # our default path's name is the release's


def test_generation_mode_npz_against_folder(inception, small_layers, tmp_path, capsys):
    x = photos(12)
    arr = x.permute(0, 2, 3, 1).numpy()                         # (N, H, W, 3), the ADM layout
    np.savez_compressed(tmp_path / "samples.npz", arr_0=arr)
    os.makedirs(tmp_path / "ref")
    for i, img in enumerate(arr):
        Image.fromarray(img).save(tmp_path / "ref" / f"{i:03d}.png")
    (tmp_path / "ref" / "broken.png").write_bytes(b"not a png")  # skipped, counted and named, never replaced
    batches = list(image_batches(str(tmp_path / "samples.npz"), 5))
    assert [len(b) for _, b in batches] == [5, 5, 2] and torch.equal(torch.cat([b for _, b in batches]), x)
    assert torch.equal(torch.cat([i for i, _ in batches]), torch.arange(12))
    for path in ("samples.npz", "ref"):                        # 3 ranks' shards: every image once, at its index
        shards = [list(image_batches(str(tmp_path / path), 2, (32, 32), [], shard=(r, 3))) for r in range(3)]
        index = torch.cat([i for s in shards for i, _ in s])
        assert sorted(index.tolist()) == list(range(12)) and torch.equal(torch.cat([b for s in shards for _, b in s])
                                                                          [index.argsort()], x)
    assert [len(b) for _, b in image_batches(str(tmp_path / "ref"), 5, shard=(0, 3))] == [4]   # files 0, 3, 6, 9
    res = run_main(tmp_path, "--samples", str(tmp_path / "samples.npz"), "--reference", str(tmp_path / "ref"),
                   "--inception-weights", inception, "--batch-size", "5")
    assert res["images"] == res["reference_images"] == 12
    assert (res["unreadable"], res["reference_unreadable"]) == (0, 1)
    ref = tmp_path / "ref"
    assert f"note: 1 unreadable images skipped in {ref}: {ref / 'broken.png'}" in capsys.readouterr().out
    assert abs(res["fid"]) < 1e-3 and res["precision"] == res["recall"] == 1.0 and res["inception_score"] > 1 - 1e-9
    os.makedirs(tmp_path / "none")                             # a reference of unreadable files only: one line, exit 2
    (tmp_path / "none" / "a.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--samples", str(tmp_path / "samples.npz"), "--reference", str(tmp_path / "none"),
                       "--inception-weights", inception, "--out-json", str(tmp_path / "none.json")])
    assert e.value.code == 2 and f"none of the images in {tmp_path / 'none'} could be read" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "none.json")
    np.savez(tmp_path / "bad.npz", arr_0=arr.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        next(image_batches(str(tmp_path / "bad.npz"), 5))
    np.savez(tmp_path / "big.npz", arr_0=np.zeros((2, 48, 48, 3), np.uint8))   # a reference of another size: exit 2
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--samples", str(tmp_path / "samples.npz"), "--reference", str(tmp_path / "big.npz"),
                       "--inception-weights", inception, "--out-json", str(tmp_path / "r2.json")])
    assert e.value.code == 2 and "big.npz: images are 48x48, the samples 32x32" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# Generation mode without a download: the stand-in teacher's acc_teacher / fd_teacher

@pytest.fixture(scope="module")
def crops():
    """150 random 32-px crops of the held-out photos (not the seeds 0 / 1 evaluate.py draws its reference and floor
    from) and their labels: real images as a sample set. The margins of the two tests below at 150 crops, for crop
    seeds 7-10 and 12: |acc - acc_real| <= 0.045 (bound 0.1), shuffled acc <= 0.133 (0.25), fd <= 0.28 of its bound,
    the grey set's fd 3.3x its bound (at 300 crops the test took twice as long, the floor's reconstructions)."""
    x, labels, classes = images.real_crops(VAL, (32, 32), 150, seed=7)
    return x, labels, classes


def teacher_run(tmp_path, tok_ckpt, samples):
    return run_main(tmp_path, "--samples", str(samples), "--tokenizer-ckpt", tok_ckpt, "--real-crops", "600")


def test_teacher_metrics_of_real_crops_equal_the_floor_shuffled_labels_give_chance(crops, tok_ckpt, tmp_path):
    x, labels, classes = crops
    for i, (img, label) in enumerate(zip(x, labels)):           # as a folder root/<class name>/<image>
        os.makedirs(tmp_path / "real" / classes[label], exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / "real" / classes[label] / f"{i:03d}.png")
    real = teacher_run(tmp_path, tok_ckpt, tmp_path / "real")
    assert real["images"] == 150 and real["real_crops"] == 600 and math.isclose(real["teacher_chance"], 1 / 11)
    # real crops are real: as far from the reference as other real crops, classified as often as the reference
    assert real["fd_teacher"] < 3 * real["fd_teacher_floor"] + 0.05, real
    assert abs(real["acc_teacher"] - real["acc_teacher_real"]) < 0.1 and real["acc_teacher"] > 0.4, real
    # a random tokenizer's reconstructions are far from real crops: the scale of the metric
    assert real["fd_teacher_rec"] > 10 * real["fd_teacher"] and real["acc_teacher_rec"] < real["acc_teacher"]
    # the same images with shuffled labels (an npz, as sample.py writes): features unchanged, accuracy near chance
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    np.savez(tmp_path / "shuffled.npz", arr_0=x.permute(0, 2, 3, 1).numpy(), labels=shuffled.numpy())
    res = teacher_run(tmp_path, tok_ckpt, tmp_path / "shuffled.npz")
    assert math.isclose(res["fd_teacher"], real["fd_teacher"], rel_tol=1e-3, abs_tol=1e-4)
    assert res["acc_teacher"] < 0.25 and res["fd_teacher_floor"] == real["fd_teacher_floor"]
    # sample.py's npz of a FAR whose class ids are not the teacher's (its classes in reverse order here): the names
    # in `classes` map them back, and the metrics are the folder's
    names = classes[::-1]
    np.savez(tmp_path / "renamed.npz", arr_0=x.permute(0, 2, 3, 1).numpy(), labels=(10 - labels).numpy(),
             classes=np.array(names))
    res = teacher_run(tmp_path, tok_ckpt, tmp_path / "renamed.npz")
    assert res["acc_teacher"] == real["acc_teacher"] and math.isclose(res["fd_teacher"], real["fd_teacher"],
                                                                      rel_tol=1e-3, abs_tol=1e-4)


def test_teacher_metrics_of_constant_colour_images_are_far_away(crops, tok_ckpt, tmp_path):
    x, labels, _ = crops
    grey = torch.full_like(x, 128).permute(0, 2, 3, 1)          # (N, H, W, 3): one colour, every sample
    np.savez(tmp_path / "grey.npz", arr_0=grey.numpy(), labels=labels.numpy())
    res = teacher_run(tmp_path, tok_ckpt, tmp_path / "grey.npz")
    assert res["fd_teacher"] > 100 * res["fd_teacher_floor"] and res["fd_teacher"] > 1, res


@pytest.mark.parametrize("arrays,message", [
    (dict(labels=np.zeros(3)), "has no labels array"),
    (dict(labels=np.array([0, 1, 11])), "teacher knows 11 classes"),
    (dict(labels=np.array([0, 1, 1]), classes=np.array(["coins", "tulips"])), "the FAR's classes tulips are not"),
    (dict(labels=np.array([0, 1, 2]), classes=np.array(["coins", "brick"])), "labels in [0, 2] for 2 class names")])
def test_teacher_mode_needs_the_teachers_class_ids(arrays, message, tok_ckpt, tmp_path, capsys):
    arrays = {"arr_0": np.zeros((3, 32, 32, 3), np.uint8), **arrays}
    if message.startswith("has no"):
        arrays.pop("labels")
    np.savez(tmp_path / "s.npz", **arrays)
    with pytest.raises(SystemExit) as e:
        teacher_run(tmp_path, tok_ckpt, tmp_path / "s.npz")
    assert e.value.code == 2 and message in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# Tokenizer mode

def test_tokenizer_mode_metrics_equal_a_direct_computation(tok_ckpt, inception, small_layers, tmp_path, monkeypatch,
                                                           capsys):
    monkeypatch.setenv("FQGAN_WEIGHTS", str(tmp_path))         # no LPIPS weights there: null and a note
    res = run_main(tmp_path, "--tokenizer-ckpt", tok_ckpt, "--num-images", "8", "--batch-size", "3",
                   "--num-workers", "0", "--fid", "--inception-weights", inception)
    assert "note: LPIPS reported as null" in capsys.readouterr().out and res["lpips"] is None
    assert not torch.backends.cudnn.allow_tf32                 # metrics: fp32 convolutions on a GPU, not TF32
    torch.backends.cudnn.allow_tf32 = True                     # torch's default again, for the other tests
    tok = load_tokenizer(tok_ckpt)
    x = torch.stack([ImageFolder(VAL, (32, 32), train=False)[i][0] for i in range(8)])
    with torch.no_grad():
        codes = tok.encode(x)
        rec = to_uint8(tok.decode_codes(codes)).double() / 255
    mse = (rec - to_uint8(x).double() / 255).pow(2).flatten(1).mean(1)
    assert res["images"] == 8 and math.isclose(res["psnr"], (10 * torch.log10(1 / mse)).mean().item(), rel_tol=1e-6)
    assert 0 < res["ssim"] < 1 and res["rfid"] > 0 and res["inception_score"] > 1 - 1e-9
    for i in range(2):
        counts = np.bincount(codes[:, i].flatten().numpy(), minlength=512)
        p = counts[counts > 0] / counts.sum()
        assert math.isclose(res[f"usage/{i}"], (counts > 0).mean(), rel_tol=1e-6)
        assert math.isclose(res[f"perplexity/{i}"], np.exp(-(p * np.log(p)).sum()), rel_tol=1e-5)


def test_tokenizer_mode_lpips_with_its_weights_equals_lpips_of_the_uint8_images(tok_ckpt, lpips_files, tmp_path,
                                                                                 monkeypatch):
    # the weights found in $FQGAN_WEIGHTS (random here, the official file formats): LPIPS is measured, not null, and
    # is the mean over images of LPIPS on what the other metrics see, the uint8 originals and reconstructions
    monkeypatch.setenv("FQGAN_WEIGHTS", str(lpips_files[0]))
    res = run_main(tmp_path, "--tokenizer-ckpt", tok_ckpt, "--num-images", "5", "--batch-size", "2",
                   "--num-workers", "0", "--no-fid")
    tok, lpips = load_tokenizer(tok_ckpt), LPIPS()
    x = torch.stack([ImageFolder(VAL, (32, 32), train=False)[i][0] for i in range(5)])
    with torch.no_grad():
        rec, real = to_uint8(tok.decode_codes(tok.encode(x))), to_uint8(x)
        d = lpips(rec / 127.5 - 1, real / 127.5 - 1)                  # (5,) one distance per image
    assert d.shape == (5,) and torch.all(d > 0)
    assert math.isclose(res["lpips"], d.mean().item(), rel_tol=1e-5)


def test_usage_counts_the_whole_set_not_each_batch(tok_ckpt, tmp_path, monkeypatch):
    # sub-codebook 0: code 7 everywhere; sub-codebook 1: batch b uses code b only. Batches of 3, 3, 2 images ->
    # counts 3:3:2 over the set: perplexity exp(H(3/8, 3/8, 2/8)); a per-batch average would give 1.
    calls = []

    def encode(self, x):
        calls.append(len(calls))
        return torch.stack([torch.full((len(x), 4, 4), 7), torch.full((len(x), 4, 4), calls[-1])], 1)
    monkeypatch.setattr(Tokenizer, "encode", encode)
    res = run_main(tmp_path, "--tokenizer-ckpt", tok_ckpt, "--num-images", "8", "--batch-size", "3", "--num-workers",
                   "0", "--no-fid", "--no-lpips")
    p = np.array([3, 3, 2]) / 8
    assert res["usage/0"] == 1 / 512 and res["usage/1"] == 3 / 512 and res["perplexity/0"] == 1.0
    assert math.isclose(res["perplexity/1"], np.exp(-(p * np.log(p)).sum()), rel_tol=1e-6)


def test_loader_workers_give_the_same_metrics_and_start_after_the_heap_is_released(tok_ckpt, tmp_path, monkeypatch):
    """--num-workers 1 decodes the images in a worker: the metrics are those of the main process's own loading, and
    the heap's free pages go back to the kernel before the worker is forked (images.release_free_memory)."""
    calls = []
    monkeypatch.setattr(evaluate, "release_free_memory", lambda: calls.append(1))
    flags = ["--tokenizer-ckpt", tok_ckpt, "--num-images", "4", "--batch-size", "2", "--no-fid", "--no-lpips"]
    zero = run_main(tmp_path, *flags, "--num-workers", "0")
    assert calls == []
    one = run_main(tmp_path, *flags, "--num-workers", "1")
    assert calls == [1] and one == zero, (one, zero)


def test_two_processes_equal_one(tok_ckpt, tmp_path, two_ranks):
    flags = ["--tokenizer-ckpt", tok_ckpt, "--num-images", "7", "--batch-size", "2", "--num-workers", "0", "--no-fid",
             "--no-lpips"]
    one = run_main(tmp_path, *flags)
    two_ranks(["evaluate.py", *flags, "--out-json", str(tmp_path / "two.json")])   # 1 thread each
    two = json.loads((tmp_path / "two.json").read_text())      # rank 0 gets images 0, 2, 4, 6; rank 1 the rest
    assert one["images"] == two["images"] == 7
    for key in ("psnr", "ssim", "usage/0", "usage/1", "perplexity/0", "perplexity/1"):
        # ssim: float32 convolutions over other batches round differently (measured: 1.3e-6 apart at 0.0297)
        assert math.isclose(one[key], two[key], rel_tol=1e-4 if key == "ssim" else 1e-6, abs_tol=1e-6), \
            (key, one[key], two[key])


def test_fewer_images_than_processes_is_one_line_exit_2(tok_ckpt, tmp_path, monkeypatch, capsys):
    """--num-images 1 on 2 ranks (rank 0 of them here): every rank needs an image of its own; refused before any image is measured."""
    monkeypatch.setattr(evaluate, "init_distributed", lambda device: (False, 0, 2, 0, torch.device("cpu")))
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--tokenizer-ckpt", tok_ckpt, "--num-images", "1", "--num-workers", "0", "--no-fid",
                       "--no-lpips", "--out-json", str(tmp_path / "r.json")])
    assert e.value.code == 2 and "1 images for 2 processes: every rank needs at least one" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r.json")


def test_generation_mode_two_processes_equal_one(inception, tmp_path, two_ranks):
    # rank r decodes and embeds only the files r, r + 2, ... of a folder (batches r, r + 2, ... of an npz); rank 0 gets
    # every rank's features, back in file order (image_batches' indices: test above; with random weights IS is 1 in
    # any order), and every rank's unreadable files: the one here is rank 1's
    x = photos(7).permute(0, 2, 3, 1).numpy()                  # (N, H, W, 3)
    np.savez(tmp_path / "samples.npz", arr_0=x)
    os.makedirs(tmp_path / "ref")
    for i, img in enumerate(x[:5]):
        Image.fromarray(img).save(tmp_path / "ref" / f"{i:03d}.png")
    (tmp_path / "ref" / "002b.png").write_bytes(b"not a png")   # listed 4th: a file of rank 1 of 2
    flags = ["--samples", str(tmp_path / "samples.npz"), "--reference", str(tmp_path / "ref"), "--inception-weights",
             inception, "--batch-size", "2"]
    one = run_main(tmp_path, *flags)
    two_ranks(["evaluate.py", *flags, "--out-json", str(tmp_path / "two.json")])   # 1 thread each
    two = json.loads((tmp_path / "two.json").read_text())
    assert (one["images"], one["reference_images"], one["reference_unreadable"]) == (7, 5, 1)
    for key in ("images", "unreadable", "reference_images", "reference_unreadable", "fid", "inception_score",
                "inception_score_std", "precision", "recall"):
        assert math.isclose(one[key], two[key], rel_tol=1e-6, abs_tol=1e-6), (key, one[key], two[key])


# --------------------------------------------------------------------------------------------------------------
# Figures

def test_figures_are_written_with_the_expected_size(tok_ckpt, tmp_path):
    figures.main(["--tokenizer-ckpt", tok_ckpt, "--out-dir", str(tmp_path), "--fig3-images", "3", "--fig4-method",
                  "pca"])
    fig3 = np.asarray(Image.open(tmp_path / "fig3.png"))
    assert fig3.shape == (20 + 3 * 128, 4 * 128, 3)             # 3 rows; original, full, 2 sub-codebooks; 32 px x4
    first = photos(1)[0].repeat_interleave(4, 1).repeat_interleave(4, 2).permute(1, 2, 0).numpy()
    assert np.array_equal(fig3[20:148, :128], first)            # the original of the first image, top left
    fig4 = np.asarray(Image.open(tmp_path / "fig4.png"))
    assert fig4.shape == (20 + 320 + 24, 2 * 320, 3)             # one panel per sub-codebook, title and legend
    for colour in figures.PALETTE[:4]:                         # points (and legend) of the 4 classes are drawn
        assert (fig4 == colour).all(-1).sum() > 50, colour
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]   # atomic writes leave no temp files


def test_figures_skip_unreadable_images(tok_ckpt, tmp_path, capsys):
    """An unreadable file where a Fig. 3 row would start gives way to the next readable image (no black row, no
    zeros among Fig. 4's tokens); a folder of unreadable files only is one line and exit 2, as is an --out-dir that is
    a file."""
    x = photos(2)
    for c in "ab":
        os.makedirs(tmp_path / "data" / c)
    (tmp_path / "data" / "a" / "0.png").write_bytes(b"not a png")   # the first image of the sorted list
    Image.fromarray(x[0].permute(1, 2, 0).numpy()).save(tmp_path / "data" / "a" / "1.png")
    Image.fromarray(x[1].permute(1, 2, 0).numpy()).save(tmp_path / "data" / "b" / "0.png")
    figures.main(["--tokenizer-ckpt", tok_ckpt, "--data-path", str(tmp_path / "data"), "--out-dir",
                  str(tmp_path / "figs"), "--fig3-images", "2", "--fig4-classes", "2", "--fig4-method", "pca"])
    fig3 = np.asarray(Image.open(tmp_path / "figs" / "fig3.png"))
    for row in range(2):                                        # the originals: a/1.png (after the broken a/0.png), b/0
        original = fig3[20 + 128 * row:148 + 128 * row, :128]
        assert np.array_equal(original, x[row].repeat_interleave(4, 1).repeat_interleave(4, 2).permute(1, 2, 0).numpy())
    for c in "ab":
        os.makedirs(tmp_path / "broken" / c)
        (tmp_path / "broken" / c / "0.png").write_bytes(b"not a png either")
    with pytest.raises(SystemExit) as e:
        figures.main(["--tokenizer-ckpt", tok_ckpt, "--data-path", str(tmp_path / "broken"), "--out-dir",
                      str(tmp_path / "none")])
    assert e.value.code == 2 and "none of its 2 images could be read" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "none")                  # nothing made before the error
    # class a unreadable, b readable: Fig. 3 shows b; Fig. 4 of class a alone has nothing to show (exit 2, no figure
    # written), of classes a and b it shows b alone, in the first colour
    Image.fromarray(x[1].permute(1, 2, 0).numpy()).save(tmp_path / "broken" / "b" / "0.png")
    flags = ["--tokenizer-ckpt", tok_ckpt, "--data-path", str(tmp_path / "broken"), "--fig4-method", "pca"]
    with pytest.raises(SystemExit) as e:
        figures.main([*flags, "--out-dir", str(tmp_path / "a"), "--fig4-classes", "1"])
    assert e.value.code == 2 and "no readable image in the Fig. 4 classes a" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "a")                     # the folder it made for the figures: removed
    (tmp_path / "a_file").write_text("mine")                     # --out-dir a file: one line, the file kept
    with pytest.raises(SystemExit) as e:
        figures.main([*flags, "--out-dir", str(tmp_path / "a_file")])
    assert e.value.code == 2 and "--out-dir" in capsys.readouterr().err and (tmp_path / "a_file").read_text() == "mine"
    figures.main([*flags, "--out-dir", str(tmp_path / "ab"), "--fig4-classes", "2"])
    colours = {tuple(c) for c in np.asarray(Image.open(tmp_path / "ab" / "fig4.png")).reshape(-1, 3).tolist()}
    assert figures.PALETTE[0] in colours and figures.PALETTE[1] not in colours


def test_tsne_separates_two_clusters():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(30, 8, generator=g), torch.randn(30, 8, generator=g) + 6])
    y = figures.tsne(x, perplexity=10)
    nearest = (torch.cdist(y, y) + torch.eye(60) * 1e9).argmin(1)
    assert y.shape == (60, 2) and ((nearest < 30) == (torch.arange(60) < 30)).all()
    gap = (y[:30].mean(0) - y[30:].mean(0)).norm()
    assert gap > 3 * max(y[:30].std(0).norm(), y[30:].std(0).norm())


# --------------------------------------------------------------------------------------------------------------
# Flags

@pytest.mark.parametrize("flags,message", [
    (["--batch-size", "0"], "--batch-size 0 is out of range: must be an integer >= 1"),
    (["--reference", "x.npz"], "--reference needs --samples"),
    (["--tokenizer-ckpt", "nope.pt"], "--tokenizer-ckpt nope.pt does not exist"),
    (["--lpips", "maybe"], "unrecognized arguments")])
def test_invalid_flags_exit_2(flags, message, tok_ckpt, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.parse_args(["--tokenizer-ckpt", tok_ckpt, *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_every_flag_is_read(tok_ckpt):
    source = open(os.path.join(ROOT, "evaluate.py")).read()
    for name in vars(evaluate.parse_args(["--tokenizer-ckpt", tok_ckpt])[0]):
        assert f"args.{name}" in source, f"--{name.replace('_', '-')} is parsed but never read"
