"""The commands the docs show use flags their scripts have: every `--flag` after `script.py` in README.md, docs/,
weights/ and data/ READMEs, the scripts' docstrings and gpu_check.sh is in that script's --help. A renamed or removed
flag fails here, not in a user's terminal. (Whether a command's values pass the script's checks is another matter:
gpu_check.sh runs whole in .ci/run; the README's commands have their own tests.)

Run: python -m pytest tests/test_docs.py -q
"""
import contextlib
import glob
import importlib
import io
import os
import re
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
