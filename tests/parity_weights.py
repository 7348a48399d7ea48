"""Deterministic weights and inputs under which the parity fixtures in tests/fixtures/ were produced.

The official FQGAN / FAR models were loaded with the state dict built here from a key listing, run on CPU in fp32,
and their outputs saved as tests/fixtures/*_expected.pt. A reimplementation that loads the same state dict (after
converting names) and feeds the same inputs must reproduce those outputs.

Key listing format (tests/fixtures/*_keys.txt): one tensor per line, ``name<TAB>shape<TAB>dtype`` with the shape
written as a Python tuple, e.g. ``encoder.conv_in.bias<TAB>(128,)<TAB>float32``. Blank lines and lines starting with
``#`` are comments.

The rule, applied to the listed tensors in file order while drawing from a single ``torch.Generator`` seeded with
``seed`` (the order matters: every draw advances the one generator):

* a name ending in ``codebook_used`` (the official quantizer's usage buffer): all zeros, no draw;
* any other 1-D tensor whose name ends in ``weight`` (norm scales): ``1 + 0.1 * N(0, 1)``;
* any other 1-D tensor (biases and the like): ``0.02 * N(0, 1)``;
* everything else (linear / conv weights, embeddings, positional tables): ``N(0, 1) / sqrt(fan_in)``, where
  ``fan_in`` is the product of all dimensions but the first (1 for a 0-D tensor).

All tensors are float32. The input images are ``U[0, 1) * 2 - 1`` drawn from their own generator seeded with
``seed``, shape (batch, 3, size, size).
"""
import math
from collections import OrderedDict
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _parse_shape(text):
    """'(16384, 8)' -> (16384, 8); '(128,)' -> (128,); '()' -> ()."""
    inner = text.strip()
    if not (inner.startswith("(") and inner.endswith(")")):
        raise ValueError(f"shape {text!r} is not written as a tuple")
    return tuple(int(part) for part in inner[1:-1].split(",") if part.strip())


def read_keys(keys_file):
    """List of (name, shape) for the tensor lines of a key listing, in file order.

    ``keys_file`` may be a path or a bare file name, which is looked up in tests/fixtures/.
    """
    path = Path(keys_file)
    if not path.exists() and not path.is_absolute() and (FIXTURES / path).exists():
        path = FIXTURES / path
    entries = []
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        if not raw.strip() or raw.startswith("#"):
            continue
        fields = raw.split("\t")
        if len(fields) != 3:
            raise ValueError(f"{path}:{lineno}: expected name<TAB>shape<TAB>dtype, got {raw!r}")
        name, shape, dtype = fields
        if dtype.strip() != "float32":
            raise ValueError(f"{path}:{lineno}: only float32 tensors are supported, got {dtype!r}")
        entries.append((name, _parse_shape(shape)))
    return entries


def _tensor_for(name, shape, gen):
    if name.endswith("codebook_used"):
        return torch.zeros(shape, dtype=torch.float32)
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    if len(shape) == 1:
        if name.endswith("weight"):
            return 1.0 + 0.1 * noise
        return 0.02 * noise
    fan_in = 1
    for dim in shape[1:]:
        fan_in *= dim
    return noise / math.sqrt(fan_in)


def make_state_dict(keys_file, seed=0):
    """OrderedDict name -> float32 tensor for every entry of ``keys_file``, in its order (see the module rule)."""
    gen = torch.Generator().manual_seed(seed)
    return OrderedDict((name, _tensor_for(name, shape, gen)) for name, shape in read_keys(keys_file))


def make_images(seed=0, batch=2, size=256):
    """Input images of the tokenizer fixtures: (batch, 3, size, size) float32, uniform in [-1, 1)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((batch, 3, size, size), generator=gen, dtype=torch.float32) * 2 - 1
