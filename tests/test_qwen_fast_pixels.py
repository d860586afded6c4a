"""The Qwen image fast path (model/qwen.py `fast_image_inputs`) against the Hugging Face image processor.

Parity is bit-identical (torch.equal) over sizes, odd and even grids, Qwen2-VL's (CLIP) and Qwen3-VL's
(0.5) normalisation, 14 and 16 px patches; the processor, the clip and conversation encodings and the
video patches are the same with the fast path on and off; and wherever the fast path does not apply the
Hugging Face processor runs (its `_preprocess` is counted).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402

from model.loading import build_preset_processor, make_adapter  # noqa: E402
from model.presets import get_preset  # noqa: E402
from model.qwen import fast_image_inputs, fast_path_reason, video_patches  # noqa: E402

NORMS = {"qwen2 (CLIP)": (list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)), "qwen3 (0.5)": ([0.5] * 3, [0.5] * 3)}
# (rows, cols) in merge blocks: odd and even, square, one block, tall and wide
BLOCKS = [(1, 1), (3, 5), (4, 6), (7, 2), (2, 9), (17, 23)]


def _ip(norm: str, patch: int, **kw) -> Qwen2VLImageProcessorPil:
    mean, std = NORMS[norm]
    kw = {"merge_size": 2, "temporal_patch_size": 2, **kw}
    return Qwen2VLImageProcessorPil(patch_size=patch, image_mean=mean, image_std=std, **kw)


def _views(blocks, cell: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (r * cell, c * cell, 3), dtype=np.uint8) for r, c in blocks]


def _hf(ip, images, **kw):
    return Qwen2VLImageProcessorPil.__call__(ip, images=images, do_resize=False, return_tensors="pt", **kw)


def _assert_same(got, want):
    assert got is not None, "the fast path did not apply"
    assert got["pixel_values"].dtype == want["pixel_values"].dtype == torch.float32
    assert got["image_grid_thw"].dtype == want["image_grid_thw"].dtype
    assert torch.equal(got["image_grid_thw"], want["image_grid_thw"])
    assert got["pixel_values"].shape == want["pixel_values"].shape
    assert torch.equal(got["pixel_values"], want["pixel_values"])  # bit-identical: max abs difference 0


@pytest.mark.parametrize("patch", [14, 16])
@pytest.mark.parametrize("norm", list(NORMS))
def test_fast_path_is_bit_identical_to_the_processor(norm, patch):
    ip = _ip(norm, patch)
    views = _views(BLOCKS, 2 * patch, seed=patch)
    assert fast_path_reason(ip, views, do_resize=False, return_tensors="pt") == ""
    for images in (views, [Image.fromarray(v) for v in views], views[1:2]):  # arrays, PIL, one image
        _assert_same(fast_image_inputs(ip, images, do_resize=False, return_tensors="pt"), _hf(ip, images))


def test_extreme_values_and_numpy_output():
    ip = _ip("qwen2 (CLIP)", 14)
    views = [np.full((28, 56, 3), v, np.uint8) for v in (0, 255, 1, 254)]
    _assert_same(fast_image_inputs(ip, views, do_resize=False, return_tensors="pt"), _hf(ip, views))
    got = fast_image_inputs(ip, views, do_resize=False, return_tensors="np")
    want = Qwen2VLImageProcessorPil.__call__(ip, images=views, do_resize=False, return_tensors="np")
    assert isinstance(got["pixel_values"], np.ndarray) and np.array_equal(got["pixel_values"], want["pixel_values"])


@pytest.mark.parametrize("kw", [{"do_rescale": False}, {"do_normalize": False}, {"do_rescale": False,
                                                                                   "do_normalize": False},
                                {"rescale_factor": 1 / 127.5}, {"temporal_patch_size": 3}])
def test_other_processor_settings_stay_identical(kw):
    """Settings the table is built from (rescale, normalise) or the layout follows (temporal slots)."""
    ip = _ip("qwen3 (0.5)", 16, **kw)
    views = _views([(3, 5), (2, 2)], 32, seed=3)
    _assert_same(fast_image_inputs(ip, views, do_resize=False, return_tensors="pt"), _hf(ip, views))


PRESETS = ["tiny", "tiny-qwen2.5", "tiny-qwen3-vl"]


def _adapter(name: str):
    preset = get_preset(name)
    return make_adapter(preset.family, build_preset_processor(preset), None)


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _frames(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for H, W in ((480, 640), (240, 320), (100, 150))]


@pytest.fixture
def count_hf(monkeypatch):
    """The number of times the Hugging Face processor's own `_preprocess` ran."""
    calls = []
    real = Qwen2VLImageProcessorPil._preprocess

    def counted(self, *a, **kw):
        calls.append(1)
        return real(self, *a, **kw)

    monkeypatch.setattr(Qwen2VLImageProcessorPil, "_preprocess", counted)
    return calls


@pytest.mark.parametrize("name", PRESETS)
def test_adapter_encodings_are_the_same_with_and_without_the_fast_path(name, count_hf):
    adapter = _adapter(name)
    frames = _frames()
    images = [{"from": "human", "value": "<image>\n<image>\nWhat is it?"}, {"from": "gpt", "value": "A room."}]
    video = [{"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "A walk."}]
    small = [adapter.resize(f) for f in frames[2:]] * 5  # five frames of one size (an odd count)
    ts = [0.5 * i for i in range(len(small))]

    def encode():
        return (adapter.encode_clip(frames), adapter.encode_conversation(frames[:2], "image", images),
                adapter.encode_conversation([np.asarray(f) for f in small], "video", video, ts, video_frames=5))

    # building the table runs the processor once (the probe)
    assert fast_path_reason(adapter.processor.image_processor, do_resize=False) == ""
    count_hf.clear()
    fast = encode()
    assert count_hf == [], "the fast path should not run the processor's own step"
    adapter.processor.fast_images = False
    slow = encode()
    assert len(count_hf) == 3
    for f, s in zip(fast, slow):
        assert f.keys() == s.keys()
        for k in f:
            assert _equal(f[k], s[k]), k


@pytest.mark.parametrize("n_frames", [4, 5])
def test_video_patches_are_the_same_with_and_without_the_fast_path(n_frames, count_hf):
    adapter = _adapter("tiny-qwen2.5")
    ip = adapter.processor.image_processor
    frames = [adapter.resize(f) for f in _frames(1)[:1] * n_frames]
    assert fast_path_reason(ip, do_resize=False) == ""
    count_hf.clear()
    fast = video_patches(ip, frames, do_resize=False)
    assert count_hf == []
    slow = video_patches(_Stock(ip), frames, do_resize=False)  # the processor itself
    assert count_hf == [1]
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    assert fast[1].tolist() == [[(n_frames + 1) // 2, *slow[1][0, 1:].tolist()]]


class _Stock:
    """An image processor that is not Qwen2VLImageProcessorPil (so the fast path never applies) and runs it."""

    def __init__(self, ip):
        self._ip = ip

    def __getattr__(self, k):
        return getattr(self._ip, k)

    def __call__(self, **kw):
        return self._ip(**kw)


class _OtherNormalize(Qwen2VLImageProcessorPil):
    """A processor whose normalisation differs from the stock one (what the fast path must not assume)."""

    def normalize(self, image, mean, std, **kwargs):
        return super().normalize(image, mean, std, **kwargs) * 0.5 + 0.25


def test_another_processor_class_falls_back_to_the_processor(count_hf):
    preset = get_preset("tiny")
    processor = build_preset_processor(preset)
    base = processor.image_processor
    other = _OtherNormalize(min_pixels=base.size["shortest_edge"], max_pixels=base.size["longest_edge"],
                            patch_size=base.patch_size, merge_size=base.merge_size,
                            temporal_patch_size=base.temporal_patch_size)
    assert "_OtherNormalize" in fast_path_reason(other)
    processor.image_processor = other
    adapter = make_adapter(preset.family, processor, None)
    frames = _frames(2)
    count_hf.clear()
    got = adapter.encode_clip(frames)
    assert len(count_hf) == 1
    want = other(images=[adapter.resize(f) for f in frames], do_resize=False, return_tensors="pt")
    assert torch.equal(got["pixel_values"], want["pixel_values"])
    stock = _hf(base, [adapter.resize(f) for f in frames])
    assert not torch.equal(got["pixel_values"], stock["pixel_values"])  # the subclass's output, not the stock one


def test_a_patched_processor_step_is_caught_by_the_probe(monkeypatch):
    """A stock class whose normalize is no longer per value (here: a ramp along the row) fails the probe."""
    ip = _ip("qwen2 (CLIP)", 14)
    real = Qwen2VLImageProcessorPil.normalize

    def ramp(self, image, mean, std, **kwargs):
        out = real(self, image, mean, std, **kwargs)
        return out + np.linspace(0, 1e-3, out.shape[-1], dtype=np.float32)

    monkeypatch.setattr(Qwen2VLImageProcessorPil, "normalize", ramp)
    views = _views([(3, 5)], 28)
    assert "probe" in fast_path_reason(ip, views, do_resize=False, return_tensors="pt")
    assert fast_image_inputs(ip, views, do_resize=False, return_tensors="pt") is None
    monkeypatch.setattr(Qwen2VLImageProcessorPil, "normalize", real)
    assert fast_path_reason(ip, views, do_resize=False, return_tensors="pt") == ""


@pytest.mark.parametrize("case, kw, images, why", [
    ("resize on", {"do_resize": True}, None, "do_resize"),
    ("resize by default", {}, None, "do_resize"),
    ("a call argument", {"do_resize": False, "image_mean": [0.5] * 3}, None, "image_mean"),
    ("grey view", {"do_resize": False}, [Image.new("L", (56, 28))], "not an RGB uint8"),
    ("float view", {"do_resize": False}, [np.zeros((28, 56, 3), np.float32)], "not an RGB uint8"),
    ("channel-first-looking view", {"do_resize": False}, [np.zeros((3, 56, 3), np.uint8)], "not an RGB uint8"),
    ("a side not in whole blocks", {"do_resize": False}, [np.zeros((42, 56, 3), np.uint8)], "whole 28x28"),
])
def test_what_the_fast_path_does_not_take_goes_to_the_processor(case, kw, images, why, count_hf):
    ip = _ip("qwen2 (CLIP)", 14)
    images = images if images is not None else _views([(2, 3)], 28)
    assert why in fast_path_reason(ip, images, **kw), case
    assert fast_image_inputs(ip, images, **kw) is None
    count_hf.clear()
    if case in ("channel-first-looking view", "a side not in whole blocks"):  # the processor's own error stays
        with pytest.raises(ValueError):
            ip(images=images, return_tensors="pt", **kw)
    else:
        ip(images=images, return_tensors="pt", **kw)  # the processor itself takes it
    assert count_hf == [1]


@pytest.mark.parametrize("attr, value", [("image_mean", [0.5] * 4), ("image_std", [0.5] * 2), ("rescale_factor", None)])
def test_settings_the_fast_path_cannot_read_fall_back(attr, value):
    ip = _ip("qwen2 (CLIP)", 14)
    setattr(ip, attr, value)
    views = _views([(1, 1)], 28)
    assert "3 values" in fast_path_reason(ip, views, do_resize=False)
    assert fast_image_inputs(ip, views, do_resize=False) is None
