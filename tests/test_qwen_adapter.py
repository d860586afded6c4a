"""Qwen2-VL / Qwen2.5-VL adapter, tiny presets, tokenizer and loading (CPU)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from model.loading import (ModelLoadError, build_model_and_processor, build_preset_model,  # noqa: E402
                           resolve_attn_implementation, save_preset_checkpoint)
from model.presets import QWEN_FAMILIES, PRESETS, get_preset  # noqa: E402
from model.qwen import PROMPT  # noqa: E402
from model.tokenizer import SPECIAL_TOKENS, VOCAB_SIZE, _trained, build_tokenizer  # noqa: E402

TINY = ("tiny", "tiny-qwen2.5")


@pytest.fixture(scope="module", params=TINY)
def tiny(request):
    """(name, model, processor, adapter) of a tiny preset."""
    model, processor, adapter = build_model_and_processor(request.param)
    return request.param, model, processor, adapter


def _views(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for H, W in ((240, 320), (320, 240), (100, 150))]


def _cell_colours(n: int) -> np.ndarray:
    """(n, 3) uint8, pairwise distinct (the red channel alone tells them apart)."""
    i = np.arange(n)
    return np.stack([20 + 4 * i, 250 - 3 * i, (i * 53) % 256], axis=1).astype(np.uint8)


def _painted(grid, stored: tuple[int, int]) -> np.ndarray:
    """A stored (W, H) view whose region under resized cell k has colour k.

    The stored size is an exact multiple of the resized one per cell, so each cell of the
    resized image is one flat colour apart from a thin bicubic seam at its border.
    """
    W, H = stored
    sx, sy = W / grid.size[0], H / grid.size[1]
    cell_w, cell_h = grid.cell_px * sx, grid.cell_px * sy
    assert cell_w.is_integer() and cell_h.is_integer()
    colours = _cell_colours(grid.n_cells).reshape(grid.rows, grid.cols, 3)
    return np.repeat(np.repeat(colours, int(cell_h), axis=0), int(cell_w), axis=1)  # (H, W, 3)


def _token_colours(pixel_values: torch.Tensor, thw: torch.Tensor, processor) -> np.ndarray:
    """Median RGB (0-255) of each merged vision token of one image, in the model's token order.

    pixel_values (4 N, C * T * p * p): Qwen flattens each 14x14 patch as (C, T, p, p) and
    orders the patches (rows/2, cols/2, 2, 2), so token k is patches 4k .. 4k + 3.
    """
    ip = processor.image_processor
    T, p, m = ip.temporal_patch_size, ip.patch_size, ip.merge_size
    n_tok = int(thw.prod()) // (m * m)
    x = pixel_values.reshape(n_tok, m, m, 3, T, p, p)[:, :, :, :, 0]  # (N, m, m, C, p, p), frame 0
    mean = torch.tensor(ip.image_mean).view(1, 1, 1, 3, 1, 1)
    std = torch.tensor(ip.image_std).view(1, 1, 1, 3, 1, 1)
    rgb = (x * std + mean) * 255.0
    rgb = rgb.permute(0, 3, 1, 4, 2, 5).reshape(n_tok, 3, -1)  # (N, C, m p * m p)
    return rgb.median(dim=2).values.round().numpy()


def _image_tensor(pixel_values: torch.Tensor, thw: torch.Tensor, processor) -> np.ndarray:
    """Undo the patch flattening: (4 N, C T p p) -> RGB (H', W', 3) float 0-255, frame 0."""
    ip = processor.image_processor
    T, p, m = ip.temporal_patch_size, ip.patch_size, ip.merge_size
    _, gh, gw = (int(v) for v in thw)
    x = pixel_values.reshape(gh // m, gw // m, m, m, 3, T, p, p)[..., 0, :, :]  # (R, Co, m, m, C, p, p)
    x = x.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * p, gw * p)  # (C, H', W')
    mean, std = torch.tensor(ip.image_mean).view(3, 1, 1), torch.tensor(ip.image_std).view(3, 1, 1)
    return ((x * std + mean) * 255.0).permute(1, 2, 0).numpy()


# ------------------------------------------------------------------------ (a) forward

def test_forward_all_layers_on_a_collated_batch(tiny):
    name, model, processor, adapter = tiny
    a, b, c = _views()
    items = [adapter.encode_pair(a, b), adapter.encode_pair(c, a)]
    batch = adapter.collate(items)
    cfg = model.config.text_config
    B, S = batch["input_ids"].shape
    assert B == 2 and S == max(len(it["input_ids"]) for it in items)
    assert batch["image_grid_thw"].tolist() == [[1, 12, 16], [1, 16, 12], [1, 8, 10], [1, 12, 16]]
    assert batch["pixel_values"].shape == (4 * (48 + 48 + 20 + 48), 3 * 2 * 14 * 14)
    assert [len(p) for p in batch["cell_pos_a"]] == [48, 20] and [len(p) for p in batch["cell_pos_b"]] == [48, 48]
    assert batch["attention_mask"][1].sum() == len(items[1]["input_ids"]) < S  # right padding

    with torch.no_grad():
        out = model(**adapter.model_inputs(batch), output_hidden_states=True)
    assert len(out.hidden_states) == cfg.num_hidden_layers + 1
    for h in out.hidden_states:
        assert h.shape == (B, S, cfg.hidden_size) and torch.isfinite(h).all()
    assert out.logits.shape == (B, S, cfg.vocab_size)

    # right padding keeps the positions valid: the padded sample equals the sample alone
    alone = adapter.collate(items[1:])
    with torch.no_grad():
        ref = model(**adapter.model_inputs(alone), output_hidden_states=True)
    n = len(items[1]["input_ids"])
    for h, r in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(h[1, :n], r[0], rtol=1e-4, atol=1e-4)


def test_precomputed_rope_positions_equal_the_models_own(tiny, monkeypatch):
    """Positions computed on the CPU batch (what the trainer and probe pass) give the same forward,
    and the model then makes none of its per-image host syncs."""
    from model.qwen import rope_position_ids

    name, model, processor, adapter = tiny
    a, b, c = _views()
    batch = adapter.collate([adapter.encode_pair(a, b), adapter.encode_pair(c, a)])  # padded: two view sizes
    inputs = adapter.model_inputs(batch)
    pos = rope_position_ids(model, inputs)
    B, S = batch["input_ids"].shape
    assert pos.shape == (3, B, S)
    body = model.model
    items = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: items.append(1) or item(t))
    with torch.no_grad():
        own = body(**inputs, use_cache=False).last_hidden_state
        n_own = len(items)
        given = body(**inputs, position_ids=pos, use_cache=False).last_hidden_state
    assert torch.equal(own, given)
    assert n_own - (len(items) - n_own) >= 4 * B, (n_own, len(items) - n_own)  # the per-image syncs are gone


def test_video_input_matches_its_frames(tiny):
    """The torchvision-free video input: a temporal patch of one frame twice is that frame's image
    patch, the tower sees [f0, f0, f1, f1] as the images f0 and f1, consecutive frames fill the two
    temporal slots in order, and the model generates from it."""
    from model.qwen import video_patches

    name, model, processor, adapter = tiny
    rng = np.random.default_rng(3)
    f = [adapter.resize(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)) for _ in range(3)]
    ip = processor.image_processor
    img = ip(images=f, do_resize=False, return_tensors="pt")
    n = int(img["image_grid_thw"][0].prod())
    per_frame = img["pixel_values"].reshape(3, n, 3, 2, 14, 14)
    vid, grid = video_patches(ip, [f[0], f[1], f[2]], do_resize=False)  # odd: the last frame repeats
    assert grid.tolist() == [[2] + img["image_grid_thw"][0, 1:].tolist()]
    slots = vid.reshape(2, n, 3, 2, 14, 14)
    for t, (first, second) in enumerate(((0, 1), (2, 2))):
        assert torch.equal(slots[t, :, :, 0], per_frame[first, :, :, 0])
        assert torch.equal(slots[t, :, :, 1], per_frame[second, :, :, 0])
    visual = model.model.visual
    pv, pv_grid = video_patches(ip, [f[0], f[0], f[1], f[1]], do_resize=False)
    with torch.no_grad():
        as_video = visual(pv, grid_thw=pv_grid)
        as_images = visual(img["pixel_values"][:2 * n], grid_thw=img["image_grid_thw"][:2])
    as_video, as_images = (getattr(o, "pooler_output", o) for o in (as_video, as_images))
    torch.testing.assert_close(as_video, as_images, rtol=1e-5, atol=1e-5)

    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text":
                                          "How many chairs?"}]}], tokenize=False, add_generation_prompt=True)
    extra = {"second_per_grid_ts": [1.0]} if name == "tiny-qwen2.5" else {}
    inputs = processor(text=[text], videos=[f], do_resize=False, **extra)
    n_video = int((inputs["mm_token_type_ids"] == 2).sum())
    assert n_video == int(inputs["video_grid_thw"].prod()) // 4 == 2 * n // 4
    out = model.generate(**inputs, do_sample=False, max_new_tokens=3)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_prompt_text_is_fixed(tiny):
    _, _, processor, adapter = tiny
    assert adapter.text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"
        f"{PROMPT}<|im_end|>\n")
    item = adapter.encode_pair(*_views()[:2])
    ids = item["input_ids"]
    tok = processor.tokenizer
    vs, ve = tok.convert_tokens_to_ids("<|vision_start|>"), tok.convert_tokens_to_ids("<|vision_end|>")
    pa, pb = item["cell_pos_a"], item["cell_pos_b"]
    assert ids[pa[0] - 1] == vs and ids[pa[-1] + 1] == ve and ids[pb[0] - 1] == vs and ids[pb[-1] + 1] == ve
    assert torch.equal(item["mm_token_type_ids"], (ids == adapter.image_token_id).long())


# -------------------------------------------------------------------- (b) token order

@pytest.mark.parametrize("stored", [(320, 240), (240, 320)])
def test_cell_order_matches_the_models_vision_tokens(tiny, stored):
    """Colour-coded cells: the token at cell_pos[k] carries the colour of cell k (row-major)."""
    _, _, processor, adapter = tiny
    other = (stored[1], stored[0])
    grid_a, grid_b = adapter.grid(stored), adapter.grid(other)
    assert grid_a.size == ((224, 168) if stored == (320, 240) else (168, 224))
    assert (grid_a.rows, grid_a.cols) == (grid_a.size[1] // 28, grid_a.size[0] // 28)
    view_a, view_b = _painted(grid_a, stored), _painted(grid_b, other)
    item = adapter.encode_pair(view_a, view_b)

    thw = item["image_grid_thw"]
    n_patch_a = int(thw[0].prod())
    pv_a, pv_b = item["pixel_values"][:n_patch_a], item["pixel_values"][n_patch_a:]
    # the processor did not resize again: its pixels are the adapter's resize
    np.testing.assert_allclose(_image_tensor(pv_a, thw[0], processor),
                               np.asarray(adapter.resize(view_a), dtype=np.float64), atol=1e-3)

    image_pos = torch.nonzero(item["input_ids"] == adapter.image_token_id).squeeze(1)
    for grid, pv, t, cell_pos, seq_pos in ((grid_a, pv_a, thw[0], item["cell_pos_a"], image_pos[:grid_a.n_cells]),
                                           (grid_b, pv_b, thw[1], item["cell_pos_b"], image_pos[grid_a.n_cells:])):
        tokens = _token_colours(pv, t, processor)  # (N, 3): the j-th vision token the model fills in
        colours = _cell_colours(grid.n_cells)
        assert cell_pos.dtype == torch.long and len(cell_pos) == grid.n_cells
        for index in range(grid.n_cells):
            j = int(torch.nonzero(seq_pos == cell_pos[index]))  # which vision token sits at cell_pos[index]
            np.testing.assert_array_equal(tokens[j], colours[index], err_msg=f"cell {index}")


def _palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours, pairwise distinct by at least 30 grey levels in some channel (7 levels cubed)."""
    i = np.arange(n)
    assert n <= 343
    return np.stack([20 + 30 * (i % 7), 20 + 30 * ((i // 7) % 7), 20 + 30 * (i // 49)], axis=1).astype(np.uint8)


def _painted_ids(grid, stored: tuple[int, int], first: int) -> np.ndarray:
    """A stored (W, H) view whose cell k carries palette colour first + k (an exact multiple per cell)."""
    W, H = stored
    sx, sy = W / grid.size[0], H / grid.size[1]
    cell_w, cell_h = grid.cell_px * sx, grid.cell_px * sy
    assert cell_w.is_integer() and cell_h.is_integer()
    colours = _palette(first + grid.n_cells)[first:].reshape(grid.rows, grid.cols, 3)
    return np.repeat(np.repeat(colours, int(cell_h), axis=0), int(cell_w), axis=1)


def test_clip_frame_and_cell_order_match_the_models_vision_tokens(tiny):
    """A K = 4 clip (frames of three sizes): the token at cell_pos[k][i] carries the colour of cell i of
    frame k, so frames reach the sequence in clip order and cells in row-major order (DESIGN §5)."""
    _, _, processor, adapter = tiny
    sizes = [(320, 240), (240, 320), (336, 252), (320, 240)]
    grids = [adapter.grid(sz) for sz in sizes]
    firsts = np.cumsum([0] + [g.n_cells for g in grids])[:-1]
    frames = [_painted_ids(g, sz, int(f)) for g, sz, f in zip(grids, sizes, firsts)]
    item = adapter.encode_clip(frames)
    thw = item["image_grid_thw"]
    assert thw.tolist() == [[1, 2 * g.rows, 2 * g.cols] for g in grids]
    counts = [int(t.prod()) for t in thw]
    tokens = np.concatenate([_token_colours(pv, t, processor)
                             for pv, t in zip(torch.split(item["pixel_values"], counts), thw)])  # (sum N, 3)
    image_pos = torch.nonzero(item["input_ids"] == adapter.image_token_id).squeeze(1)
    colours = _palette(int(firsts[-1]) + grids[-1].n_cells)
    assert [len(p) for p in item["cell_pos"]] == [g.n_cells for g in grids]
    for k, cell_pos in enumerate(item["cell_pos"]):
        j = torch.searchsorted(image_pos, cell_pos)  # which vision token sits at each cell's position
        assert torch.equal(image_pos[j], cell_pos)
        np.testing.assert_array_equal(tokens[j.numpy()], colours[firsts[k]:firsts[k] + grids[k].n_cells],
                                      err_msg=f"frame {k}")
    assert adapter.clip_text(4).count("<|image_pad|>") == 4 and "4 views of the same scene." in adapter.clip_text(4)


def test_vision_tower_and_mrope_keep_row_major_order(tiny):
    """The tower returns tokens in pixel_values' block order (Qwen2.5's window permutation is
    undone), and the LM's M-RoPE puts the token at cell_pos[k] at (row, col) = divmod(k, cols)."""
    name, model, processor, adapter = tiny
    a, b, c = _views()
    item = adapter.encode_pair(a, c)
    batch = adapter.collate([item])
    visual = model.model.visual
    saved = {k: v.clone() for k, v in visual.state_dict().items()}
    try:
        with torch.no_grad():
            for blk in visual.blocks:  # make every block the identity (residual only)
                last = blk.mlp.fc2 if hasattr(blk.mlp, "fc2") else blk.mlp.down_proj
                for mod in (blk.attn.proj, last):
                    for p in mod.parameters():
                        p.zero_()
            got = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
            ref = visual.merger(visual.patch_embed(batch["pixel_values"]))  # token k <- patches 4k..4k+3
        torch.testing.assert_close(torch.cat(got), ref)
    finally:
        visual.load_state_dict(saved)

    pos, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                        image_grid_thw=batch["image_grid_thw"],
                                        attention_mask=batch["attention_mask"])  # (3, 1, S)
    for rgb, cell_pos in ((a, item["cell_pos_a"]), (c, item["cell_pos_b"])):
        grid = adapter.grid((rgb.shape[1], rgb.shape[0]))
        hw = pos[1:, 0, cell_pos] - pos[1:, 0, cell_pos[:1]]  # (2, N): (row, col) relative to cell 0
        k = torch.arange(grid.n_cells)
        assert torch.equal(hw[0], k // grid.cols) and torch.equal(hw[1], k % grid.cols)


# ------------------------------------------------------------------ (c) tokenizer

def test_tokenizer_ids_match_the_config():
    tok = build_tokenizer()
    assert len(tok) == VOCAB_SIZE
    for name in PRESETS:
        if get_preset(name).family not in QWEN_FAMILIES:
            continue  # the LLaVA presets have their own tokenizer (tests/test_llava_adapter.py)
        cfg = get_preset(name).config()
        assert tok.convert_tokens_to_ids("<|image_pad|>") == cfg.image_token_id
        assert tok.convert_tokens_to_ids("<|video_pad|>") == cfg.video_token_id
        assert tok.convert_tokens_to_ids("<|vision_start|>") == cfg.vision_start_token_id
        assert tok.convert_tokens_to_ids("<|vision_end|>") == cfg.vision_end_token_id
        assert tok.pad_token_id == cfg.text_config.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
        assert tok.convert_tokens_to_ids("<|im_end|>") == cfg.text_config.eos_token_id
        if name.startswith("tiny"):
            assert cfg.text_config.vocab_size == VOCAB_SIZE
    # special tokens are single tokens and never split
    text = "".join(SPECIAL_TOKENS)
    assert tok(text).input_ids == [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert tok.decode(tok("Two views of the same scene.").input_ids) == "Two views of the same scene."


def test_tokenizer_and_presets_are_deterministic():
    assert _trained.__wrapped__() == _trained()  # retraining gives the same JSON
    preset = get_preset("tiny-qwen2.5")
    m1, m2 = build_preset_model(preset), build_preset_model(preset)
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(v1, v2), k


def test_every_preset_config_builds():
    for name in PRESETS:
        preset = get_preset(name)
        cfg = preset.config()
        assert cfg.model_type == preset.family
    big = get_preset("qwen2.5-vl-7b").config()
    text, vision = big.text_config, big.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size) == (3584, 28, 28, 4, 18944, 152064)
    assert (vision.depth, vision.hidden_size, vision.out_hidden_size, vision.intermediate_size) == (32, 1280, 3584, 3420)
    assert 8.2e9 < get_preset("qwen2-vl-7b").n_params() < 8.4e9


# -------------------------------------------------------------- (d) --model PATH

@pytest.mark.parametrize("name", TINY)
def test_saved_checkpoint_loads_with_identical_logits(tmp_path, name):
    path = save_preset_checkpoint(name, tmp_path / name)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == get_preset(name).family
    m1, p1, a1 = build_model_and_processor(name)
    m2, p2, a2 = build_model_and_processor(str(path))
    assert type(m1) is type(m2) and a2.family == a1.family and a2.max_pixels == a1.max_pixels
    assert json.loads((path / "processor_config.json").read_text())["processor_class"] in (
        "Qwen2VLProcessor", "Qwen2_5_VLProcessor")
    a, b, c = _views(1)
    batch1 = a1.collate([a1.encode_pair(a, b), a1.encode_pair(c, a)])
    batch2 = a2.collate([a2.encode_pair(a, b), a2.encode_pair(c, a)])
    for k in (*a1.model_inputs(batch1), "cell_pos_a", "cell_pos_b"):  # the inputs this batch holds
        v1, v2 = batch1[k], batch2[k]
        assert all(torch.equal(x, y) for x, y in zip(v1, v2)) if isinstance(v1, list) else torch.equal(v1, v2), k
    with torch.no_grad():
        l1 = m1(**a1.model_inputs(batch1)).logits
        l2 = m2(**a2.model_inputs(batch2)).logits
    assert torch.equal(l1, l2)


# ---------------------------------------------------------------------- (e) errors

def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


def test_unknown_preset_fails_in_one_line():
    with pytest.raises(ModelLoadError) as err:
        build_model_and_processor("tiny-llama")
    msg = _one_line(err)
    assert "tiny-llama" in msg and all(name in msg for name in PRESETS)


def test_unsupported_family_fails_in_one_line(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    with pytest.raises(ModelLoadError) as err:
        build_model_and_processor(str(tmp_path / "llama"))
    msg = _one_line(err)
    assert "llama" in msg and "qwen2_vl" in msg and "qwen2_5_vl" in msg


def test_unhonourable_attention_fails_in_one_line():
    with pytest.raises(ModelLoadError) as err:
        build_model_and_processor("tiny", attn_implementation="flash_attention_2")
    assert "flash_attention_2" in _one_line(err)
    with pytest.raises(ModelLoadError) as err:
        build_model_and_processor("tiny", attn_implementation="fast")
    _one_line(err)
    assert resolve_attn_implementation(None, torch.device("cpu"), torch.float32) == "sdpa"
