"""Qwen3-VL joint training (issue [7 of 12], DESIGN §5, §6): LM labels from its chat template (no default
system turn) for images, a video with its `<t seconds>` texts and text only; L_LM equal to the model's own
`labels=` loss; M-RoPE positions and DeepStack in a batch that mixes image, video and text-only rows; the
ZeRO-3 vision dummy beside DeepStack; a Thinking template refused; 2-rank ZeRO-3 joint training through
launch/train.py and a joint step equal to one process on the union batch (tiny-qwen3-vl and -moe)."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from conftest import ROOT, ZERO3_JSON, Launch, read_jsonl
from test_joint import CASES, _frames, check_answer_labels

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY3 = ("tiny-qwen3-vl", "tiny-qwen3-vl-moe")
WORKER_JOINT = os.path.join(ROOT, "tests", "train_worker_joint.py")


@pytest.fixture(scope="module", params=TINY3)
def tiny3(request):
    """(name, model, processor, adapter) of a tiny Qwen3-VL preset (dense and MoE)."""
    from model.loading import build_model_and_processor

    model, processor, adapter = build_model_and_processor(request.param)
    model.eval()
    return request.param, model, processor, adapter


def _encode(adapter, case, **kw):
    media, n, conv = CASES[case]
    return adapter.encode_conversation(_frames(n), media, conv, [0.25 * i for i in range(n)], video_frames=4, **kw)


def _inputs(vlm, adapter, batch):
    from model.qwen import rope_position_ids

    inputs = adapter.model_inputs(batch)
    pos = rope_position_ids(vlm, inputs)
    if pos is not None:
        inputs["position_ids"] = pos
    return inputs


def _gasp(vlm, **kw):
    from model.wrapper import GaspConfig, GaspVLM

    cfg = dict(trainable="full", lambda_lm=1.0, lambda_corr=0.0, lambda_depth=0.0, head_dim=8)
    return GaspVLM(vlm, GaspConfig(**{**cfg, **kw}))


def _unhook(model):
    for h in model._hooks:
        h.remove()


# ------------------------------------------------------------------------- labels

@pytest.mark.parametrize("case", list(CASES))
def test_lm_loss_of_one_sample_equals_the_models_own_labels_loss(tiny3, case):
    """L_LM of one sample (the wrapper's LM head on the labelled positions only) equals the model's own
    `labels=` loss to 1e-5: one image, two images (multi-turn), a video with its timestamps, text only."""
    from data.stream import PreparedConversation, collate_clips

    _, vlm, _, adapter = tiny3
    model = _gasp(vlm)
    try:
        batch = collate_clips([PreparedConversation("k", "x", _encode(adapter, case))], adapter)
        inputs = _inputs(vlm, adapter, batch)
        assert "second_per_grid_ts" not in inputs  # Qwen3-VL's timing is text, not a tensor
        with torch.no_grad():
            want = vlm(**inputs, labels=batch["labels"]).loss
            got, parts = model(batch, inputs)
        assert parts["n_lm"] == int((batch["labels"][:, 1:] != -100).sum()) > 0
        assert abs(float(got) - float(want)) < 1e-5, (float(got), float(want))
    finally:
        _unhook(model)


@pytest.mark.parametrize("case", ["images", "video"])
def test_labelled_positions_brute_force(tiny3, case):
    """Multi-turn conversations with images and with a video: the labelled positions are exactly each assistant
    turn's content + <|im_end|>, found independently by tokenizing the answers (a label equals the token at its
    position), and nothing else: no user / system turn, no header, no newline after the end token, no media
    token, no timestamp text. No system turn is added when the conversation has none."""
    _, _, proc, adapter = tiny3
    tok = proc.tokenizer
    item = _encode(adapter, case)
    ids, labels = item["input_ids"], item["labels"]
    text = tok.decode(ids)
    has_system = any(t["from"] == "system" for t in CASES[case][2])
    assert text.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n" if has_system else "<|im_start|>user\n")
    assert text.count("<|im_start|>system") == int(has_system)
    check_answer_labels(tok, adapter, ids, labels, [t["value"] for t in CASES[case][2] if t["from"] == "gpt"])


def test_video_conversation_carries_its_frame_times(tiny3):
    """The video of a conversation reaches the model as Qwen3-VL's video input: its kept frames (4 of 6, spread
    uniformly) in temporal patches of two, each patch `<t seconds>` (the mean time of its two frames) + its own
    vision span, exactly the processor's `video_placeholder`, inside the user turn; stored without frame times,
    the kept frames count 1 s apart."""
    _, _, proc, adapter = tiny3
    tok = proc.tokenizer
    media, n, conv = CASES["video"]
    frames = _frames(n)
    times = [0.0, 0.4, 1.0, 1.2, 2.0, 2.6]  # resample(6, 4) keeps frames 0, 2, 3, 5
    item = adapter.encode_conversation(frames, media, conv, times, video_frames=4)
    assert item["video_grid_thw"].tolist() == [[2, 4, 4]]  # 80x60 -> 64x64 px: 2 x 2 cells a frame
    assert "pixel_values" not in item and "second_per_grid_ts" not in item
    text = tok.decode(item["input_ids"])
    video = proc.video_placeholder([2, 4, 4], [0.0, 1.0, 1.2, 2.6])
    cells = "<|video_pad|>" * 4
    assert video == (f"<0.5 seconds><|vision_start|>{cells}<|vision_end|>"
                     f"<1.9 seconds><|vision_start|>{cells}<|vision_end|>")
    assert text.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n" + video +
                           "What does the camera pass?<|im_end|>\n<|im_start|>assistant\nA table and a lamp.")
    assert torch.equal(item["mm_token_type_ids"], (item["input_ids"] == adapter.video_token_id).long() * 2)
    untimed = adapter.encode_conversation(frames, media, conv, [], video_frames=4)
    assert proc.video_placeholder([2, 4, 4], [0.0, 1.0, 2.0, 3.0]) in tok.decode(untimed["input_ids"])
    assert torch.equal(untimed["labels"][untimed["labels"] != -100], item["labels"][item["labels"] != -100])


# ------------------------------------------------------- mixed batches: M-RoPE, DeepStack, dummies

def _mixed(adapter) -> list:
    """A 3-frame clip (no anchors: a valid sample) and conversations with images, a video and no media."""
    from data.labels import ClipLabels
    from data.stream import PreparedClip, PreparedConversation

    rng = np.random.default_rng(5)
    frames = [rng.integers(0, 255, (90, 120, 3), dtype=np.uint8) for _ in range(3)]
    grids = [adapter.grid((f.shape[1], f.shape[0])) for f in frames]
    labels = ClipLabels([(g.rows, g.cols) for g in grids], [np.ones(g.n_cells, np.float32) for g in grids],
                        [np.ones(g.n_cells, bool) for g in grids], [])
    clip = PreparedClip("clip", "synthetic", adapter.encode_clip(frames), labels)
    return [clip] + [PreparedConversation(c, "x", _encode(adapter, c)) for c in ("images", "video", "text")]


def test_mixed_batch_positions_and_deepstack_equal_each_row_alone(tiny3):
    """One right-padded batch of a clip and image, video and text-only conversations: each row's CPU-side M-RoPE
    ids equal the model's own for that row alone; the LM sums and counts equal the sums over the rows alone,
    and the clip's captured features (every layer's q_proj input, DeepStack layers included) equal the clip's
    alone, so the image and the video DeepStack features reach their own rows' vision positions only."""
    from data.stream import collate_clips
    from model.qwen import rope_position_ids

    _, vlm, _, adapter = tiny3
    items = _mixed(adapter)
    batch = collate_clips(items, adapter)
    inputs = adapter.model_inputs(batch)
    assert {"pixel_values", "pixel_values_videos"} <= set(inputs) and "second_per_grid_ts" not in inputs
    pos = rope_position_ids(vlm, inputs)  # (3, B, S)
    for b, it in enumerate(items):
        n = it.n_tokens
        alone = rope_position_ids(vlm, adapter.model_inputs(collate_clips([it], adapter)))
        alone = torch.arange(n).expand(3, 1, n) if alone is None else alone  # text only: plain positions
        assert torch.equal(pos[:, b, :n], alone[:, 0]), it.key
    vid = torch.nonzero(batch["input_ids"][2] == adapter.video_token_id).squeeze(1)
    assert len(set(pos[0, 2, vid].tolist())) == 2  # one temporal position per temporal patch

    model = _gasp(vlm)
    try:
        with torch.no_grad():
            _, parts, _, feats = model(batch, _inputs(vlm, adapter, batch), return_features=True)
            rows = []
            for it in items:
                one = collate_clips([it], adapter)
                rows.append(model(one, _inputs(vlm, adapter, one), return_features=True))
        assert parts["n_lm"] == sum(r[1]["n_lm"] for r in rows) > 0
        assert parts["lm_sum"] == pytest.approx(sum(r[1]["lm_sum"] for r in rows), rel=1e-5)
        clip_feats = rows[0][3]  # (L, 3, N, D)
        assert feats.shape == clip_feats.shape and feats.shape[1] == 3
        torch.testing.assert_close(feats, clip_feats, rtol=1e-4, atol=1e-5)
    finally:
        _unhook(model)


def test_vision_dummy_leaves_deepstack_loss_and_gradients_unchanged(tiny3):
    """The ZeRO-3 dummy (the tower on its smallest real input, run right after the token embedding, its output
    times zero): on a text-only batch and on a batch with images (where another rank also runs a video) the loss,
    the captured features and every gradient equal those without it, and with the tower trainable every tower
    parameter, DeepStack mergers included, gets a gradient (zero on the text-only batch) so no rank skips one."""
    from data.stream import PreparedConversation, collate_clips

    _, vlm, _, adapter = tiny3
    name, kwargs = adapter.dummy_vision_inputs()
    assert name == "get_image_features" and kwargs["pixel_values"].shape == (4, 3 * 2 * 16 * 16)
    model = _gasp(vlm, freeze_vision=False)
    visual = {n: p for n, p in model.named_parameters() if ".visual." in n}
    assert any("deepstack_merger_list" in n for n in visual) and all(p.requires_grad for p in visual.values())
    try:
        for case, dummies in (("text", 2), ("images", 1)):
            batch = collate_clips([PreparedConversation("k", "x", _encode(adapter, case))], adapter)
            out = []
            for n_dummy in (0, dummies):
                model.zero_grad(set_to_none=True)
                loss, _, _, feats = model(batch, _inputs(vlm, adapter, batch), return_features=True,
                                          vision_dummies=[(name, kwargs)] * n_dummy)
                loss.backward()
                out.append((loss.detach(), {n: (None if p.grad is None else p.grad.clone())
                                            for n, p in model.named_parameters() if p.requires_grad}))
            (l0, g0), (l1, g1) = out
            assert torch.equal(l0, l1), case
            for n, g in g1.items():
                if g is None:
                    assert n.startswith("head.") and g0[n] is None, f"{case}: {n} got no gradient with the dummy"
                elif g0[n] is None:
                    assert n in visual and not g.any(), n  # only the dummy reached it, times zero
                else:
                    torch.testing.assert_close(g, g0[n], rtol=0, atol=0, msg=f"{case}: {n}")
            if case == "images":
                assert any(g0[n] is not None and g0[n].any() for n in visual if "deepstack" in n)
    finally:
        _unhook(model)


# ------------------------------------------------------------------ a Thinking checkpoint's template

THINKING_TEMPLATE = (
    "{% set ns = namespace(last_user=-1) %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' and loop.index0 > ns.last_user %}"
    "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}"
)
"""The structure of a Qwen3 Thinking template as it bears on labels (written for this test): the answer after the
last user turn opens with a `<think>` block, earlier answers lose theirs, the generation prompt opens one."""


def test_thinking_template_refuses_conversations_in_one_line_and_clips_still_encode(tiny3):
    import copy

    from data.chat import ConversationError
    from model.qwen3 import Qwen3Adapter

    name, _, processor, adapter = tiny3
    assert not adapter.thinking_template
    thinking = copy.copy(processor)
    thinking.chat_template = THINKING_TEMPLATE
    ad = Qwen3Adapter(thinking, family=adapter.family)
    assert ad.thinking_template
    for case in ("image1", "video", "text"):
        with pytest.raises(ConversationError) as e:
            _encode(ad, case)
        assert e.value.reason == "template" and "\n" not in str(e.value) and "Instruct" in str(e.value)
    # why: data/chat.py's spans on such a template would label the think scaffolding of a one-turn answer and
    # cannot place a multi-turn conversation's (its text is not the concatenation of its turns)
    from data.chat import assistant_spans, to_messages

    text, spans = assistant_spans(ad.render_chat, to_messages(CASES["image1"][2], 1))
    assert text[spans[0][0]:spans[0][1]] == "\n</think>\n\nRed.<|im_end|>"
    with pytest.raises(ConversationError, match="incrementally"):
        assistant_spans(ad.render_chat, to_messages(CASES["images"][2], 2))
    item = ad.encode_clip(_frames(2, size=(64, 64)))
    assert [len(p) for p in item["cell_pos"]] == [4, 4]


# ----------------------------------------------------------------------------- launch/train.py recipes

def test_train_presets_name_model_presets_and_qwen3_vl_gets_the_gpu_recipe():
    """Every launch/config.py preset parses and names a model preset of its own name; qwen3-vl-4b / -8b get the
    GPU recipe of qwen2.5-vl-7b (bf16 where available, LoRA + heads, activation checkpointing), tiny-qwen3-vl the
    tiny one."""
    from launch import train
    from launch.config import PRESETS
    from model.presets import PRESETS as MODEL_PRESETS

    for name in PRESETS:
        cfg, _ = train.parse_config(["--preset", name])
        assert cfg.model.preset == name and name in MODEL_PRESETS
    gpu, _ = train.parse_config(["--preset", "qwen2.5-vl-7b"])
    tiny, _ = train.parse_config(["--preset", "tiny"])
    for name, ref in (("qwen3-vl-4b", gpu), ("qwen3-vl-8b", gpu), ("tiny-qwen3-vl", tiny)):
        cfg, _ = train.parse_config(["--preset", name])
        assert (cfg.data, cfg.optim, cfg.loss) == (ref.data, ref.optim, ref.loss), name
        assert cfg.model == dataclasses.replace(ref.model, preset=name), name
    assert (gpu.model.trainable, gpu.model.gradient_checkpointing, gpu.model.precision) == ("lora", True, "auto")


# ----------------------------------------------------------------------------- ZeRO-3, 2 ranks

@pytest.mark.slow
@pytest.mark.parametrize("preset,trainable", [("tiny-qwen3-vl", "full"), ("tiny-qwen3-vl-moe", "lora")])
def test_joint_training_on_two_zero3_ranks(tiny_shards, tiny_instruct_shards, tmp_path, preset, trainable):
    """launch/train.py, 2 ZeRO-3 ranks, clips and conversations (images, videos with their frame times, text
    only) mixed 1:1, L_LM beside the geometry losses: every step trains on both kinds (anchors and LM
    tokens), nothing is skipped, and the run ends with its LM-retention validation and export."""
    out = tmp_path / "run"
    run = Launch(["--ds_config", ZERO3_JSON, "--preset", preset, "--shards", tiny_shards + ":1",
                  tiny_instruct_shards + ":1", "--lambda-lm", "1", "--trainable", trainable, "--steps", "3",
                  "--batch-size", "2", "--video-frames", "4", "--val-every", "0", "--val-batches", "1",
                  "--num-workers", "0", "--no-mlflow", "--output-dir", str(out)], str(tmp_path / "train.log"),
                 cwd=str(tmp_path))
    assert run.wait(timeout=900) == 0, run.tail()
    log = read_jsonl(str(out / "train_log.jsonl"))
    assert [r["step"] for r in log] == [1, 2, 3] and not any(r["skipped"] for r in log)
    for r in log:
        assert r["anchors"] > 0 and r["lm_tokens"] > 0 and r["lm"] > 0 and r["grad_norm"] > 0, r
        assert r["bad_samples"] == 0
        per_source = [v for k, v in r.items() if k.startswith("samples/")]
        assert len(per_source) == 2 and all(v > 0 for v in per_source), r
    meta = json.load(open(out / "export" / "export.json"))
    assert meta["step"] == 3 and meta["trainable"] == trainable


@pytest.mark.slow
@pytest.mark.parametrize("preset", TINY3)
def test_zero3_joint_step_equals_one_process_on_the_union(tiny_shards, tiny_instruct_shards, tmp_path, preset):
    """tests/train_worker_joint.py on Qwen3-VL: two ZeRO-3 ranks x GAS 2, L_LM + L_corr + L_depth, one rank's
    micro-batches without clips and the other's without conversations, a text-only micro-batch (a vision dummy
    beside DeepStack) and unequal tower calls: counts, loss, gradients and SGD updates equal one process on each
    step's union batch (as tests/test_joint.py checks for the tiny Qwen2-VL)."""
    import sys

    from data.stream import collate_clips
    from model.loading import build_model_and_processor
    from model.wrapper import GaspConfig, GaspVLM

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import train_worker_joint as W

    out = str(tmp_path / "out")
    launch = Launch(["--clips", tiny_shards, "--sft", tiny_instruct_shards, "--out", out, "--preset", preset],
                    str(tmp_path / "log.txt"), cwd=str(tmp_path), script=WORKER_JOINT)
    assert launch.wait(timeout=900) == 0, launch.tail()
    res = torch.load(os.path.join(out, "result.pt"), weights_only=False)
    assert res["steps"][1]["vision_calls"] == [1, 2]  # rank 0 ran a dummy in both micro-batches of step 2

    vlm, _, adapter = build_model_and_processor(preset)
    model = GaspVLM(vlm, GaspConfig(trainable="full", head="mlp", lambda_lm=0.7, lambda_corr=1.0, lambda_depth=0.5))
    params = dict(model.named_parameters())
    assert sorted(params) == sorted(res["init"])
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(res["init"][n])
    trainable = res["trainable"]
    assert sorted(trainable) == sorted(n for n, p in params.items() if p.requires_grad)
    items = W.prepared_items(tiny_shards, tiny_instruct_shards, adapter)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    def flat(d):
        return torch.cat([d[n].flatten() for n in trainable])

    try:
        for s, step in enumerate(res["steps"]):
            union = collate_clips([it for per_rank in W.PLAN[s] for mb in W.micro_batches(items, per_rank)
                                   for it in mb], adapter)
            model.zero_grad(set_to_none=True)
            loss, parts = model(union, _inputs(vlm, adapter, union))
            loss.backward()
            assert [parts["n_ab"], parts["n_ba"], parts["n_depth"], parts["n_lm"]] == step["counts"]
            assert step["counts"][0] > 0 and step["counts"][3] > 0
            assert step["loss"] == pytest.approx(loss.item(), rel=1e-5)
            g_ref, g_ds = flat({n: params[n].grad for n in trainable}), flat(step["grads"])
            assert rel(g_ds, g_ref) < 1e-5, f"step {s + 1}: ZeRO-3 gradient differs by {rel(g_ds, g_ref):.2e}"
            with torch.no_grad():
                before = flat(params).clone()
                for n in trainable:
                    params[n].sub_(step["lr"][0 if n.startswith("head.") else -1] * params[n].grad)
                d_ref, d_ds = flat(params) - before, flat(step["after"]) - before
            assert rel(d_ds, d_ref) < 1e-5, f"step {s + 1}: update differs by {rel(d_ds, d_ref):.2e}"
    finally:
        _unhook(model)
