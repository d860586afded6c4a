"""Qwen3-VL: adapter (32 px cells), tower and M-RoPE order, DeepStack in the captured features, CPU-side
position ids, packed vision attention, the timestamped video input, presets, checkpoints (CPU)."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from model.loading import (ModelLoadError, build_model_and_processor, build_preset_model,  # noqa: E402
                           save_preset_checkpoint)
from model.presets import FAMILIES, QWEN3_FAMILIES, get_preset  # noqa: E402
from model.qwen import PROMPT, rope_position_ids  # noqa: E402
from model.qwen3 import QWEN3_CHAT_TEMPLATE, Qwen3Adapter, frame_group_times  # noqa: E402
from test_qwen_adapter import _image_tensor, _painted_ids, _palette, _token_colours  # noqa: E402

TINY3 = ("tiny-qwen3-vl", "tiny-qwen3-vl-moe")


@pytest.fixture(scope="module", params=TINY3)
def tiny3(request):
    """(name, model, processor, adapter) of a tiny Qwen3-VL preset (dense and MoE)."""
    model, processor, adapter = build_model_and_processor(request.param)
    return request.param, model, processor, adapter


@pytest.fixture(scope="module")
def dense():
    return build_model_and_processor("tiny-qwen3-vl")


def _views(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for H, W in ((240, 320), (320, 240), (120, 160))]


# ------------------------------------------------------------------ (a) cells and token order

CLIP_SIZES = [(320, 240), (240, 320), (160, 120), (336, 252)]
"""Stored (W, H) of a K = 4 clip: three cell grids (8 x 6, 6 x 8, 5 x 4), the last one resized down."""


def test_clip_frame_and_cell_order_at_32_px(dense):
    """A K = 4 clip of colour-coded frames: the token at cell_pos[k][i] carries the colour of the 32x32 cell i of
    frame k, so frames reach the sequence in clip order and cells in row-major order (DESIGN §5)."""
    _, processor, adapter = dense
    assert isinstance(adapter, Qwen3Adapter) and adapter.cell_px == 32 and adapter.patch_size == 16
    grids = [adapter.grid(sz) for sz in CLIP_SIZES]
    assert [(g.size, g.rows, g.cols) for g in grids] == [((256, 192), 6, 8), ((192, 256), 8, 6), ((160, 128), 4, 5),
                                                         ((256, 192), 6, 8)]
    firsts = np.cumsum([0] + [g.n_cells for g in grids])[:-1]
    frames = [_painted_ids(g, sz, int(f)) for g, sz, f in zip(grids, CLIP_SIZES, firsts)]
    item = adapter.encode_clip(frames)
    thw = item["image_grid_thw"]
    assert thw.tolist() == [[1, 2 * g.rows, 2 * g.cols] for g in grids]
    assert item["pixel_values"].shape == (4 * sum(g.n_cells for g in grids), 3 * 2 * 16 * 16)
    counts = [int(t.prod()) for t in thw]
    pvs = torch.split(item["pixel_values"], counts)
    # the processor did not resize again: its pixels are the adapter's resize (Qwen3-VL's 0.5 / 0.5 normalisation)
    np.testing.assert_allclose(_image_tensor(pvs[3], thw[3], processor),
                               np.asarray(adapter.resize(frames[3]), dtype=np.float64), atol=1e-3)
    tokens = np.concatenate([_token_colours(pv, t, processor) for pv, t in zip(pvs, thw)])  # (sum N, 3)
    image_pos = torch.nonzero(item["input_ids"] == adapter.image_token_id).squeeze(1)
    colours = _palette(int(firsts[-1]) + grids[-1].n_cells)
    assert [len(p) for p in item["cell_pos"]] == [g.n_cells for g in grids]
    for k, cell_pos in enumerate(item["cell_pos"]):
        j = torch.searchsorted(image_pos, cell_pos)  # which vision token sits at each cell's position
        assert torch.equal(image_pos[j], cell_pos)
        np.testing.assert_array_equal(tokens[j.numpy()], colours[firsts[k]:firsts[k] + grids[k].n_cells],
                                      err_msg=f"frame {k}")


def test_prompt_text_is_qwen3s_template(dense):
    """Qwen3-VL-Instruct's template has no default system turn; vision spans as Qwen2-VL's."""
    _, processor, adapter = dense
    assert processor.chat_template == QWEN3_CHAT_TEMPLATE
    assert adapter.text == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                            f"<|vision_start|><|image_pad|><|vision_end|>{PROMPT}<|im_end|>\n")
    assert adapter.clip_text(4).count("<|image_pad|>") == 4 and "4 views of the same scene." in adapter.clip_text(4)
    with_system = processor.apply_chat_template([{"role": "system", "content": "S."}, {"role": "user", "content": "Q?"}],
                                                tokenize=False, add_generation_prompt=True)
    assert with_system == "<|im_start|>system\nS.<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
    item = adapter.encode_pair(*_views()[:2])
    ids, tok = item["input_ids"], processor.tokenizer
    vs, ve = tok.convert_tokens_to_ids("<|vision_start|>"), tok.convert_tokens_to_ids("<|vision_end|>")
    for pos in (item["cell_pos_a"], item["cell_pos_b"]):
        assert ids[pos[0] - 1] == vs and ids[pos[-1] + 1] == ve
    assert torch.equal(item["mm_token_type_ids"], (ids == adapter.image_token_id).long())


def test_vision_tower_and_mrope_keep_row_major_order(tiny3):
    """The tower returns tokens (and DeepStack features) in pixel_values' merge-block order, and the LM's M-RoPE
    puts the token at cell_pos[k] at (row, col) = divmod(k, cols) of its frame."""
    name, model, processor, adapter = tiny3
    a, b, c = _views()
    item = adapter.encode_pair(a, c)
    batch = adapter.collate([item])
    visual = model.model.visual
    saved = {k: v.clone() for k, v in visual.state_dict().items()}
    try:
        with torch.no_grad():
            for blk in visual.blocks:  # every block the identity (residual only), no learned position embedding
                for mod in (blk.attn.proj, blk.mlp.linear_fc2):
                    for p in mod.parameters():
                        p.zero_()
            visual.pos_embed.weight.zero_()
            out = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
            x = visual.patch_embed(batch["pixel_values"])  # token k <- patches 4k..4k+3
            torch.testing.assert_close(torch.cat(out.pooler_output), visual.merger(x))
            assert len(out.deepstack_features) == len(visual.deepstack_visual_indexes) == 2
            for merger, feats in zip(visual.deepstack_merger_list, out.deepstack_features):
                torch.testing.assert_close(torch.cat(feats), merger(x))
    finally:
        visual.load_state_dict(saved)

    pos = rope_position_ids(model, adapter.model_inputs(batch))  # (3, 1, S): the model's own get_rope_index
    for rgb, cell_pos in ((a, item["cell_pos_a"]), (c, item["cell_pos_b"])):
        grid = adapter.grid((rgb.shape[1], rgb.shape[0]))
        hw = pos[1:, 0, cell_pos] - pos[1:, 0, cell_pos[:1]]  # (2, N): (row, col) relative to cell 0
        k = torch.arange(grid.n_cells)
        assert torch.equal(hw[0], k // grid.cols) and torch.equal(hw[1], k % grid.cols)
        assert (pos[0, 0, cell_pos] == pos[0, 0, cell_pos[0]]).all()  # one temporal position per frame


# ------------------------------------------------------------------ (b) what the heads read: DeepStack included

def _clip_batch(adapter):
    from conftest import clip_batch

    return clip_batch(adapter)


def test_captured_features_are_each_layers_query_input_after_deepstack(tiny3):
    """GaspVLM.capture equals each LM layer's q_proj input (a pre-hook on the real module) at every frame's
    cells, and for the layers after a DeepStack layer that input is input_layernorm(previous layer's output +
    the DeepStack feature of that cell): the heads read what the attention reads, DeepStack's addition included."""
    from model.wrapper import GaspConfig, GaspVLM

    name, vlm, _, adapter = tiny3
    g = GaspVLM(vlm, GaspConfig())
    batch = _clip_batch(adapter)
    inputs = adapter.model_inputs(batch)
    seen, outs = {}, {}

    def pre(l):
        return lambda mod, args: seen.__setitem__(l, args[0].detach().clone())

    def post(l):
        return lambda mod, args, out: outs.__setitem__(l, (out[0] if isinstance(out, tuple) else out).detach().clone())

    hooks = [layer.self_attn.q_proj.register_forward_pre_hook(pre(l)) for l, layer in enumerate(g.layers)]
    hooks += [layer.register_forward_hook(post(l)) for l, layer in enumerate(g.layers)]
    try:
        feats = g.capture(batch, inputs)
    finally:
        for h in hooks:
            h.remove()
    L, F_, N, D = feats.shape
    assert (L, F_, D) == (4, 5, 64) and batch["frame_clip"].tolist() == [0, 0, 0, 1, 1]
    for l in range(L):
        for f in range(F_):
            row, pos = int(batch["frame_clip"][f]), batch["cell_pos"][f]
            assert torch.equal(feats[l, f], seen[l][row, pos]), (l, f)

    # DeepStack: the tower's features of blocks 0 and 1 are added after LM layers 0 and 1
    with torch.no_grad():
        ds = vlm.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).deepstack_features
    ds = [torch.cat(d) for d in ds]  # (sum N, D) each, in sequence order of the image tokens
    assert len(ds) == 2
    mask = batch["input_ids"] == adapter.image_token_id  # (B, S)
    for l in range(L - 1):
        h = outs[l].clone()
        if l < len(ds):
            h[mask] = h[mask] + ds[l]
        with torch.no_grad():
            want = g.layers[l + 1].input_layernorm(h)
        torch.testing.assert_close(seen[l + 1], want, rtol=1e-5, atol=1e-5)
        if l < len(ds):  # without the addition the vision positions would read something else
            with torch.no_grad():
                bare = g.layers[l + 1].input_layernorm(outs[l])
            assert (bare[mask] - seen[l + 1][mask]).abs().max() > 1e-2, l
            torch.testing.assert_close(bare[~mask], seen[l + 1][~mask])  # text positions get no DeepStack


# ------------------------------------------------------------------ (c) CPU-side M-RoPE position ids

def test_precomputed_rope_positions_equal_the_models_own(tiny3, monkeypatch):
    """Interleaved M-RoPE: the position ids computed on the CPU batch (what the trainer and probe pass) give the
    same forward, and the model then makes none of its per-image host syncs."""
    name, model, processor, adapter = tiny3
    a, b, c = _views()
    batch = adapter.collate([adapter.encode_clip([a, b, c]), adapter.encode_pair(c, a)])  # padded: two lengths
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
    assert n_own - (len(items) - n_own) >= 3 * 5, (n_own, len(items) - n_own)  # 3 per image, 5 images: gone


# ------------------------------------------------------------------ (d) packed vision attention

SIZES = [(128, 192), (128, 192), (224, 160), (64, 64)]
"""(H, W) of four images: Qwen3-VL's tower attends within each image, blocks of 96, 96, 140 and 16 patches."""


@pytest.mark.parametrize("name", TINY3)
def test_packed_tower_equals_hugging_face(name, monkeypatch):
    from PIL import Image

    from model.loading import build_preset_processor
    from model.vision_attention import install_packed_vision_attention, uninstall_packed_vision_attention

    preset = dataclasses.replace(get_preset(name), max_pixels=256 * 256, min_pixels=32 * 32)
    vlm = build_preset_model(preset)
    visual = vlm.model.visual
    rng = np.random.default_rng(1)
    proc = build_preset_processor(preset)
    ims = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]
    out = proc.image_processor(images=ims, return_tensors="pt")
    pix, grid = out["pixel_values"].requires_grad_(True), out["image_grid_thw"]
    assert grid.tolist() == [[1, h // 16, w // 16] for h, w in SIZES]
    seen = []
    hooks = [blk.attn.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["cu_seqlens"].diff().tolist()), with_kwargs=True) for blk in visual.blocks]
    ref = visual(pix, grid_thw=grid)
    for h in hooks:
        h.remove()
    assert all(s == [96, 96, 140, 16] for s in seen), seen
    ref_out = torch.cat([ref.pooler_output] + list(ref.deepstack_features))
    params = list(visual.parameters())
    g_ref = torch.autograd.grad(ref_out.square().sum(), [pix] + params)

    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    assert install_packed_vision_attention(vlm) == preset.vision["depth"]
    got = visual(pix, grid_thw=grid)
    got_out = torch.cat([got.pooler_output] + list(got.deepstack_features))
    torch.testing.assert_close(got_out, ref_out, atol=1e-5, rtol=1e-5)
    g_got = torch.autograd.grad(got_out.square().sum(), [pix] + params)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert len(calls) == 3 * preset.vision["depth"]  # one SDPA call per distinct length (Hugging Face: per image)
    assert uninstall_packed_vision_attention(vlm) == preset.vision["depth"]
    calls.clear()
    visual(pix, grid_thw=grid)
    assert len(calls) == len(SIZES) * preset.vision["depth"]


def test_packed_attention_is_installed_by_the_loader_for_sdpa_only():
    model, _, _ = build_model_and_processor("tiny-qwen3-vl", attn_implementation="sdpa")
    assert sum(getattr(m.forward, "__name__", "") == "_packed_forward" for m in model.modules()) == 3
    model, _, _ = build_model_and_processor("tiny-qwen3-vl", attn_implementation="eager")
    assert not any(getattr(m.forward, "__name__", "") == "_packed_forward" for m in model.modules())


# ------------------------------------------------------------------ (e) video input with its timestamps

def test_video_input_carries_frame_times_and_matches_its_frames(dense):
    """The torchvision-free video input: per temporal patch `<t seconds>` + its own vision span (t = the mean time
    of its two frames), each block a temporal position of its own, the tower sees [f0, f0, f1, f1] as the images
    f0 and f1, and the model generates from it."""
    from model.qwen import video_patches

    model, processor, adapter = dense
    rng = np.random.default_rng(3)
    f = [adapter.resize(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)) for _ in range(3)]
    assert frame_group_times([0.0, 0.5, 1.0], 2) == [0.25, 1.0]  # odd: the last frame repeats
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text":
                                          "How many chairs?"}]}], tokenize=False, add_generation_prompt=True)
    assert text.count("<|vision_start|><|video_pad|><|vision_end|>") == 1
    inputs = processor(text=[text], videos=[f], timestamps=[[0.0, 2.0, 4.0]], do_resize=False)
    decoded = processor.tokenizer.decode(inputs["input_ids"][0])
    n = int(inputs["video_grid_thw"][0, 1:].prod()) // 4  # cells of one frame: 5 x 4
    block = "<|vision_start|>" + "<|video_pad|>" * n + "<|vision_end|>"
    assert inputs["video_grid_thw"].tolist() == [[2, 8, 10]]
    assert decoded == ("<|im_start|>user\n<1.0 seconds>" + block + "<4.0 seconds>" + block +
                       "How many chairs?<|im_end|>\n<|im_start|>assistant\n")
    assert int((inputs["mm_token_type_ids"] == 2).sum()) == 2 * n
    assert adapter.video_kwargs([0, 2, 4]) == {"timestamps": [[0.0, 2.0, 4.0]]}

    pos, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                        video_grid_thw=inputs["video_grid_thw"])
    vid = torch.nonzero(inputs["mm_token_type_ids"][0] == 2).squeeze(1)
    t0, t1 = pos[0, 0, vid[:n]], pos[0, 0, vid[n:]]
    assert (t0 == t0[0]).all() and (t1 == t1[0]).all() and t1[0] > t0[-1]  # a temporal position per block
    hw = pos[1:, 0, vid[n:]] - pos[1:, 0, vid[n:n + 1]]
    assert torch.equal(hw[0], torch.arange(n) // 5) and torch.equal(hw[1], torch.arange(n) % 5)

    ip = processor.image_processor
    img = ip(images=f[:2], do_resize=False, return_tensors="pt")
    pv, pv_grid = video_patches(ip, [f[0], f[0], f[1], f[1]], do_resize=False)
    with torch.no_grad():
        as_video = model.model.visual(pv, grid_thw=pv_grid).pooler_output
        as_images = model.model.visual(img["pixel_values"], grid_thw=img["image_grid_thw"]).pooler_output
    torch.testing.assert_close(as_video, as_images, rtol=1e-5, atol=1e-5)
    out = model.generate(**inputs, do_sample=False, max_new_tokens=3)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_video_without_frame_times_fails_in_one_line(dense):
    _, processor, adapter = dense
    f = [adapter.resize(np.zeros((120, 160, 3), np.uint8))] * 2
    text = "<|vision_start|><|video_pad|><|vision_end|>Hi"
    for kw in ({}, {"timestamps": [[0.0]]}):
        with pytest.raises(ValueError) as err:
            processor(text=[text], videos=[f], do_resize=False, **kw)
        assert "\n" not in str(err.value) and ("timestamps=" in str(err.value) or "frame times" in str(err.value))


# ------------------------------------------------------------------ (f) presets, checkpoints, errors

def test_presets_have_the_published_shapes():
    from model.tokenizer import build_tokenizer

    tok = build_tokenizer()
    for name in ("tiny-qwen3-vl", "tiny-qwen3-vl-moe", "qwen3-vl-4b", "qwen3-vl-8b"):
        cfg = get_preset(name).config()
        assert cfg.model_type == get_preset(name).family and cfg.model_type in QWEN3_FAMILIES
        assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
        assert cfg.vision_config.patch_size == 16 and cfg.vision_config.spatial_merge_size == 2
        assert cfg.text_config.rope_parameters["mrope_interleaved"] is True
    four, eight = get_preset("qwen3-vl-4b").config(), get_preset("qwen3-vl-8b").config()
    for cfg, shape, tower in ((four, (2560, 9728, 36, 32, 8, 128), (24, 1024, 4096, [5, 11, 17])),
                              (eight, (4096, 12288, 36, 32, 8, 128), (27, 1152, 4304, [8, 16, 24]))):
        t, v = cfg.text_config, cfg.vision_config
        assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
                t.num_key_value_heads, t.head_dim) == shape and t.vocab_size == 151936
        assert (v.depth, v.hidden_size, v.intermediate_size, list(v.deepstack_visual_indexes)) == tower
        assert v.out_hidden_size == t.hidden_size and t.rope_parameters["mrope_section"] == [24, 20, 20]
    assert four.tie_word_embeddings and not eight.tie_word_embeddings
    assert 4.3e9 < get_preset("qwen3-vl-4b").n_params() < 4.6e9
    assert 8.6e9 < get_preset("qwen3-vl-8b").n_params() < 8.9e9


@pytest.mark.parametrize("name", TINY3)
def test_saved_checkpoint_loads_with_identical_logits(tmp_path, name):
    path = save_preset_checkpoint(name, tmp_path / name)
    assert json.loads((path / "config.json").read_text())["model_type"] == get_preset(name).family
    assert json.loads((path / "processor_config.json").read_text())["processor_class"] == "Qwen3VLProcessor"
    m1, p1, a1 = build_model_and_processor(name)
    m2, p2, a2 = build_model_and_processor(str(path))
    assert type(m1) is type(m2) and type(a2) is Qwen3Adapter and a2.family == a1.family
    assert (a2.max_pixels, a2.min_pixels, a2.cell_px) == (a1.max_pixels, a1.min_pixels, 32)
    assert p2.chat_template == QWEN3_CHAT_TEMPLATE and list(p2.image_processor.image_mean) == [0.5, 0.5, 0.5]
    a, b, c = _views(1)
    batch1 = a1.collate([a1.encode_clip([a, b, c]), a1.encode_pair(c, a)])
    batch2 = a2.collate([a2.encode_clip([a, b, c]), a2.encode_pair(c, a)])
    # a media key holds a tensor only when the batch has that media (no video here: None)
    present = [k for k in a1.model_input_names if batch1.get(k) is not None]
    assert present == [k for k in a2.model_input_names if batch2.get(k) is not None] and "pixel_values" in present
    for k in present:
        assert torch.equal(batch1[k], batch2[k]), k
    assert all(torch.equal(x, y) for u, v in zip(batch1["cell_pos"], batch2["cell_pos"]) for x, y in zip(u, v))
    with torch.no_grad():
        assert torch.equal(m1(**a1.model_inputs(batch1)).logits, m2(**a2.model_inputs(batch2)).logits)


def test_unsupported_family_fails_in_one_line_naming_the_supported_ones(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    with pytest.raises(ModelLoadError) as err:
        build_model_and_processor(str(tmp_path / "llama"))
    msg = str(err.value)
    assert "\n" not in msg and "'llama'" in msg and all(f in msg for f in FAMILIES)
    assert "qwen3_vl" in msg and "qwen3_vl_moe" in msg
    from model.loading import build_preset_processor

    with pytest.raises(ValueError, match="Qwen3Adapter serves"):
        Qwen3Adapter(build_preset_processor(get_preset("tiny-qwen3-vl")), family="qwen2_vl")


@pytest.mark.slow  # DeepSpeed's first in-process start builds its CPU comm op (~3 min on 2 cores)
@pytest.mark.parametrize("name", TINY3)
def test_preset_weights_are_identical_under_zero3(name, monkeypatch):
    """tiny-qwen3-vl(-moe) is the same model with and without ZeRO-3 (training, probe and evaluation agree)."""
    from test_zero3_presets import test_preset_weights_are_identical_under_zero3 as same_under_zero3

    same_under_zero3(name, monkeypatch)


@pytest.mark.parametrize("name", TINY3)
def test_what_trains_with_lora_and_activation_checkpointing(name):
    """The GPU recipe's mode (LoRA + activation checkpointing) on both: a finite loss, gradients on the heads and
    the LM's LoRA layers only; dense: attention and MLP adapted, MoE: attention only (experts are fused tensors)."""
    from model.wrapper import GaspConfig, GaspVLM

    vlm, _, adapter = build_model_and_processor(name)
    g = GaspVLM(vlm, GaspConfig(trainable="lora", head="mlp", gradient_checkpointing=True))
    g.init_heads()
    g.train()
    batch = _clip_batch(adapter)
    loss, parts = g(batch, adapter.model_inputs(batch))
    assert torch.isfinite(loss) and parts["n_ab"] == 14
    loss.backward()
    got = {n for n, p in g.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"head.w1", "head.w2"} <= got and not any("visual" in n for n in got)
    lm = got - {"head.w1", "head.w2"}
    assert lm and all("lora_" in n and "language_model.layers." in n for n in lm)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[1] for n, _ in g.named_parameters() if "lora_" in n}
    assert adapted == ({"q_proj", "k_proj", "v_proj", "o_proj"} if name.endswith("moe") else
                       {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})


@pytest.mark.parametrize("fps,indices,grid", [(4.0, [0, 3, 6, 9, 12], [3, 4, 6]), (24.0, [0, 4, 8, 12], [2, 8, 10]),
                                              (2.0, [5], [1, 4, 4]), (29.97, list(range(0, 640, 20)), [16, 6, 8])])
def test_video_text_equals_transformers_qwen3_processor(dense, fps, indices, grid):
    """Parity with transformers' own Qwen3VLProcessor.replace_video_token (its video path needs torchvision, so its
    method runs on a stand-in `self`): the same times (indices / fps, averaged per temporal patch) and spans."""
    import types

    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor as Stock
    from transformers.video_utils import VideoMetadata

    _, processor, _ = dense
    stand_in = types.SimpleNamespace(video_processor=types.SimpleNamespace(merge_size=2, temporal_patch_size=2),
                                     vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>",
                                     video_token="<|video_pad|>")
    stand_in._calculate_timestamps = types.MethodType(Stock._calculate_timestamps, stand_in)
    md = VideoMetadata(total_num_frames=max(indices) + 1, fps=fps, frames_indices=list(indices))
    want = Stock.replace_video_token(stand_in, {"video_grid_thw": torch.tensor([grid]), "video_metadata": [md]}, 0)
    assert processor.video_placeholder(grid, [i / fps for i in indices]) == want
