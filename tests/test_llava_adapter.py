"""LLaVA-OneVision / LLaVA-NeXT-Video adapter, tiny presets and loading (CPU).

The cell-order test paints each cell of each frame of a clip in its own colour and turns the
vision tower + projector into a colour reader, so the language model's input embedding at
`cell_pos[k][i]` must carry the colour of cell i of frame k: the processor, the tower's patch
order, the feature packing (image_newline), LLaVA-NeXT-Video's per-frame pooling and the
placement of features into the sequence are all the model's own code.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from data.labels import point_cells  # noqa: E402
from model.llava import LlavaAdapter  # noqa: E402
from model.llava_tokenizer import IMAGE_TOKEN, VIDEO_TOKEN, build_tokenizer, config_token_ids  # noqa: E402
from model.loading import (ModelLoadError, build_model_and_processor, build_preset_processor,  # noqa: E402
                           save_preset_checkpoint)
from model.presets import get_preset  # noqa: E402
from model.qwen import PROMPT  # noqa: E402
from model.wrapper import GaspConfig, GaspVLM  # noqa: E402

TINY = ("tiny-llava-ov", "tiny-llava-next-video")
S, SIDE, N = 118, 8, 64  # tiny tower input, patches a side, cells a view


@pytest.fixture(scope="module", params=TINY)
def tiny(request):
    """(name, model, processor, adapter) of a tiny LLaVA preset."""
    model, processor, adapter = build_model_and_processor(request.param)
    return request.param, model, processor, adapter


def _views(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for H, W in ((240, 320), (320, 240), (100, 150))]


def _cell_colours(n: int) -> np.ndarray:
    """(n + 1, 3) uint8, pairwise distinct; the last one paints the margin no cell covers."""
    i = np.arange(n + 1)
    return np.stack([20 + 3 * i, 250 - 3 * i, (i * 53) % 256], axis=1).astype(np.uint8)


def _painted(grid, stored: tuple[int, int]) -> np.ndarray:
    """A stored (W, H) view whose pixels carry the colour of the resized cell they map to
    (DESIGN §3 resize rule, §5 cell rule); pixels that map to no cell get the margin colour."""
    W, H = stored
    sx, sy = grid.size[0] / W, grid.size[1] / H
    col = np.floor((np.arange(W) + 0.5) * sx / grid.cell_px).astype(int)  # (W,) cell column of u
    row = np.floor((np.arange(H) + 0.5) * sy / grid.cell_px).astype(int)  # (H,)
    inside = (row[:, None] < grid.rows) & (col[None, :] < grid.cols)  # (H, W)
    index = np.where(inside, row[:, None] * grid.cols + col[None, :], grid.n_cells)  # (H, W)
    return _cell_colours(grid.n_cells)[index]  # (H, W, 3)


def _centres(pixels: torch.Tensor, processor, patch: int) -> np.ndarray:
    """Normalised (3, S, S) -> RGB 0-255 of each patch's centre pixel, (side * side, 3) row-major."""
    ip = processor.image_processor
    mean, std = torch.tensor(ip.image_mean).view(3, 1, 1), torch.tensor(ip.image_std).view(3, 1, 1)
    rgb = (pixels * std + mean) * 255.0  # (3, S, S)
    c = torch.arange(0, (pixels.shape[-1] // patch) * patch, patch) + patch // 2
    return rgb[:, c][:, :, c].permute(1, 2, 0).reshape(-1, 3).numpy()


def _colour_reader(model: nn.Module, patch: int) -> None:
    """Make tower + projector map a patch to (normalised RGB of its centre pixel, 0, ...).

    Patch embedding: the centre pixel's RGB in channels 0-2; no position embedding (nor class
    embedding); every encoder layer the identity (residual only); CLIP's pre-encoder layer
    norm replaced by the identity; projector: linear -> gelu -> linear on channels 0-2, shifted
    by +10 / -10 so that gelu is the identity there (gelu(x + 10) = x + 10 in float32).
    """
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    emb = tower.embeddings
    with torch.no_grad():
        for p in emb.parameters():
            p.zero_()
        for c in range(3):
            emb.patch_embedding.weight[c, c, patch // 2, patch // 2] = 1.0
        for layer in tower.encoder.layers:
            for mod in (layer.self_attn.out_proj, layer.mlp.fc2):
                for p in mod.parameters():
                    p.zero_()
        proj = model.model.multi_modal_projector
        for lin, shift in ((proj.linear_1, 10.0), (proj.linear_2, -10.0)):
            lin.weight.zero_()
            lin.bias.zero_()
            for c in range(3):
                lin.weight[c, c] = 1.0
                lin.bias[c] = shift
    if hasattr(tower, "pre_layrnorm"):
        tower.pre_layrnorm = nn.Identity()


def _lm_inputs_embeds(model: nn.Module, inputs: dict) -> torch.Tensor:
    """The (B, S, D) embeddings the language model receives (after the image features are placed)."""
    seen = {}

    def grab(module, args, kwargs):
        seen["x"] = kwargs["inputs_embeds"].detach().clone()

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model.model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return seen["x"]


def _cells(name: str) -> int:
    """Cells a view: OneVision 8 x 8 patches of 14 px; NeXT-Video its pooled 4 x 4 grid of 28 px."""
    return N if name == "tiny-llava-ov" else (SIDE // 2) ** 2


def _palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours, pairwise distinct by at least 30 grey levels in some channel."""
    i = np.arange(n)
    assert n <= 343
    return np.stack([20 + 30 * (i % 7), 20 + 30 * ((i // 7) % 7), 20 + 30 * (i // 49)], axis=1).astype(np.uint8)


def _painted_ids(grid, stored: tuple[int, int], first: int, margin: int) -> np.ndarray:
    """A stored (W, H) view whose pixels carry palette colour first + (the resized cell they map to)
    (DESIGN §3 resize rule, §5 cell rule); pixels that map to no cell get palette colour `margin`."""
    W, H = stored
    sx, sy = grid.size[0] / W, grid.size[1] / H
    col = np.floor((np.arange(W) + 0.5) * sx / grid.cell_px).astype(int)  # (W,) cell column of u
    row = np.floor((np.arange(H) + 0.5) * sy / grid.cell_px).astype(int)  # (H,)
    inside = (row[:, None] < grid.rows) & (col[None, :] < grid.cols)  # (H, W)
    index = np.where(inside, first + row[:, None] * grid.cols + col[None, :], margin)  # (H, W)
    return _palette(margin + 1)[index]  # (H, W, 3)


# ------------------------------------------------------------------------ (a) forward

def test_forward_all_layers_on_a_collated_batch(tiny):
    name, model, processor, adapter = tiny
    a, b, c = _views()
    items = [adapter.encode_clip([a, b, c]), adapter.encode_clip([c, a])]
    batch = adapter.collate(items)
    cfg = model.config.text_config
    B, L = batch["input_ids"].shape
    n = _cells(name)
    assert B == 2 and [[len(p) for p in clip] for clip in batch["cell_pos"]] == [[n] * 3, [n] * 2]
    if name == "tiny-llava-ov":  # the multi-image path: one base patch per frame, no crops
        assert batch["pixel_values"].shape == (5, 1, 3, S, S) and batch["image_sizes"].tolist() == [[S, S]] * 5
        assert batch["batch_num_images"].tolist() == [3, 2]
    else:  # one 1-frame video per frame (the tower and the pooling are per frame), any K per clip
        assert batch["pixel_values_videos"].shape == (5, 1, 3, S, S)
    # the media inputs a batch holds go in (model_input_names lists images and videos; a clip batch has one kind)
    clip_media = {"pixel_values", "image_sizes", "batch_num_images"} if name == "tiny-llava-ov" else \
        {"pixel_values_videos"}
    assert set(adapter.model_inputs(batch)) == {"input_ids", "attention_mask"} | clip_media

    with torch.no_grad():
        out = model(**adapter.model_inputs(batch), output_hidden_states=True)
    assert len(out.hidden_states) == cfg.num_hidden_layers + 1
    for h in out.hidden_states:
        assert h.shape == (B, L, cfg.hidden_size) and torch.isfinite(h).all()
    # each clip's frames land in its own sequence: the second sample equals the sample alone
    with torch.no_grad():
        ref = model(**adapter.model_inputs(adapter.collate(items[1:])), output_hidden_states=True)
    m = len(items[1]["input_ids"])
    for h, r in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(h[1, :m], r[0], rtol=1e-4, atol=1e-4)


def test_prompt_text_and_token_layout(tiny):
    name, _, processor, adapter = tiny
    item = adapter.encode_clip(_views())
    ids = item["input_ids"]
    T = adapter.tokens_per_image
    if name == "tiny-llava-ov":
        assert adapter.text == f"<|im_start|>user\n{IMAGE_TOKEN}\n{IMAGE_TOKEN}\n{PROMPT}<|im_end|>\n"
        assert adapter.clip_text(3).count(IMAGE_TOKEN) == 3 and "3 views of the same scene." in adapter.clip_text(3)
        nl = processor.tokenizer.convert_tokens_to_ids("Ċ")  # byte-level "\n"
        image = ids == adapter.image_token_id
        assert T == N + 1 and int(image.sum()) == 3 * T  # base grid + one newline per image
        for cell_pos in item["cell_pos"]:
            assert torch.equal(cell_pos, torch.arange(N) + cell_pos[0])  # the first N tokens of the run
            assert ids[cell_pos[0] - 1] == nl and image[cell_pos].all()
            end = cell_pos[0] + T  # one past the image's run
            assert image[cell_pos[-1] + 1:end].all() and ids[end] == nl
        assert item["cell_pos"][1][0] == item["cell_pos"][0][0] + T + 1
    else:
        assert adapter.text == f"<|im_start|>user\n{VIDEO_TOKEN}\n{PROMPT}<|im_end|>\n"
        video = ids == adapter.video_token_id
        assert T == 16 and int(video.sum()) == 3 * 16  # one video: K pooled 4 x 4 grids, contiguous, no newline
        run = torch.nonzero(video).squeeze(1)
        assert torch.equal(run, torch.arange(48) + run[0])
        assert [p.tolist() for p in item["cell_pos"]] == [list(range(int(run[0]) + 16 * k, int(run[0]) + 16 * k + 16))
                                                           for k in range(3)]


# -------------------------------------------------------------------- (b) token order

@pytest.mark.parametrize("stored", [((320, 240), (150, 100), (90, 70), (S, S))])
def test_clip_frame_and_cell_order_match_the_models_vision_tokens(tiny, stored):
    """Colour-coded cells in a K = 4 clip: the LM input at cell_pos[k][i] carries the colour of cell i of
    frame k (row-major; NeXT-Video: its pooled cell); newline tokens are not in cell_pos."""
    name = tiny[0]
    model, processor, adapter = build_model_and_processor(name)  # a fresh copy: its tower is rewired
    _colour_reader(model, adapter.patch_size)
    n = _cells(name)
    grids = [adapter.grid(sz) for sz in stored]
    margin = len(stored) * n
    frames = [_painted_ids(g, sz, k * n, margin) for k, (g, sz) in enumerate(zip(grids, stored))]
    item = adapter.encode_clip(frames)
    batch = adapter.collate([item, adapter.encode_clip(frames[::-1])])
    colours = _palette(margin + 1).astype(np.float64)

    # the margin (no cell) really is outside the tower's patches / the pooled grid
    assert grids[0].size == (S, S) and S - grids[0].cols * grids[0].cell_px == 6
    x = _lm_inputs_embeds(model, adapter.model_inputs(batch))  # (B, L, D)
    ip = processor.image_processor
    mean, std = np.asarray(ip.image_mean), np.asarray(ip.image_std)
    newline = model.model.image_newline.detach() if name == "tiny-llava-ov" else None
    for b, order in ((0, range(4)), (1, range(3, -1, -1))):
        for pos_k, k in zip(batch["cell_pos"][b], order):
            got = (x[b, pos_k, :3].double().numpy() * std + mean) * 255.0  # (n, 3)
            np.testing.assert_allclose(got, colours[k * n:(k + 1) * n], atol=1.01, err_msg=f"clip {b} frame {k}")
            assert torch.all(x[b, pos_k, 3:] == 0)  # colour tokens only
            if newline is not None:  # the token right after each base grid is the image_newline
                assert not any(torch.equal(x[b, p], newline) for p in pos_k)
                torch.testing.assert_close(x[b, pos_k[-1] + 1], newline)


def test_points_in_the_margin_have_no_cell(tiny):
    """S = 8 x 14 + 6: a point mapping to resized u' or v' >= 111.5 lies in no patch, so in no cell
    (NeXT-Video's 28 px pooled cells cover the same 112 px)."""
    name, _, _, adapter = tiny
    grid = adapter.grid((320, 240))
    side, cell = (SIDE, 14) if name == "tiny-llava-ov" else (SIDE // 2, 28)
    assert (grid.rows, grid.cols, grid.cell_px, grid.size) == (side, side, cell, (S, S))
    sx, sy = S / 320, S / 240
    resized = np.array([[0.0, 0.0], [111.4, 5.0], [111.6, 5.0], [5.0, 117.0], [20.0, 30.0]])  # (u', v')
    stored = np.stack([(resized[:, 0] + 0.5) / sx - 0.5, (resized[:, 1] + 0.5) / sy - 0.5], axis=1)
    idx, inside = point_cells(stored, (320, 240), grid)
    assert inside.tolist() == [True, True, False, False, True]
    c = int((20.0 + 0.5) // cell), int((30.0 + 0.5) // cell)
    assert idx.tolist() == [0, side - 1, -1, -1, c[1] * side + c[0]]


# ------------------------------------------------------------------ (c) the wrapper

@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("mode", ["heads", "full"])
def test_wrapper_captures_trains_and_initialises(name, mode):
    from conftest import clip_batch

    vlm, _, adapter = build_model_and_processor(name)
    g = GaspVLM(vlm, GaspConfig(trainable=mode))
    g.init_heads()
    L = vlm.config.text_config.num_hidden_layers
    assert g.num_layers == L == 4 and g.hidden_size == 64
    # SVD init (DESIGN §6)
    for l, q in enumerate(g.query_projections()):
        _, Sv, Vh = torch.linalg.svd(q.weight.detach().double(), full_matrices=False)
        d = g.head.head_dim
        W = g.head.weight[l].detach().double()
        torch.testing.assert_close(W.T @ W, Vh[:d].T @ torch.diag(Sv[:d] ** 2) @ Vh[:d] / Sv[0] ** 2,
                                   atol=1e-5, rtol=0)

    g.train()
    batch = clip_batch(adapter)
    seen = {}

    def make(l):
        def pre(mod, args):
            seen[l] = args[0].detach().clone()
        return pre

    hooks = [layer.self_attn.q_proj.register_forward_pre_hook(make(l)) for l, layer in enumerate(g.layers)]
    try:
        loss, parts, _, feats = g(batch, adapter.model_inputs(batch), return_features=True)
    finally:
        for h in hooks:
            h.remove()
    assert feats.shape == (L, 5, _cells(name), 64)
    for l in range(L):
        for f in range(5):
            assert torch.equal(feats[l, f].detach(), seen[l][int(batch["frame_clip"][f]), batch["cell_pos"][f]])
    assert torch.isfinite(loss) and parts["n_ab"] == 14 and parts["n_ba"] == 11
    loss.backward()
    got = {n for n, p in g.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "head.weight" in got
    assert not any(k in n for n in got for k in ("vision_tower", "multi_modal_projector", "image_newline"))
    lm = {n for n in got if "language_model.layers" in n}
    if mode == "heads":
        assert got == {"head.weight"}
    else:
        assert any("layers.0.self_attn.q_proj.weight" in n for n in lm)
        assert any("layers.2.mlp" in n for n in lm)
        assert {n.split("layers.3.")[1] for n in lm if "layers.3." in n} == {"input_layernorm.weight"}


# ---------------------------------------------------- (d) presets, tokenizer, loading

def test_tokenizer_and_presets_agree():
    tok = build_tokenizer()
    ids = config_token_ids()
    for name in TINY + ("llava-onevision-qwen2-7b", "llava-next-video-7b"):
        cfg = get_preset(name).config()
        assert cfg.image_token_id == ids["image_token_id"] == tok.convert_tokens_to_ids(IMAGE_TOKEN)
        assert cfg.video_token_id == ids["video_token_id"] == tok.convert_tokens_to_ids(VIDEO_TOKEN)
        assert cfg.text_config.pad_token_id == tok.pad_token_id and cfg.text_config.eos_token_id == tok.eos_token_id
    assert tok(f"{IMAGE_TOKEN}{VIDEO_TOKEN}").input_ids == [ids["image_token_id"], ids["video_token_id"]]
    big = get_preset("llava-onevision-qwen2-7b").config()
    assert (big.text_config.hidden_size, big.text_config.num_hidden_layers, big.text_config.vocab_size) == \
        (3584, 28, 152128)
    assert (big.vision_config.image_size, big.vision_config.patch_size, big.vision_config.num_hidden_layers,
            big.vision_feature_select_strategy) == (384, 14, 26, "full")
    assert 7.9e9 < get_preset("llava-onevision-qwen2-7b").n_params() < 8.1e9  # LLaVA-OneVision-7B: 8.03B


def test_real_size_processor_gives_27x27_cells():
    """The 7B preset's processor: 384 px views, 27 x 27 cells of 14 px, 729 + 1 tokens an image."""
    preset = get_preset("llava-onevision-qwen2-7b")
    adapter = LlavaAdapter(build_preset_processor(preset), preset.config())
    grid = adapter.grid((1920, 1080))
    assert (grid.size, grid.cell_px, grid.rows, grid.cols) == ((384, 384), 14, 27, 27)
    item = adapter.encode_clip(_views()[:2])
    assert item["pixel_values"].shape == (2, 1, 3, 384, 384) and adapter.tokens_per_image == 730
    assert [len(p) for p in item["cell_pos"]] == [729, 729]


@pytest.mark.parametrize("name", TINY)
def test_saved_checkpoint_loads_with_identical_logits(tmp_path, name):
    path = save_preset_checkpoint(name, tmp_path / name)
    assert json.loads((path / "config.json").read_text())["model_type"] == get_preset(name).family
    assert json.loads((path / "processor_config.json").read_text())["processor_class"] in (
        "LlavaOnevisionProcessor", "LlavaNextVideoProcessor")
    m1, _, a1 = build_model_and_processor(name)
    m2, _, a2 = build_model_and_processor(str(path))
    assert type(m1) is type(m2) and a2.family == a1.family and a2.text == a1.text
    assert a2.tokens_per_image == a1.tokens_per_image
    a, b, c = _views(1)
    batch1 = a1.collate([a1.encode_clip([a, b, c]), a1.encode_clip([c, a])])
    batch2 = a2.collate([a2.encode_clip([a, b, c]), a2.encode_clip([c, a])])
    for k in a1.model_inputs(batch1):  # the inputs this batch holds
        assert torch.equal(batch1[k], batch2[k]), k
    assert all(torch.equal(x, y) for c1, c2 in zip(batch1["cell_pos"], batch2["cell_pos"]) for x, y in zip(c1, c2))
    with torch.no_grad():
        assert torch.equal(m1(**a1.model_inputs(batch1)).logits, m2(**a2.model_inputs(batch2)).logits)


def test_a_checkpoint_whose_feature_strategy_breaks_the_grid_fails_in_one_line(tmp_path):
    """SigLIP has no CLS token: 'default' would drop cell 0, so loading refuses it."""
    path = save_preset_checkpoint("tiny-llava-ov", tmp_path / "ov")
    cfg = json.loads((path / "config.json").read_text())
    cfg["vision_feature_select_strategy"] = "default"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as err:
        build_model_and_processor(str(path))
    msg = str(err.value)
    assert "\n" not in msg and "vision_feature_select_strategy" in msg and str(path) in msg


@pytest.mark.parametrize("name", TINY)
def test_capture_with_lm_input_prepends_the_projector_output_at_each_cell(name):
    """The probe's projector row (`--projector-row`): capture(lm_input=True) returns the LM's input
    (inputs_embeds, the projector's output as the LM receives it) at every frame's cells first, then
    the same per-layer features as without it; match() scores it as a third item."""
    from conftest import clip_batch

    vlm, _, adapter = build_model_and_processor(name)
    g = GaspVLM(vlm, GaspConfig(trainable="heads"))
    g.init_heads()
    g.eval()
    batch = clip_batch(adapter)
    inputs = adapter.model_inputs(batch)
    x = _lm_inputs_embeds(vlm, inputs)  # (B, S, D)
    with torch.no_grad():
        plain = g.capture(batch, inputs)
        both = g.capture(batch, inputs, lm_input=True)
    assert both.shape == (1 + plain.shape[0],) + tuple(plain.shape[1:])
    torch.testing.assert_close(both[1:], plain, atol=0, rtol=0)
    for f in range(both.shape[1]):
        assert torch.equal(both[0, f], x[int(batch["frame_clip"][f]), batch["cell_pos"][f]])
    # layer 0 reads RMSNorm(inputs_embeds): not the same features as the row before it
    assert not torch.allclose(both[0], both[1])
    head, raw, proj = g.match(batch, inputs, lm_input=True)
    head2, raw2 = g.match(batch, inputs)
    assert proj is not None and raw is not None and head is not None
    torch.testing.assert_close(raw.dist, raw2.dist, atol=0, rtol=0)
    torch.testing.assert_close(head.dist, head2.dist, atol=0, rtol=0)
    assert proj.dist.shape == (1, raw.dist.shape[1])  # one row, the same anchors
    torch.testing.assert_close(proj.chance0, raw.chance0, atol=0, rtol=0)
