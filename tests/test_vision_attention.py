"""Packed vision attention (model/vision_attention.py) equals Hugging Face's per-block loop."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from model.loading import build_model_and_processor, build_preset_model
from model.presets import get_preset
from model.vision_attention import (install_packed_vision_attention, packed_block_attention,
                                    uninstall_packed_vision_attention)


def per_block(q, k, v, cu, scale):
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if b == a:
            continue
        qb, kb, vb = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qb, kb, vb, scale=scale)[0].transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("lengths", [[64] * 6, [64, 64, 40, 64, 16, 40, 0, 7], [5], [3, 9, 0, 9, 3]])
def test_packed_equals_per_block(lengths):
    g = torch.Generator().manual_seed(sum(lengths))
    S, H, D = sum(lengths), 3, 8
    q, k, v = (torch.randn(S, H, D, generator=g, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    ref = per_block(q, k, v, cu, 0.3)
    got = packed_block_attention(q, k, v, cu, 0.3)
    assert got.shape == (S, H, D)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    w = torch.randn(S, H, D, generator=g)
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    g_got = torch.autograd.grad((got * w).sum(), (q, k, v))
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_packed_rejects_wrong_cover():
    q = torch.randn(10, 2, 4)
    with pytest.raises(ValueError, match="covers 9 tokens"):
        packed_block_attention(q, q, q, torch.tensor([0, 4, 9]), 1.0)


def _images(preset, sizes, seed=0):
    """pixel_values / image_grid_thw of random images of the given (h, w) through the preset's processor."""
    from PIL import Image

    from model.loading import build_preset_processor

    proc = build_preset_processor(preset)
    rng = torch.Generator().manual_seed(seed)
    ims = [Image.fromarray(torch.randint(0, 255, (h, w, 3), generator=rng, dtype=torch.uint8).numpy())
           for h, w in sizes]
    out = proc.image_processor(images=ims, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


# sizes with edge windows (grids not multiples of the window) and one image of a different size
SIZES = [(112, 168), (112, 168), (196, 140), (56, 56)]


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen2.5"])
def test_tower_equals_hugging_face(name, monkeypatch):
    preset = dataclasses.replace(get_preset(name), max_pixels=200 * 200, min_pixels=56 * 56)
    vlm = build_preset_model(preset)
    visual = vlm.model.visual
    pix, grid = _images(preset, SIZES)
    seen = []
    hooks = [blk.attn.register_forward_pre_hook(
        lambda m, a, kw: seen.append(sorted(set(kw["cu_seqlens"].diff().tolist()) - {0})), with_kwargs=True)
        for blk in visual.blocks]
    pix = pix.requires_grad_(True)
    ref = visual(pix, grid_thw=grid)
    for h in hooks:
        h.remove()
    assert all(len(s) > 1 for s in seen), seen  # every layer really has blocks of several lengths
    ref = getattr(ref, "pooler_output", ref)
    g_ref = torch.autograd.grad(ref.square().sum(), [pix] + list(visual.parameters()))

    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    assert install_packed_vision_attention(vlm) == preset.vision["depth"]
    got = visual(pix, grid_thw=grid)
    got = getattr(got, "pooler_output", got)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    g_got = torch.autograd.grad(got.square().sum(), [pix] + list(visual.parameters()))
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # at most one SDPA call per distinct block length and layer (Hugging Face: one per block)
    n_blocks = len(SIZES) if name == "tiny" else None
    assert 0 < len(calls) <= 3 * preset.vision["depth"], len(calls)
    if n_blocks:
        assert len(calls) < n_blocks * preset.vision["depth"]
    assert uninstall_packed_vision_attention(vlm) == preset.vision["depth"]
    calls.clear()
    visual(pix, grid_thw=grid)
    assert len(calls) >= len(SIZES) * preset.vision["depth"]  # back to the loop


def test_installed_for_sdpa_only():
    model, _, _ = build_model_and_processor("tiny-qwen2.5", attn_implementation="sdpa")
    assert sum(getattr(m.forward, "__name__", "") == "_packed_forward" for m in model.modules()) == 2
    model, _, _ = build_model_and_processor("tiny-qwen2.5", attn_implementation="eager")
    assert not any(getattr(m.forward, "__name__", "") == "_packed_forward" for m in model.modules())
    model, _, _ = build_model_and_processor("tiny-llava-ov", attn_implementation="sdpa")
    assert install_packed_vision_attention(model) == 0


def test_block_lengths_read_once_per_tensor(monkeypatch):
    from model import vision_attention as va

    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or tolist(t))
    cu = torch.tensor([0, 64, 128, 150], dtype=torch.int32)
    assert va._block_lengths(cu) == (64, 64, 22)
    for _ in range(5):  # every layer of the tower: no further read-back
        assert va._block_lengths(cu) == (64, 64, 22)
    assert len(reads) == 1
    cu[3] = 160  # changed in place: read again
    assert va._block_lengths(cu) == (64, 64, 32) and len(reads) == 2
    key = id(cu)
    del cu
    assert key not in va._LENGTHS  # dropped with its tensor
