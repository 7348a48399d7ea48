"""bench.py runs every path (--quick: small sizes, one run each) and its command line behaves; no timing claims.

Run: python -m pytest tests/test_bench.py -q
"""
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench  # noqa: E402
import train_far  # noqa: E402
import train_tokenizer  # noqa: E402


def test_quick_runs_every_section_and_prints_one_table(capsys):
    # recipes: --quick runs today's tokenizer recipe for real (FAR's would add 12 s); the earlier recipes' flags, both
    # models' commands and logs are checked in test_recipes_run_each_seed_and_report_the_means
    rows = bench.main(["--quick", "--recipe", "tokenizer"])
    assert {section for section, *_ in rows} == set(bench.SECTIONS)
    recipes = [what.split(":")[0] for section, what, *_ in rows if section == "recipes"]
    assert recipes == ["tiny tokenizer, recipe today"]
    out = capsys.readouterr().out
    assert "| section | measurement | median | result | peak MiB |" in out and "torch" in out
    # the lookup's invariant holds at any size: the fast path returns the full-matrix indices
    assert any("indices identical" in result for _, _, _, result, _ in rows)
    # every timing is a positive number, every ratio finite
    assert all(seconds is None or seconds > 0 for _, _, seconds, _, _ in rows)
    assert not any("nan" in result or "inf" in result for _, _, _, result, _ in rows)


def test_only_selects_one_section():
    rows = bench.main(["--quick", "--only", "lookup"])
    assert {section for section, *_ in rows} == {"lookup"}


def test_bad_only_exits_2_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as e:                            # in process: bench.py's imports take 5 s
        bench.main(["--only", "nope"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice: 'nope'" in err and all(name in err for name in bench.SECTIONS)


@pytest.mark.parametrize("argv", [["--repeats", "0"], ["--threads", "0"], ["--threads", "1,x"], ["--busy", "-1"]])
def test_non_positive_counts_are_rejected(argv):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2


def test_every_flag_is_read():
    """Each parsed flag is used by bench.py (STYLE.md: every parsed flag is read somewhere)."""
    source = open(os.path.join(ROOT, "bench.py")).read()
    for name in vars(bench.parse_args([])):
        assert source.count(f"args.{name}") >= 1, name


def test_threads_list_runs_the_lookup_on_each_count():
    assert bench.parse_args(["--threads", "2,1,2"]).threads == [1, 2]            # sorted, deduplicated
    rows = bench.main(["--quick", "--only", "lookup", "--threads", "1,2"])
    for threads in ("1 thread,", "2 threads,"):
        assert sum(threads in what for _, what, *_ in rows) == 2                  # reference and nearest_code


def test_busy_loops_run_only_inside_the_block():
    with bench.busy_loops(1, settle=0.2):
        procs = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
        assert "while True: pass" in procs
    procs = subprocess.run(["ps", "-ww", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout.splitlines()
    assert not [line for line in procs if "while True: pass" in line and f" {os.getpid()} " in f" {line} "]


def test_busy_loops_end_with_a_killed_bench():
    # bench.py killed inside the block (a timeout's SIGKILL, a SIGTERM: no finally runs) takes its busy loops along
    def state(pid):                                                     # "R", "S", "Z" (zombie) or None (gone)
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return None

    def parent_of(pid):
        try:
            return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except FileNotFoundError:
            return None
    code = "import bench, time\nwith bench.busy_loops(2, settle=0.2):\n    print('in', flush=True)\n    time.sleep(60)"
    bench_proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert bench_proc.stdout.readline() == "in\n"
    loops = [int(p) for p in os.listdir("/proc") if p.isdigit() and parent_of(p) == bench_proc.pid]
    assert len(loops) == 2 and all(state(p) == "R" for p in loops)
    bench_proc.kill()
    bench_proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(state(p) not in (None, "Z") for p in loops):
        time.sleep(0.1)
    assert all(state(p) in (None, "Z") for p in loops)                  # gone (a zombie until init reaps it)


@pytest.mark.parametrize("paper_ste", [True, False])
def test_official_formulation_equals_vector_quantizer(paper_ste):
    """The official quantizer forward the train-dual rows compare against computes what VectorQuantizer (training,
    entropy loss) computes: codes, z_q, every loss, and the gradients to z and the codebook."""
    torch.manual_seed(0)
    vq = bench.VectorQuantizer(300, 8, entropy_weight=0.03).train()
    vq.embedding.weight.data = torch.nn.functional.normalize(torch.randn(300, 8), dim=-1)
    vq.paper_ste = paper_ste
    z0, g = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)
    out = []
    for forward in (bench.OfficialVQ(vq), vq):
        z = z0.clone().requires_grad_()
        vq.zero_grad()
        z_q, losses, codes = forward(z)
        ((z_q * g).sum() + sum(losses.values())).backward()
        out.append((codes, z_q.detach(), *(losses[k].detach() for k in ("codebook", "commit", "entropy")),
                    z.grad, vq.embedding.weight.grad))
    assert torch.equal(out[0][0], out[1][0])
    for a, b in zip(out[0][1:], out[1][1:]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), (a - b).abs().max()


def test_recipes_run_each_seed_and_report_the_means(monkeypatch, capsys):
    """--seeds trains each recipe once per seed (each command gets its --seed) and the row gives the mean of the seeds'
    numbers; --recipe keeps one model. The training commands are stood in for (the quick test above runs today's
    tokenizer recipe)."""
    commands, run = [], bench.subprocess.run

    def fake_run(argv, **kwargs):                                   # writes the log.jsonl a run would end with
        if "--out-dir" not in argv:                                 # not a training command (the machine's name)
            return run(argv, **kwargs)
        commands.append(argv)
        out, seed = argv[argv.index("--out-dir") + 1], int(argv[argv.index("--seed") + 1])
        with open(os.path.join(out, "log.jsonl"), "w") as f:
            f.write('{"step": 4, "val_psnr_ema": %s}\n' % (20 + seed) if "train_tokenizer.py" in argv[1] else
                    '{"step": 0, "val_bits/0": 9.0, "val_bits/1": 9.0}\n{"step": 4, "val_bits/0": 5.0, '
                    '"val_bits/1": %s}\n' % (3 + seed))
    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    rows = bench.main(["--only", "recipes", "--recipe", "tokenizer", "--seeds", "0,3"])
    assert [argv[argv.index("--seed") + 1] for argv in commands] == ["0", "3"] * 2      # before, then today
    assert commands[0][6:] == bench.RECIPES["tiny tokenizer"][1] and commands[2][6:] == []   # after --out-dir, --seed
    assert [what.split(",")[0] for _, what, *_ in rows] == ["tiny tokenizer"] * 2
    assert all("held-out 21.50 dB (seeds: 20.00 / 23.00)" in result for *_, result, _ in rows)
    assert "faster" in rows[1][3] and "faster" not in rows[0][3]                         # today against before
    assert "recipes: mean of seeds 0,3" in capsys.readouterr().out                     # the table's footer says so
    commands.clear()                                                # FAR: the mean held-out NLL of the sub-codes
    rows = bench.main(["--only", "recipes", "--recipe", "far", "--seeds", "1"])
    assert [os.path.basename(argv[1]) for argv in commands] == ["train_far.py"] * 2
    assert [result.split(",")[1] for *_, result, _ in rows] == [" held-out 4.50 bits"] * 2
    commands.clear()                                                # --quick: today's recipe, a few steps
    bench.main(["--quick", "--only", "recipes", "--recipe", "far"])
    assert [argv[6:] for argv in commands] == [bench.QUICK_FLAGS["tiny FAR"]]
    # the flags that restore the earlier recipes still parse (the quick table runs the tokenizer's only)
    before = train_tokenizer.parse_args(bench.RECIPES["tiny tokenizer"][1])[0]
    assert before.ema_decay == 0.99 and before.preset == "tiny64"
    assert train_far.parse_args(bench.RECIPES["tiny FAR"][1])[0].warmup_steps == 0
    assert bench.parse_args(["--seeds", "3,1,3"]).seeds == [3, 1]
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--seeds", "0,x"])
    assert e.value.code == 2
