"""The commands the docs show use flags their scripts have: every `--flag` after `script.py` in README.md, docs/,
weights/ and data/ READMEs, the scripts' docstrings and gpu_check.sh is in that script's --help. A renamed or removed
flag fails here, not in a user's terminal. The README's sample.py commands on the shipped weights run as written, from
a folder with nothing in it (a fresh clone has no runs/ folder). Whether the other commands' values pass their
scripts' checks is tested elsewhere: gpu_check.sh runs whole in .ci/run, the README's training commands in
tests/test_finetune.py.

Run: python -m pytest tests/test_docs.py -q
"""
import contextlib
import glob
import importlib
import io
import os
import re
import shlex
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SCRIPTS = ["train_tokenizer", "train_far", "sample", "evaluate", "figures", "ablate", "bench", "train_teacher"]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# script.py, then its arguments up to the end of the line, a backtick, a pipe, `;`, `&&` or a comment; a line that
# ends in a backslash goes on to the next one
COMMAND = re.compile(r"\b(" + "|".join(SCRIPTS) + r")\.py\b((?:[ \t]+(?:\\\\?\n[ \t]*)?[^\s`|;&#)]+)*)")


def documented_files():
    files = ["README.md", "weights/README.md", "data/README.md", "gpu_check.sh", *glob.glob("docs/*.md", root_dir=ROOT),
             *glob.glob("*.py", root_dir=ROOT)]
    return [os.path.join(ROOT, f) for f in files]


def commands(text):
    """[(script, [flags])] of every command in text."""
    return [(m[1], FLAG.findall(m[2])) for m in COMMAND.finditer(text)]


def help_flags(script):
    """Every --flag that `script.py --help` prints (the --no-X forms of boolean flags included)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        importlib.import_module(script).main(["--help"])
    assert e.value.code == 0
    return set(FLAG.findall(out.getvalue()))


def test_the_pattern_finds_commands_and_their_flags():
    text = ("`python sample.py --class-id 3` and\n```\ntorchrun --nproc_per_node=8 train_far.py --preset far-b \\\n"
            "    --data-path /data --out-dir runs/x   # a comment --not-a-flag\npython evaluate.py --samples s.npz "
            "&& python figures.py --out-dir f\n```")
    assert commands(text) == [("sample", ["--class-id"]), ("train_far", ["--preset", "--data-path", "--out-dir"]),
                              ("evaluate", ["--samples"]), ("figures", ["--out-dir"])]


def test_every_documented_flag_is_one_its_script_has():
    known = {script: help_flags(script) for script in SCRIPTS}
    found, unknown = 0, []
    for path in documented_files():
        for script, flags in commands(open(path).read()):
            found += len(flags)
            unknown += [f"{os.path.relpath(path, ROOT)}: {script}.py {flag}" for flag in flags
                        if flag not in known[script]]
    assert not unknown, unknown
    assert found > 300                                                  # the docs' commands were all read


def test_the_readmes_sample_commands_on_the_shipped_weights_run_as_written(tmp_path, monkeypatch, capsys):
    """Every `python sample.py ...` of README.md that names no checkpoint and writes a PNG, in a folder with nothing in
    it: the PNG is written (one sample per class instead of eight, to keep the test short)."""
    import sample
    readme = [argv[2:] for argv in (shlex.split(m[0]) for m in re.finditer(r"python sample\.py[^`\n&#]*",
                                                                             open(os.path.join(ROOT, "README.md")).read()))
              if not any(flag in argv for flag in ("--far-ckpt", "--tokenizer-ckpt", "--num-samples"))]
    assert len(readme) >= 2                                             # the first command and all 11 classes
    monkeypatch.chdir(tmp_path)
    for argv in readme:
        sample.main(argv + ["--per-class", "1"])
        out = argv[argv.index("--out") + 1] if "--out" in argv else "samples.png"
        assert f"wrote {out}:" in capsys.readouterr().out and (tmp_path / out).is_file(), argv
