"""Invariants of tokenizer.py, and parity with the official FQGAN code on its deterministic test weights.

Run: python -m pytest tests/test_tokenizer.py -q
"""
import os
import runpy
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fast  # noqa: E402
import tokenizer  # noqa: E402
from tokenizer import (PRESETS, AttnBlock, Tokenizer, TokenizerConfig, _grid_pos, swish,  # noqa: E402
                       upsample_conv)


def small_config(k=2, **kw):
    """A few-second tokenizer: 32 px, downsample 4, with adapters and (optionally) feature heads."""
    base = dict(image_size=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, codebook_size=64,
                codebook_dim=4, adapter_layers=1, adapter_heads=2, num_codebooks=k,
                branch_names=tuple(f"b{i}" for i in range(k)), teachers=(None,) * k, head_dims=(0,) * k,
                head_layers=1, head_heads=2)
    base.update(kw)
    return TokenizerConfig(**base)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("size", [(32, 32), (24, 40)])                 # square and non-square, not 256
def test_decode_codes_of_encode_equals_forward(k, size):
    torch.manual_seed(k)
    tok = Tokenizer(small_config(k, image_size=size)).eval()
    x = torch.rand(2, 3, *size) * 2 - 1
    with torch.no_grad():
        x_rec, aux = tok(x)
    codes = tok.encode(x)
    assert codes.shape == (2, k, size[0] // 4, size[1] // 4) and codes.dtype == torch.int64
    assert torch.equal(codes, aux["codes"])
    with torch.no_grad():
        assert torch.equal(tok.decode_codes(codes), x_rec)            # bit for bit (exact straight-through)
    assert x_rec.shape == x.shape
    assert len(aux["z_q"]) == k and all(z.shape == (2, tok.cfg.codebook_dim, *codes.shape[2:]) for z in aux["z_q"])
    assert sum(key.startswith("codebook/") for key in aux["losses"]) == k


@pytest.mark.parametrize("bias", [True, False])
def test_upsample_conv_equals_nearest_then_conv_with_its_gradients(bias, monkeypatch):
    """The decoder's up-sampling on a CPU (four 2x2 convs of the input, fast.upsample_conv) is conv3x3(nearest2x(x)):
    values and the gradients of x, weight and bias equal in fp64 (non-square, down to 1 x 1), close under bf16
    autocast; off the CPU the plain form runs."""
    torch.manual_seed(0)
    for shape in [(2, 3, 4, 6), (1, 8, 1, 1), (2, 16, 7, 5)]:
        conv = torch.nn.Conv2d(shape[1], 5, 3, 1, 1, bias=bias).double()
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        ref, out = conv(F.interpolate(x, scale_factor=2.0, mode="nearest")), upsample_conv(x, conv)
        assert out.shape == ref.shape == (shape[0], 5, 2 * shape[2], 2 * shape[3])
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        g, params = torch.randn_like(ref), [x, *conv.parameters()]
        for got, want in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    conv, x = torch.nn.Conv2d(16, 8, 3, 1, 1, bias=bias), torch.randn(2, 16, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = conv(F.interpolate(x, scale_factor=2.0, mode="nearest")), upsample_conv(x, conv)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=2e-2 * ref.float().abs().max().item())
    monkeypatch.setattr(fast, "upsample_conv", None)                  # off the CPU it must not be called
    meta = upsample_conv(torch.empty(2, 16, 7, 5, device="meta"), torch.nn.Conv2d(16, 8, 3, 1, 1, device="meta"))
    assert meta.shape == (2, 8, 14, 10)


def test_conv_layout_channels_last_from_32_px_under_bf16_on_a_cpu_with_amx(monkeypatch):
    """Under bf16 autocast on a CPU with AMX (forced here: any CPU runs both layouts) every convolution of the encoder
    and decoder reads channels-last activations from 32 px on and NCHW ones below (fast.conv_layout), and the
    up-sampling takes the plain form; the decoder's output and the gradients equal those of the same weights in the
    layouts as they come, up to bf16 rounding. In fp32, on a CPU without AMX, on another device and under
    torch.compile, activations are left as they are."""
    torch.manual_seed(0)
    tok = Tokenizer(small_config(2, image_size=64)).train()           # levels at 64, 32 and 16 px
    seen = []
    for m in [*tok.encoder.modules(), *tok.decoder.modules()]:
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3):
            m.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0]))
    x, z_q = torch.rand(2, 3, 64, 64) * 2 - 1, torch.randn(2, 8, 16, 16)

    def run(layout):
        monkeypatch.setattr(tokenizer, "conv_layout", layout)
        seen.clear()
        tok.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tok.encoder(x)
            out = tok.decode(z_q)
        out.float().square().mean().backward()
        return out.float(), [p.grad.clone() for p in tok.decoder.parameters()]
    monkeypatch.setattr(fast, "_amx", lambda: True)
    monkeypatch.setattr(fast, "upsample_conv", None)                  # the plain up-sampling on channels-last data
    out, grads = run(fast.conv_layout)
    formats = {(t.shape[-1], t.is_contiguous(memory_format=torch.channels_last), t.is_contiguous()) for t in seen}
    assert formats == {(65, True, False), (64, True, False), (33, True, False), (32, True, False),
                       (16, False, True), (32, False, True)}, formats  # 65, 33: the down-sampling convs' padded input
    assert [t.is_contiguous() for t in seen if t.shape[-1] == 32].count(True) == 1   # up-sampling 16 -> 32 (NCHW in)
    ref, ref_grads = run(lambda t: t)                                 # as the activations come (mostly NCHW)
    assert any(t.shape[-1] >= 32 and t.is_contiguous() for t in seen)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-2 * ref.abs().max().item())
    got, want = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in ref_grads])
    torch.testing.assert_close(got, want, rtol=0, atol=5e-2 * want.abs().max().item())   # on the gradient's scale
    assert F.cosine_similarity(got, want, dim=0) > 0.999
    t = torch.randn(2, 8, 32, 32)
    assert fast.conv_layout(t) is t                                   # fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast.conv_layout(torch.empty(2, 8, 32, 32, device="meta")).is_contiguous()   # another device: as is
        assert torch.compile(fast.conv_layout, backend="eager", fullgraph=True)(t).is_contiguous()
        monkeypatch.setattr(fast, "_amx", lambda: False)
        assert fast.conv_layout(t) is t                               # bf16 on a CPU without AMX


def test_other_input_size_interpolates_positions():
    """The adapters' position tables are sized by the config; another input size is interpolated, not a crash."""
    tok = Tokenizer(small_config(2)).eval()
    with torch.no_grad():
        x_rec, aux = tok(torch.rand(1, 3, 48, 32) * 2 - 1)
    assert x_rec.shape == (1, 3, 48, 32) and aux["codes"].shape == (1, 2, 12, 8)


def test_smaller_input_in_training_takes_a_random_window_of_the_position_table():
    """In training a smaller grid is a window of a full-size input (train_tokenizer.py --low-res-steps): its positions
    are a contiguous block of the (8, 8) table, every offset is drawn, and the global seed fixes the draws (a resumed
    run restores it). Outside training, and for a larger grid, the table is interpolated."""
    table = torch.arange(64.0)[:, None].expand(64, 3)                 # (8*8, C): entry r*8 + c at row r, column c

    def draws(n):
        torch.manual_seed(0)
        return [_grid_pos(table, (8, 8), (4, 6), window=True) for _ in range(n)]   # each (4*6, C)
    offsets = set()
    for pos in draws(200):
        top, left = divmod(int(pos[0, 0]), 8)
        assert torch.equal(pos, table.reshape(8, 8, 3)[top:top + 4, left:left + 6].reshape(24, 3))
        offsets.add((top, left))
    assert offsets == {(i, j) for i in range(5) for j in range(3)}    # every window of the table
    assert all(torch.equal(a, b) for a, b in zip(draws(20), draws(20)))
    on_meta = _grid_pos(table.to("meta"), (8, 8), (4, 6), window=True)   # draws on the table's device (a GPU's)
    assert on_meta.device.type == "meta" and on_meta.shape == (24, 3)
    for new_grid, window in (((4, 6), False), ((12, 8), True)):       # eval; larger than the table
        want = F.interpolate(table.reshape(1, 8, 8, 3).permute(0, 3, 1, 2), size=new_grid, mode="bicubic",
                             align_corners=False).permute(0, 2, 3, 1).reshape(-1, 3)
        assert torch.equal(_grid_pos(table, (8, 8), new_grid, window=window), want)
    tok = Tokenizer(small_config(2))                                  # the adapters pass self.training
    x = torch.rand(1, 3, 16, 16) * 2 - 1                              # grid (4, 4) of the (8, 8) tables
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.append(tok.train()(x)[0])
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    with torch.no_grad():
        torch.manual_seed(2)
        assert torch.equal(tok.eval()(x)[0], tok(x)[0])               # eval: no draw, one answer


def test_straight_through_gradient_reaches_encoder_and_every_trained_part():
    torch.manual_seed(0)
    tok = Tokenizer(small_config(2, head_dims=(0, 16), teachers=(None, "t"))).train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_rec, aux = tok(x)
    loss = F.mse_loss(x_rec, x) + sum(aux["losses"].values()) + aux["features"][1][:, 0].square().mean()
    loss.backward()
    for name, p in tok.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_reconstruction_gradient_only_uses_straight_through():
    """From the reconstruction alone the encoder gets gradient (through the STE) and the codebooks get none."""
    tok = Tokenizer(small_config(2)).train()
    x_rec, _ = tok(torch.rand(2, 3, 32, 32) * 2 - 1)
    x_rec.square().mean().backward()
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0
    for branch in tok.branches:
        assert branch.quantize.embedding.weight.grad is None or branch.quantize.embedding.weight.grad.abs().sum() == 0


def test_decode_codes_keep_zeroes_other_sub_codebooks():
    torch.manual_seed(0)
    tok = Tokenizer(small_config(3)).eval()
    codes = tok.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    with torch.no_grad():
        only_1 = tok.decode_codes(codes, keep=[1])
        z = [b.quantize.codebook()[codes[:, i]].permute(0, 3, 1, 2) for i, b in enumerate(tok.branches)]
        z = [t if i == 1 else torch.zeros_like(t) for i, t in enumerate(z)]
        assert torch.equal(only_1, tok.decode(torch.cat(z, 1)))
        # changing the dropped sub-codes does not change the image
        other = codes.clone()
        other[:, [0, 2]] = (other[:, [0, 2]] + 1) % 64
        assert torch.equal(tok.decode_codes(other, keep=[1]), only_1)
        assert not torch.equal(tok.decode_codes(other), tok.decode_codes(codes))


def test_residual_adapter_adds_its_output_to_z():
    torch.manual_seed(0)
    plain = Tokenizer(small_config()).eval()
    residual = Tokenizer(small_config(adapter_residual=True)).eval()
    residual.load_state_dict(plain.state_dict())                        # same parameters, only the skip differs
    z = torch.randn(2, 64, 8, 8)
    for a, b in zip(plain.branches, residual.branches):
        assert torch.allclose(b.adapter(z), z + a.adapter(z))


def test_attention_off_and_norm_groups_reach_every_block():
    tok = Tokenizer(small_config(attn=False, norm_groups=4))
    assert not any(isinstance(m, AttnBlock) for m in tok.modules())   # no attention anywhere in encoder / decoder
    assert {m.num_groups for m in tok.modules() if isinstance(m, torch.nn.GroupNorm)} == {4}
    x_rec, _ = tok(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert x_rec.shape == (1, 3, 32, 32)


def test_k1_without_adapter_is_a_plain_vqgan():
    torch.manual_seed(0)
    tok = Tokenizer(small_config(1, adapter_layers=0)).eval()
    branch = tok.branches[0]
    assert branch.adapter is None
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        x_rec, aux = tok(x)
        # VQGAN: E -> norm_out -> swish -> conv_out -> quant_conv -> Q -> post_quant_conv -> D
        z = branch.quant_conv(branch.conv_out(swish(branch.norm_out(tok.encoder(x)))))
        z_q, _, codes = branch.quantize(z)
        assert torch.equal(codes, aux["codes"][:, 0])
        assert torch.equal(tok.decoder(tok.post_quant_conv(z_q)), x_rec)
    # and the vqgan-16 preset has exactly LlamaGen VQ-16's 71,883,403 parameters
    with torch.device("meta"):
        assert sum(p.numel() for p in Tokenizer(TokenizerConfig(**PRESETS["vqgan-16"])).parameters()) == 71_883_403


# official_code.md §1.7: the official models with their feature heads
OFFICIAL_COUNTS = {"fqgan-dual-16": 150_410_131, "fqgan-triple-16": 159_295_515, "fqgan-dual-8": 150_209_427,
                   "fqgan-triple-8": 159_586_331}


def test_presets_parameter_counts_match_official():
    for name, n in OFFICIAL_COUNTS.items():
        with torch.device("meta"):
            tok = Tokenizer(TokenizerConfig(**PRESETS[name]))
        assert sum(p.numel() for p in tok.parameters()) == n, name


def test_python_tokenizer_py_prints_every_preset(monkeypatch, capsys):
    """`python tokenizer.py`: one line per preset with its parameter count, sub-codebooks and token grid."""
    monkeypatch.setattr(sys, "argv", ["tokenizer.py"])
    runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tokenizer.py"),
                   run_name="__main__")
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert list(lines) == list(PRESETS)
    for name, n in OFFICIAL_COUNTS.items():
        assert f" {n:,} parameters, k={PRESETS[name]['num_codebooks']} x 16384 x 8, " in lines[name], lines[name]
    assert lines["tiny"].endswith("k=2 x 512 x 8, 16x16 tokens at 64 px") and "8x8 tokens" in lines["tiny8"]


def test_ibq_tokenizer_runs_and_trains_every_code():
    tok = Tokenizer(small_config(1, quantizer="ibq", codebook_dim=16, adapter_layers=0, l2_norm=False)).train()
    x_rec, aux = tok(torch.rand(2, 3, 32, 32) * 2 - 1)
    (x_rec.square().mean() + sum(aux["losses"].values())).backward()
    assert tok.branches[0].quantize.embedding.weight.grad.abs().sum(1).gt(0).all()
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0


def test_bad_inputs_raise_value_error():
    tok = Tokenizer(small_config(2)).eval()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tok(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="not divisible by the downsample factor 4"):
        tok.encode(torch.zeros(1, 3, 30, 32))
    codes = torch.zeros(1, 2, 8, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        tok.decode_codes(codes + 64)
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        tok.decode_codes(codes - 1)
    with pytest.raises(ValueError, match=r"\(B, 2, h, w\)"):
        tok.decode_codes(codes[:, :1])
    with pytest.raises(ValueError, match="integers"):
        tok.decode_codes(codes.float())
    with pytest.raises(ValueError, match="keep"):
        tok.decode_codes(codes, keep=[2])
    with pytest.raises(ValueError, match="one entry per sub-codebook"):
        small_config(2, head_dims=(0,))
    with pytest.raises(ValueError, match="not divisible by the downsample factor"):
        small_config(2, image_size=30).grid
    with pytest.raises(ValueError, match="quantizer must be 'vq' or 'ibq', got 'lfq'"):
        small_config(2, quantizer="lfq")
    with pytest.raises(ValueError, match="width 64 is not divisible by the number of heads 3"):
        Tokenizer(small_config(2, adapter_heads=3))
    for quantizer in ("vq", "ibq"):                             # z with the trunk's width instead of d = codebook_dim
        q = Tokenizer(small_config(1, quantizer=quantizer, l2_norm=quantizer == "vq")).branches[0].quantize
        with pytest.raises(ValueError, match=rf"expects z of shape \(B, {q.codebook_dim}, h, w\), got \(1, 64, 8, 8\)"):
            q(torch.zeros(1, 64, 8, 8))
