"""ablate.py: the --quick path of both tables and the CFG sweep end to end (JSON rows, finite numbers, resume skips done runs) and the
mean / std aggregation over seeds.

Run: python -m pytest tests/test_ablate.py -q
"""
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ablate  # noqa: E402


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_mean_std_over_seeds():
    runs = [{"psnr": 10.0, "usage": [0.5, 1.0], "lpips": None, "name": "a"},
            {"psnr": 12.0, "usage": [0.7, 1.0], "lpips": None, "name": "b"}]
    mean, std = ablate.mean_std(runs)
    assert mean == {"psnr": 11.0, "usage": [0.6, 1.0], "lpips": None}           # strings are left out
    assert std["psnr"] == pytest.approx(math.sqrt(2)) and std["usage"] == [pytest.approx(math.sqrt(0.02)), 0.0]
    assert std["lpips"] is None
    assert ablate.mean_std(runs[:1])[1] == {"psnr": None, "usage": [None, None], "lpips": None}   # one seed: no std


def test_mean_std_keeps_only_the_metrics_every_run_has():
    """A table resumed across versions: runs made before a metric existed do not break the aggregate."""
    mean, std = ablate.mean_std([{"psnr": 10.0}, {"psnr": 12.0, "seconds_per_step": 0.5}])
    assert mean == {"psnr": 11.0} and set(std) == {"psnr"}


def test_peak_rss_sees_a_large_allocation():
    peak, out = ablate.peak_mib(lambda: int(torch.ones(64, 2**20).sum()))   # 256 MiB of float32, then freed
    assert out == 64 * 2**20 and (peak is None or 200 < peak < 1000)


def test_quick_ibq_sweep_rows_curves_and_figure(tmp_path):
    """--table ibq: VQ / IBQ / FQ rows at their codebook (K codes stored; FQ: 2 sub-codebooks of K/2), the regime's d
    and normalisation in the checkpoint, the usage curve of every log window, time and memory; resume trains
    nothing; the figure is drawn."""
    assert len(ablate.IBQ) == 3 * 2 * len(ablate.IBQ_SIZES) and min(ablate.IBQ_SIZES) <= 2**10 <= 2**16 == max(
        ablate.IBQ_SIZES) and len(ablate.IBQ_SIZES) >= 4
    out, fig, work = tmp_path / "ibq.json", tmp_path / "ibq.png", tmp_path / "runs"
    rows = ["VQ-d64-1024", "FQ-d8-4096", "IBQ-d8-65536"]
    argv = ["--table", "ibq", "--quick", "--rows", *rows, "--steps", "4", "--log-every", "2", "--work-dir", str(work),
            "--out", str(out), "--figure", str(fig)]
    ablate.main(argv)
    data = json.loads(out.read_text())
    assert data["budget"]["curve_every"] == 2 and data["budget"]["precision"] == "bf16" and list(data["rows"]) == rows
    expect = {"VQ-d64-1024": (1024, 10, 1, 1024, 64, False), "FQ-d8-4096": (4096, 22, 2, 2048, 8, True),
              "IBQ-d8-65536": (65536, 16, 1, 65536, 8, False)}   # stored, bits, k, K per sub-codebook, d, l2
    for name, (stored, bits, k, K, d, l2) in expect.items():
        run = data["rows"][name]["runs"]["0"]
        assert run["codes_stored"] == stored and run["bits_per_token"] == bits and len(run["usage"]) == k
        assert run["command"] == "python ablate.py " + " ".join(argv)   # each run: the call that made it
        assert 0 < min(run["usage"]) and max(run["usage"]) <= run["usage_tokens"] / K    # 640 tokens can't fill K
        assert run["curve"]["step"] == [2, 4] and run["curve"]["tokens"] == [2 * 2 * 16] * 2   # 2 steps x 2 x 4x4
        assert all(len(u) == k and 0 < min(u) and max(u) <= 64 / K for u in run["curve"]["usage"])
        assert run["seconds_per_step"] > 0 and (run["peak_train_mib"] is None or run["peak_train_mib"] > 0)
        assert run["cpu_allocator"] == ("glibc default" if os.environ.get("FQGAN_KEEP_FREED_MEMORY") == "0" else
                                        "freed memory kept")          # what the time and peak were measured on
        cfg = torch.load(work / f"tabibq-{name}-seed0" / "checkpoints" / "last.pt", weights_only=True)["config"]
        assert (cfg["num_codebooks"], cfg["codebook_size"], cfg["codebook_dim"]) == (k, K, d)
        assert cfg["quantizer"] == ("ibq" if name.startswith("IBQ") else "vq") and (cfg["l2_norm"] == l2 or
                                                                                     cfg["quantizer"] == "ibq")
    assert fig.read_bytes()[:4] == b"\x89PNG"
    ablate.main(argv)                                   # the same command again: every run is in the JSON
    assert json.loads(out.read_text())["rows"] == data["rows"]


def check_common(data, table):
    assert data["table"] == table and data["budget"]["steps"] == 2 and data["budget"]["seeds"] == [0]
    assert data["machine"]["torch"] and data["command"].startswith("python ablate.py --table " + table)
    for row in data["rows"].values():
        if "skipped" not in row:
            assert list(row["runs"]) == ["0"] and row["mean"] == {k: v for k, v in row["runs"]["0"].items()
                                                                  if not isinstance(v, (str, dict))}   # numbers only


def check_levels(levels):
    """The scale the teacher's numbers are read on: real crops classified well above chance, real vs real close."""
    assert levels["real_crops"] == 40 and levels["teacher_chance"] == pytest.approx(1 / 11)
    assert levels["acc_teacher_real"] > 2 / 11 and 0 <= levels["acc_teacher_rec"] <= 1
    assert 0 <= levels["fd_teacher_floor"] < levels["fd_teacher_rec"]


def test_quick_cfg_sweep_with_its_figure(tmp_path):
    """The CFG sweep of the shipped tiny FAR: one row per scale, the JSON and a PNG figure; scale 1 is FAR without
    guidance (the same samples as generate(cfg_scale=1.0))."""
    out, fig = tmp_path / "cfg.json", tmp_path / "cfg.png"
    ablate.main(["--table", "cfg", "--quick", "--scales", "1", "3", "--work-dir", str(tmp_path / "runs"),
                 "--out", str(out), "--figure", str(fig)])
    data = json.loads(out.read_text())
    assert data["table"] == "cfg" and list(data["rows"]) == ["1", "3"] and data["budget"]["far_step"] == torch.load(
        os.path.join(ROOT, "weights", "tiny_far.pt"), weights_only=True)["step"]
    check_levels(data["levels"])
    for row in data["rows"].values():
        run = row["runs"]["0"]
        assert 0 <= run["acc_teacher"] <= 1 and run["fd_teacher"] > 0 and run["samples"] == 22
    assert fig.stat().st_size > 1000 and fig.read_bytes()[:4] == b"\x89PNG"


def test_quick_far_vs_plain_ar_reuses_tab4_runs(table4, tmp_path):
    """--table ar: the plain-AR row trains its own VQ tokenizer (tiny-vq) and a k = 1 FAR with a linear head; the FAR
    row is taken from a Tab. 4 JSON of the same budget and tokenizer instead of being trained again."""
    argv, tab4 = table4
    out, work = tmp_path / "ar.json", Path(argv[argv.index("--work-dir") + 1])
    common = ["--quick", *argv[argv.index("--tokenizer-ckpt"):argv.index("--out")]]   # Tab. 4's tokenizer, work dir
    ablate.main(["--table", "ar", *common, "--out", str(out), "--tab4", str(tab4)])
    data, t4 = json.loads(out.read_text()), json.loads(tab4.read_text())
    check_common(data, "ar")
    fq, vq = data["rows"]["FAR-FQ(Kx2)"], data["rows"]["AR-VQ(2K)"]
    assert "ablation_tab4" not in fq["from"] and str(tab4) in fq["from"]
    assert fq["runs"]["0"]["acc_teacher"] == t4["rows"]["ar"]["runs"]["0"]["acc_teacher"]   # copied, not rerun
    assert fq["runs"]["0"]["code_bits_per_position"] == 18 and vq["runs"]["0"]["code_bits_per_position"] == 10
    run = vq["runs"]["0"]
    assert len(run["val_bits_per_subcode"]) == 1 and run["val_bits_per_position"] == run["val_bits_per_subcode"][0]
    assert 0 <= run["acc_teacher"] <= 1 and run["fd_teacher"] > 0 and set(data["levels"]) == set(ablate.AR_ROWS)
    far = torch.load(work / "tabar-AR-VQ(2K)-seed0" / "checkpoints" / "last.pt", weights_only=True)
    assert far["config"]["num_codebooks"] == 1 and far["config"]["head"] == "linear"   # LlamaGen's GPT


def test_quick_table3(tmp_path):
    out = tmp_path / "tab3.json"
    ablate.main(["--table", "3", "--quick", "--work-dir", str(tmp_path / "runs"), "--out", str(out)])
    data = json.loads(out.read_text())
    check_common(data, "3")
    assert list(data["rows"]) == list(ablate.TAB3)
    for name, row in data["rows"].items():           # +rep: the stand-in teacher is shipped, so no row is skipped
        assert "skipped" not in row                  # (without it: the test after this one)
        run = row["runs"]["0"]
        assert finite(run["psnr"]) and -1 <= run["ssim"] <= 1 and (run["lpips"] is None or finite(run["lpips"]))
        k = 2 if name.startswith("FQ") else 1          # one usage / perplexity per sub-codebook
        assert len(run["usage"]) == len(run["perplexity"]) == k
        assert all(0 < u <= 1 for u in run["usage"]) and all(p >= 1 for p in run["perplexity"])
        assert run["usage_tokens"] == 40 * 4 * 4        # 40 held-out images x 1 crop x (32 px / 8)^2 tokens


def test_a_row_without_its_teacher_is_reported_skipped_and_runs_once_the_file_is_there(tmp_path, monkeypatch, capsys):
    """Tab. 3's "+rep" rows need their teacher's weights: absent (a Dual preset's CLIP offline), the row is written
    as skipped with the file it looked for, nothing is trained or substituted, and the table prints the reason; the
    same command with the file in place runs the row (the skip is not remembered)."""
    argv = ["--table", "3", "--quick", "--rows", "FQ(Kx2)+rep", "--work-dir", str(tmp_path / "runs"),
            "--out", str(tmp_path / "tab3.json")]
    real = ablate.teacher_file
    monkeypatch.setattr(ablate, "teacher_file", lambda spec: (None, f"/nowhere/{spec[4:]}"))
    ablate.main(argv)
    row = json.loads((tmp_path / "tab3.json").read_text())["rows"]["FQ(Kx2)+rep"]
    reason = "teacher cnn:tiny_teacher.pt needs pretrained weights, absent here (/nowhere/tiny_teacher.pt)"
    assert row["skipped"].startswith(reason) and row["runs"] == {} and not list(tmp_path.glob("runs/tab3-*"))
    assert f"FQ(Kx2)+rep        skipped: {reason}" in capsys.readouterr().out
    monkeypatch.setattr(ablate, "teacher_file", real)
    ablate.main(argv)
    row = json.loads((tmp_path / "tab3.json").read_text())["rows"]["FQ(Kx2)+rep"]
    assert "skipped" not in row and finite(row["runs"]["0"]["psnr"])


@pytest.fixture(scope="module")
def table4(tmp_path_factory):
    """`ablate.py --table 4 --quick` run once (a random tokenizer written to its work dir): (its argv, its JSON)."""
    tmp = tmp_path_factory.mktemp("tab4")
    out = tmp / "tab4.json"
    argv = ["--table", "4", "--quick", "--tokenizer-ckpt", str(tmp / "absent.pt"), "--work-dir", str(tmp / "runs"),
            "--out", str(out)]
    ablate.main(argv)
    return argv, out


def test_quick_table4_and_resume(table4):
    argv, out = table4
    data = json.loads(out.read_text())
    check_common(data, "4")
    assert list(data["rows"]) == ["linear", "mlp", "ar"]
    check_levels(data["levels"])
    for row in data["rows"].values():
        run = row["runs"]["0"]
        assert len(run["val_bits_per_subcode"]) == 2 and all(0 < b < 12 for b in run["val_bits_per_subcode"])
        assert 0 <= run["acc_teacher"] <= 1 and run["fd_teacher"] > 0 and run["samples"] == 11 * 2
    # the same command again finds every run in the JSON and trains nothing
    ablate.main(argv)
    assert json.loads(out.read_text())["rows"] == data["rows"]


def test_two_processes_fill_one_table(tmp_path, monkeypatch):
    """Two ablate.py processes on one --out (disjoint rows): the runs another process writes while this one trains
    are kept when this one saves (save merges under a lock), not overwritten by its older copy of the file."""
    out = tmp_path / "tab3.json"
    other = {"psnr": 20.0, "ssim": 0.5, "lpips": None, "usage": [1.0], "perplexity": [9.0]}

    def fake_run(preset, extra, seed, args, run_dir):
        # the other process finishes its row VQ(K) while we train FQ(Kx2): it rewrites the file under our feet
        data = json.loads(out.read_text()) if out.exists() else {"budget": {"steps": 2}, "rows": {}}
        data["rows"]["VQ(K)"] = {"runs": {"0": other}}
        out.write_text(json.dumps(data))
        return {**other, "psnr": 22.0, "usage": [1.0, 1.0], "perplexity": [9.0, 9.0]}

    monkeypatch.setattr(ablate, "tokenizer_run", fake_run)
    ablate.main(["--table", "3", "--quick", "--rows", "FQ(Kx2)", "--work-dir", str(tmp_path / "runs"),
                 "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows["VQ(K)"]["runs"]["0"] == other and rows["VQ(K)"]["mean"]["psnr"] == 20.0     # theirs, kept
    assert rows["FQ(Kx2)"]["runs"]["0"]["psnr"] == 22.0 and rows["FQ(Kx2)"]["mean"]["psnr"] == 22.0   # ours


@pytest.mark.parametrize("argv,message", [
    (["--table", "3", "--steps", "0"], "--steps 0 is out of range: must be an integer >= 1"),
    (["--table", "3", "--usage-crops", "0"], "--usage-crops 0 is out of range"),
    (["--table", "ibq", "--log-every", "0"], "--log-every 0 is out of range"),
    (["--table", "cfg", "--scales", "1", "nan"], "--scales [1.0, nan] is out of range: must be finite numbers >= 0"),
    (["--table", "4", "--real-crops", "1"], "--real-crops 1 is out of range: must be an integer >= 2"),
    (["--table", "cfg", "--far-ckpt", "nope.pt"], "--far-ckpt nope.pt: no such file"),
    (["--table", "cfg", "--far-ckpt", os.path.join(ROOT, "weights", "tiny_tokenizer.pt")], "it holds a tokenizer"),
    (["--table", "4", "--teacher", "nope.pt"], "no such file (make it with `python train_teacher.py --out nope.pt`"),
    (["--table", "ar", "--tokenizer-ckpt", "nope.pt"], "--tokenizer-ckpt nope.pt: no such file"),
    (["--table", "cfg", "--figure", "no/such/folder/f.png"], "the folder"),
    (["--table", "ibq", "--figure", "f.jpg"], "--figure f.jpg: it is written as PNG; the file name must end in .png"),
])
def test_bad_arguments_exit_2_before_any_run(argv, message, tmp_path, monkeypatch, capsys):
    """A value that a run would trip over minutes or hours later (or never check: --steps 0 once meant the default) is
    one line and exit 2 now, with nothing started: no work folder, no results file."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        ablate.main(argv + ["--out", "t.json", "--work-dir", "runs"])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
