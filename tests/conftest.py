"""Fixtures shared by the test files. Run the tests from the repo root: python -m pytest -q tests"""
import os
import sys
from dataclasses import asdict

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tokenizer import PRESETS, Tokenizer, TokenizerConfig  # noqa: E402


@pytest.fixture(scope="session")
def tok_ckpt(tmp_path_factory):
    """A randomly initialised (seed 0) tiny tokenizer at 32 px: 4x4 codes from two 512-entry sub-codebooks, saved in
    our checkpoint format {"model", "config"}."""
    torch.manual_seed(0)
    cfg = TokenizerConfig(**{**PRESETS["tiny"], "image_size": 32})
    path = tmp_path_factory.mktemp("tok") / "tok.pt"
    torch.save({"model": Tokenizer(cfg).state_dict(), "config": asdict(cfg)}, path)
    return str(path)
