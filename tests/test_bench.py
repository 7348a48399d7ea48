"""bench.py runs every path (--quick: small sizes, one run each) and its command line behaves; no timing claims.

Run: python -m pytest tests/test_bench.py -q
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench  # noqa: E402


def test_quick_runs_every_section_and_prints_one_table(capsys):
    rows = bench.main(["--quick"])
    assert {section for section, *_ in rows} == set(bench.SECTIONS)
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


def test_bad_only_exits_2_naming_the_choices():
    proc = subprocess.run([sys.executable, "bench.py", "--only", "nope"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert all(name in proc.stderr for name in bench.SECTIONS)


@pytest.mark.parametrize("argv", [["--repeats", "0"], ["--threads", "0"]])
def test_non_positive_counts_are_rejected(argv):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2


def test_every_flag_is_read():
    """Each parsed flag is used by bench.py (STYLE.md: every parsed flag is read somewhere)."""
    source = open(os.path.join(ROOT, "bench.py")).read()
    for name in vars(bench.parse_args([])):
        assert source.count(f"args.{name}") >= 1, name
