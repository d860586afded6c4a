"""Joint training (issue [6 of 12], DESIGN §5, §6): LM labels from each family's chat template, L_LM
equal to the model's own `labels=` loss, the mixed stream (weights, token packing, resume), the joint
total over global counts, and a 2-rank ZeRO-3 joint step equal to one process on the union batch."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import ROOT, ZERO3_JSON, Launch

FAMILIES = ["tiny", "tiny-qwen2.5", "tiny-llava-ov", "tiny-llava-next-video"]
WORKER_JOINT = os.path.join(ROOT, "tests", "train_worker_joint.py")

MULTI_TURN_IMAGE = [
    {"from": "human", "value": "<image>\n<image>\nWhich view shows the red box?"},
    {"from": "gpt", "value": "The first one, on the left."},
    {"from": "human", "value": "And how many chairs are there?"},
    {"from": "gpt", "value": "Two chairs."},
]
MULTI_TURN_VIDEO = [
    {"from": "system", "value": "Answer briefly."},
    {"from": "human", "value": "<video>\nWhat does the camera pass?"},
    {"from": "gpt", "value": "A table and a lamp."},
    {"from": "human", "value": "Which comes first?"},
    {"from": "gpt", "value": "The table."},
]
TEXT_ONLY = [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello there!"}]


def _frames(n: int, seed: int = 0, size=(60, 80)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (*size, 3), dtype=np.uint8) for _ in range(n)]


ONE_IMAGE = [{"from": "human", "value": "<image>\nWhat colour is the box?"}, {"from": "gpt", "value": "Red."}]
CASES = {"image1": ("image", 1, ONE_IMAGE), "images": ("image", 2, MULTI_TURN_IMAGE),
         "video": ("video", 6, MULTI_TURN_VIDEO), "text": ("none", 0, TEXT_ONLY)}


@pytest.fixture(scope="module")
def family_models():
    from model.loading import build_model_and_processor

    return {name: build_model_and_processor(name) for name in FAMILIES}


def _encode(adapter, case):
    media, n, conv = CASES[case]
    return adapter.encode_conversation(_frames(n), media, conv, [0.25 * i for i in range(n)], video_frames=4)


def _inputs(vlm, adapter, batch):
    from model.qwen import rope_position_ids

    inputs = adapter.model_inputs(batch)
    pos = rope_position_ids(vlm, inputs)
    if pos is not None:
        inputs["position_ids"] = pos
    return inputs


# ------------------------------------------------------------------------- labels

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(CASES))
def test_lm_loss_of_one_sample_equals_the_models_own_labels_loss(family_models, family, case):
    """L_LM of one sample in one process (the wrapper's LM head on the labelled positions only) equals the
    model's own `labels=` loss to 1e-5, for every family and media kind."""
    from data.stream import PreparedConversation, collate_clips
    from model.wrapper import GaspConfig, GaspVLM

    vlm, _, adapter = family_models[family]
    model = GaspVLM(vlm, GaspConfig(trainable="full", lambda_lm=1.0, lambda_corr=0.0, lambda_depth=0.0, head_dim=8))
    try:
        batch = collate_clips([PreparedConversation("k", "x", _encode(adapter, case))], adapter)
        inputs = _inputs(vlm, adapter, batch)
        with torch.no_grad():
            want = vlm(**inputs, labels=batch["labels"]).loss
            got, parts = model(batch, inputs)
        assert parts["n_lm"] == int((batch["labels"][:, 1:] != -100).sum()) > 0
        assert abs(float(got) - float(want)) < 1e-5, (float(got), float(want))
    finally:
        for h in model._hooks:
            h.remove()


def _runs(labels: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of labelled positions."""
    on = (labels != -100).tolist() + [False]
    out, start = [], None
    for i, v in enumerate(on):
        if v and start is None:
            start = i
        if not v and start is not None:
            out.append((start, i))
            start = None
    return out


def check_answer_labels(tok, adapter, ids: torch.Tensor, labels: torch.Tensor, answers: list[str]) -> None:
    """The labelled positions are exactly each answer's tokens + <|im_end|> (a label equals the token at its
    position), found independently by tokenizing the answers; no header, no newline after the end token, no
    media token is labelled."""
    runs = _runs(labels)
    assert len(runs) == len(answers)
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    for (a, b), answer in zip(runs, answers):
        assert torch.equal(labels[a:b], ids[a:b])  # a label is the token at its position
        assert int(ids[b - 1]) == end_id and end_id not in ids[a:b - 1].tolist()
        assert tok.decode(ids[a:b - 1]) == answer  # the content, exactly
        assert tok.decode(ids[max(0, a - 3):a]).endswith("assistant\n")  # the header is not labelled
        assert b == len(ids) or labels[b] == -100  # the newline after the end token is not
    media = set(adapter.media_token_ids)
    assert not [i for i in range(len(ids)) if int(ids[i]) in media and labels[i] != -100]
    # brute force: every labelled position, and only those, lies in an answer's tokens + <|im_end|>
    expect = torch.full_like(labels, -100)
    pos = 0
    for answer in answers:
        piece = tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        n = len(piece)
        while pos + n <= len(ids) and ids[pos:pos + n].tolist() != piece:
            pos += 1
        assert pos + n <= len(ids), f"answer {answer!r} not found as a token run"
        expect[pos:pos + n] = ids[pos:pos + n]
        pos += n
    assert torch.equal(labels, expect)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", ["images", "video"])
def test_labelled_positions_brute_force(family_models, family, case):
    """Multi-turn conversations with images and with a video: the labelled positions are exactly each
    assistant turn's content + <|im_end|>, found independently by tokenizing the template's text piece
    by piece (a label equals the token at its position), and nothing else: no system / user turn, no
    assistant header, no newline after the end token, no media token."""
    _, proc, adapter = family_models[family]
    tok = proc.tokenizer
    item = _encode(adapter, case)
    ids, labels = item["input_ids"], item["labels"]
    check_answer_labels(tok, adapter, ids, labels, [t["value"] for t in CASES[case][2] if t["from"] == "gpt"])


def test_malformed_conversations_are_refused_with_a_reason(family_models):
    from data.chat import ConversationError

    _, _, adapter = family_models["tiny"]
    cases = {"no_assistant_turn": [{"from": "human", "value": "<image>\nHi"}],
             "placeholder_mismatch": [{"from": "human", "value": "<image>\n<image>\nHi"}, {"from": "gpt", "value": "A"}],
             "bad_placeholder": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "<image> A"}],
             "bad_turn": [{"from": "robot", "value": "x"}]}
    for reason, conv in cases.items():
        with pytest.raises(ConversationError) as e:
            adapter.encode_conversation(_frames(1), "image", conv)
        assert e.value.reason == reason and "\n" not in str(e.value)


def test_truncation_keeps_media_and_cuts_labels(family_models):
    from data.chat import ConversationError, lm_items

    _, _, adapter = family_models["tiny"]
    full = _encode(adapter, "images")
    media_end = max(i for i, t in enumerate(full["input_ids"].tolist()) if t in adapter.media_token_ids)
    first_answer_end = _runs(full["labels"])[0][1]
    cut = adapter.encode_conversation(_frames(2), "image", MULTI_TURN_IMAGE, max_len=first_answer_end,
                                      video_frames=4)
    assert len(cut["input_ids"]) == first_answer_end and torch.equal(cut["labels"], full["labels"][:first_answer_end])
    assert lm_items(cut["labels"]) < lm_items(full["labels"])
    with pytest.raises(ConversationError, match="media end") as e:
        adapter.encode_conversation(_frames(2), "image", MULTI_TURN_IMAGE, max_len=media_end, video_frames=4)
    assert e.value.reason == "too_long"


# ------------------------------------------------------------------- the stream

@pytest.fixture(scope="module")
def tiny_adapter(family_models):
    return family_models["tiny"][2]


def test_mixed_stream_dispatches_on_kind_and_counts_lm_items(tiny_shards, tiny_instruct_shards, tiny_adapter):
    from data.stream import SampleStream

    stream = SampleStream([tiny_shards + ":1", tiny_instruct_shards + ":1"], tiny_adapter, batch_size=2,
                          num_workers=0, seed=3)
    seen = {"clip": 0, "instruction": 0}
    for batch in stream:
        for kind, src in zip(batch["kinds"], batch["sources"]):
            seen[kind] += 1
            assert src == (0 if kind == "clip" else 1)
        assert int(batch["n_lm"]) == int((batch["labels"][:, 1:] != -100).sum())
        clip_rows = [b for b, k in enumerate(batch["kinds"]) if k == "clip"]
        assert sorted(set(batch["frame_clip"].tolist())) == clip_rows  # frames only of the clips
        for b, k in enumerate(batch["kinds"]):
            if k == "clip":
                assert (batch["labels"][b] == -100).all()
    assert seen["clip"] == seen["instruction"] > 0  # 1:1, a deterministic interleave
    assert stream.stats()["skipped"] == 0


def test_mixture_proportions_over_2_ranks_x_2_workers_are_exact(tiny_shards, tiny_instruct_shards, tiny_adapter):
    """Weights 3:1 over 2 ranks x 2 workers: every worker draws each set within one sample of its share
    at any point (smooth weighted round robin), so 10,000 samples hold 7,500 / 2,500 within 4."""
    from data.stream import SampleStream, _EpochReader

    per_worker = {}
    for rank in range(2):
        stream = SampleStream([tiny_shards + ":3", tiny_instruct_shards + ":1"], tiny_adapter, batch_size=1,
                              rank=rank, world_size=2, num_workers=2, seed=1)
        reader = _EpochReader(stream.sets, stream.probs, tiny_adapter, epoch=0, rank=rank, world_size=2,
                              n_workers=2, batch_size=1, seed=1, shuffle_buffer=4, shuffle_initial=2,
                              warn_every=30.0, max_consecutive_bad=10, min_corr=4, plans=stream._plans(),
                              rotation=0)
        for lw in range(2):
            endless = [iter(lambda s=s: {"set": s}, None) for s in range(2)]
            picks = [smp["__set__"] for _, smp in zip(range(2500), reader._mix(endless, lw))]
            counts = np.cumsum(np.eye(2)[picks], axis=0)
            expect = np.arange(1, 2501)[:, None] * np.array([0.75, 0.25])[None]
            assert np.abs(counts - expect).max() <= 1.0
            per_worker[(rank, lw)] = counts[-1]
    total = sum(per_worker.values())
    assert abs(total[0] - 7500) <= 4 and abs(total[1] - 2500) <= 4
    # and through the real stream (decoding, batching) on both ranks: the same proportions
    for rank in range(2):
        stream = SampleStream([tiny_shards + ":3", tiny_instruct_shards + ":1"], tiny_adapter, batch_size=4,
                              rank=rank, world_size=2, num_workers=2, seed=1, batches_per_epoch=4)
        kinds = [k for b in stream for k in b["kinds"]]
        assert kinds.count("clip") == 12 and kinds.count("instruction") == 4


def test_token_packing_bounds_padded_tokens_and_resumes_exactly(tiny_shards, tiny_instruct_shards, tiny_adapter):
    """--max-tokens-per-batch: a batch takes items while items x longest stays within the budget (at
    least one item); a stream restored mid-epoch hands out the same batches as an uninterrupted one,
    although an item was held back for the next batch at the save."""
    from data.stream import SampleStream

    def make():
        return SampleStream([tiny_shards + ":1", tiny_instruct_shards + ":1"], tiny_adapter, batch_size=4,
                            num_workers=0, seed=2, max_tokens=400, batches_per_epoch=8)

    full = list(make())
    for b in full:
        S = b["input_ids"].shape[1]
        assert len(b["keys"]) == 1 or len(b["keys"]) * S <= 400
    sizes = [len(b["keys"]) for b in full]
    assert max(sizes) > 1 and min(sizes) < 4, sizes  # packing acted: not always --batch-size items
    a = make()
    it = iter(a)
    head = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(a.state_dict()))
    b = make()
    b.load_state_dict(state)
    rest = list(b)
    got = [x["keys"] for x in head + rest]
    assert got == [x["keys"] for x in full]
    assert b.stats()["samples"] == sum(len(x["keys"]) for x in full)


def test_conversation_drawn_per_visit_is_seeded(tiny_instruct_shards, tiny_adapter):
    """One conversation per visit, drawn from (seed, epoch, sample): the same again for the same epoch, another
    one for some multi-conversation sample in another epoch."""
    from data.stream import SampleStream

    def drawn(seed, epoch):
        s = SampleStream([tiny_instruct_shards], tiny_adapter, batch_size=1, num_workers=0, seed=seed)
        s.set_epoch(epoch)
        return {b["keys"][0]: tuple(b["input_ids"][0].tolist()) for b in s}

    e0 = drawn(0, 0)
    assert e0 == drawn(0, 0)
    others = [drawn(0, e) for e in (1, 2, 3)]
    assert any(o.get(k) not in (None, v) for o in others for k, v in e0.items())


# --------------------------------------------------------------------- the model side

def test_joint_loss_of_a_mixed_batch_is_each_term_over_its_own_count(tiny_shards, tiny_instruct_shards,
                                                                      family_models):
    """lambda_lm L_LM + lambda_corr L_corr + lambda_depth L_depth of a mixed batch: L_LM over the LM
    tokens (the model's own loss on the conversations alone), the geometry terms over the clips'
    anchors (the loss of the clips alone)."""
    from data.stream import SampleStream, collate_clips, decode_checked, prepare_clip, prepare_conversation, \
        tar_samples
    from model.wrapper import GaspConfig, GaspVLM

    vlm, _, adapter = family_models["tiny"]
    import glob

    raws = [r for u in sorted(glob.glob(os.path.join(tiny_shards, "train-*.tar")))[:1] for r in tar_samples(u, None)]
    clip = prepare_clip(decode_checked(raws[0])[0], adapter)[0]
    raws = [r for u in sorted(glob.glob(os.path.join(tiny_instruct_shards, "train-*.tar")))[:1]
            for r in tar_samples(u, None)]
    conv = prepare_conversation(decode_checked(raws[0])[0], adapter, np.random.default_rng(0))[0]
    torch.manual_seed(0)
    model = GaspVLM(vlm, GaspConfig(trainable="full", lambda_lm=0.7, lambda_corr=1.3, lambda_depth=0.4,
                                    head="mlp", head_dim=8))
    model.init_heads()
    try:
        with torch.no_grad():
            mixed = collate_clips([clip, conv], adapter)
            total, parts = model(mixed, _inputs(vlm, adapter, mixed))
            only_conv = collate_clips([conv], adapter)
            lm = vlm(**_inputs(vlm, adapter, only_conv), labels=only_conv["labels"]).loss
            only_clip = collate_clips([clip], adapter)
            model.cfg.lambda_lm = 0.0
            _, geo = model(only_clip, _inputs(vlm, adapter, only_clip))
        assert parts["lm"] == pytest.approx(float(lm), abs=1e-5)
        assert parts["nce"] == pytest.approx(geo["nce"], rel=1e-4) and parts["depth"] == pytest.approx(geo["depth"],
                                                                                                    rel=1e-4)
        assert float(total) == pytest.approx(0.7 * float(lm) + 1.3 * geo["nce"] + 0.4 * geo["depth"], rel=1e-5)
    finally:
        for h in model._hooks:
            h.remove()


def test_trainable_rules_with_lm(family_models):
    """Without L_LM the last layer's attention / MLP and the LM head stay frozen (they reach no loss);
    with it they train (full) or get LoRA (lora); heads-only training refuses L_LM."""
    from model.wrapper import GaspConfig, GaspVLM

    vlm, _, _ = family_models["tiny"]
    last = len(vlm.model.language_model.layers) - 1
    for lm, want_last in ((0.0, False), (1.0, True)):
        model = GaspVLM(vlm, GaspConfig(trainable="full", lambda_lm=lm, head_dim=8))
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        assert any(f"layers.{last}.mlp" in n for n in names) == want_last
        assert any(n.endswith("lm_head.weight") or "embed_tokens" in n for n in names) == want_last
        for h in model._hooks:
            h.remove()
    with pytest.raises(ValueError, match="--trainable heads"):
        GaspConfig(trainable="heads", lambda_lm=1.0)


def test_cli_refuses_heads_with_lm_and_notes_missing_kinds(tmp_path, capsys):
    from launch import train

    with pytest.raises(SystemExit) as e:
        train.parse_config(["--trainable", "heads", "--lambda-lm", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--trainable heads" in err[0] and "--lambda-lm" in err[0]


def test_recipe_paper_sets_the_papers_choices_and_flags_override():
    from launch import train

    cfg, _ = train.parse_config(["--recipe", "paper"])
    assert (cfg.loss.head, cfg.loss.depth_loss, cfg.loss.head_layers, cfg.loss.lambda_lm) == ("mlp", "relative",
                                                                                             "all", 1.0)
    assert (cfg.model.trainable, cfg.model.lora_r, cfg.data.pairs_per_clip) == ("lora", 512, 0)
    cfg2, _ = train.parse_config(["--recipe", "paper", "--lora-r", "64", "--lambda-lm", "0.5"])
    assert cfg2.model.lora_r == 64 and cfg2.loss.lambda_lm == 0.5 and cfg2.loss.head == "mlp"
    assert cfg2.run.run_name != cfg.run.run_name  # other defining flags, another run folder


# -------------------------------------------------------------- ZeRO-3, 2 ranks

@pytest.mark.slow
def test_zero3_joint_step_equals_one_process_on_the_union(tiny_shards, tiny_instruct_shards, tmp_path):
    """Two ZeRO-3 ranks x GAS 2 with L_LM + L_corr + L_depth where one rank's micro-batches hold no clip
    and the other's no conversation, then a text-only micro-batch (no media: a dummy through the
    vision tower) and unequal tower calls: gradients and SGD updates equal one process on each step's
    union batch, and the step's counts are the union's."""
    import sys

    from data.stream import collate_clips
    from model.loading import build_model_and_processor
    from model.wrapper import GaspConfig, GaspVLM

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import train_worker_joint as W

    out = str(tmp_path / "out")
    launch = Launch(["--clips", tiny_shards, "--sft", tiny_instruct_shards, "--out", out],
                    str(tmp_path / "log.txt"), cwd=str(tmp_path), script=WORKER_JOINT)
    rc = launch.wait(timeout=600)
    assert rc == 0, launch.tail()
    res = torch.load(os.path.join(out, "result.pt"), weights_only=False)
    assert res["steps"][1]["vision_calls"] == [1, 2]  # rank 0 ran a dummy in both micro-batches of step 2

    vlm, _, adapter = build_model_and_processor("tiny")
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

    for s, step in enumerate(res["steps"]):
        union_items = [it for per_rank in W.PLAN[s] for mb in W.micro_batches(items, per_rank) for it in mb]
        union = collate_clips(union_items, adapter)
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
