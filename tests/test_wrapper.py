"""The VLM wrapper on the tiny model: capture, SVD init, what trains, checkpointing, bf16 (DESIGN §6)."""
import numpy as np
import pytest
import torch

from model.loading import build_model_and_processor
from model.wrapper import GaspConfig, GaspVLM


def _pair_batch(adapter, seed=0):
    """Two clips (3 and 2 frames: 4 supervised pairs) with hand-made labels (conftest.clip_batch)."""
    from conftest import clip_batch

    return clip_batch(adapter, seed=seed)


@pytest.fixture(scope="module")
def tiny():
    return build_model_and_processor("tiny")


def _wrap(mode="heads", **kw):
    vlm, _, adapter = build_model_and_processor("tiny")
    g = GaspVLM(vlm, GaspConfig(trainable=mode, **{"head": "mlp", **kw}))
    g.init_heads()
    return g, adapter


def test_captured_tensors_equal_the_query_projection_input(tiny):
    """Per-frame capture: feats[l, f] is layer l's q_proj input at frame f's cell positions in its row."""
    vlm, _, adapter = tiny
    g = GaspVLM(vlm, GaspConfig())
    batch = _pair_batch(adapter)
    seen = {}

    def make(l):
        def pre(mod, args):
            seen[l] = args[0].detach().clone()
        return pre

    hooks = [layer.self_attn.q_proj.register_forward_pre_hook(make(l)) for l, layer in enumerate(g.layers)]
    try:
        feats = g.capture(batch, adapter.model_inputs(batch))
    finally:
        for h in hooks:
            h.remove()
    L, F, N, D = feats.shape
    assert (L, F, N, D) == (4, 5, 48, 64) and batch["frame_clip"].tolist() == [0, 0, 0, 1, 1]
    for l in range(L):
        for f in range(F):
            row, pos = int(batch["frame_clip"][f]), batch["cell_pos"][f]
            assert torch.equal(feats[l, f], seen[l][row, pos])
    # and it is what the layer's attention reads: the input norm of the layer's input
    assert not torch.equal(feats[0], feats[1])


def test_loss_of_a_clip_batch_equals_the_sum_of_its_pairs_alone(tiny):
    """All pairs in one batched product == each pair's own loss terms, summed, with the global counts."""
    from losses.gasp import LossTerms, combine, gasp_loss_terms, pair_similarities, pair_view, similarities

    vlm, _, adapter = tiny
    g = GaspVLM(vlm, GaspConfig(head="mlp"))
    g.init_heads()
    batch = _pair_batch(adapter)
    inputs = adapter.model_inputs(batch)
    loss, parts, s, feats = g(batch, inputs, return_features=True)
    f = g.head(feats)  # (L, F, N, d)
    view = pair_view(batch)
    sums = []
    for p, (a, b) in enumerate(batch["pair_frames"].tolist()):
        one = {k: v[p:p + 1] for k, v in view.items()}
        s_p = similarities(f[:, a:a + 1], f[:, b:b + 1], g.cfg.tau)  # (L, 1, N, N): this pair alone
        torch.testing.assert_close(s_p[:, 0], s[:, p])
        sums.append(gasp_loss_terms(s_p, one))
    total = LossTerms(*(sum(getattr(t, k) for t in sums) for k in ("nce_ab_sum", "nce_ba_sum", "depth_sum", "n_ab",
                                                                   "n_ba", "n_depth")))
    want, _ = combine(total, None, g.cfg.lambda_depth)
    torch.testing.assert_close(loss, want)
    assert batch["pair_frames"].tolist() == [[0, 1], [0, 2], [1, 2], [3, 4]]
    assert torch.equal(s, pair_similarities(f, batch["pair_frames"], g.cfg.tau))


def test_svd_initialisation_on_the_tiny_model(tiny):
    vlm, _, _ = tiny
    g = GaspVLM(vlm, GaspConfig())
    g.init_heads()
    for l, q in enumerate(g.query_projections()):
        Wq = q.weight.detach().double()
        _, S, Vh = torch.linalg.svd(Wq, full_matrices=False)
        d = g.head.head_dim
        expect = Vh[:d].T @ torch.diag(S[:d] ** 2) @ Vh[:d] / S[0] ** 2
        W = g.head.weight[l].detach().double()
        assert torch.allclose(W.T @ W, expect, atol=1e-5)


@pytest.mark.parametrize("mode", ["heads", "lora", "full"])
def test_what_trains(mode):
    g, adapter = _wrap(mode)
    g.train()
    batch = _pair_batch(adapter)
    loss, parts = g(batch, adapter.model_inputs(batch))
    assert torch.isfinite(loss) and parts["n_ab"] == 14 and parts["n_ba"] == 11
    loss.backward()
    got = {n for n, p in g.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    heads = {"head.w1", "head.w2"}
    assert heads <= got
    assert not any("visual" in n for n in got), "the frozen vision tower got gradients"
    lm = {n for n in got if "language_model.layers" in n}
    if mode == "heads":
        assert got == heads
    elif mode == "lora":
        assert lm and all("lora_" in n for n in lm)
        assert {n for n, p in g.named_parameters() if p.requires_grad} - heads == \
            {n for n, p in g.named_parameters() if "lora_" in n}
    else:
        assert any("layers.0.self_attn.q_proj.weight" in n for n in lm)
        assert any("layers.2.mlp" in n for n in lm)
        # the last layer only feeds its head through its input norm
        assert {n.split("layers.3.")[1] for n in lm if "layers.3." in n} == {"input_layernorm.weight"}


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    out = []
    for ckpt in (False, True):
        g, adapter = _wrap("full", gradient_checkpointing=ckpt)
        g.train()
        batch = _pair_batch(adapter)
        loss, _ = g(batch, adapter.model_inputs(batch))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in g.named_parameters() if p.grad is not None}
        out.append((loss.detach(), grads))
    (l0, g0), (l1, g1) = out
    assert torch.allclose(l0, l1, rtol=1e-6)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-4, atol=1e-7), n


def test_bf16_forward_gives_float32_losses_close_to_float32():
    vlm, _, adapter = build_model_and_processor("tiny")
    g = GaspVLM(vlm, GaspConfig())
    g.init_heads()
    batch = _pair_batch(adapter)
    with torch.no_grad():
        loss32, _ = g(batch, adapter.model_inputs(batch))
        g.vlm.to(torch.bfloat16)
        inputs = adapter.model_inputs(batch)
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        loss16, _ = g(batch, inputs)
    assert loss16.dtype == torch.float32
    assert abs(loss16.item() - loss32.item()) / abs(loss32.item()) < 2e-2


def test_heads_of_the_wrong_shape_are_refused(tiny):
    from model.head import FusedCorrespondenceHead, HeadShapeError

    vlm, _, _ = tiny
    with pytest.raises(HeadShapeError, match="do not fit"):
        GaspVLM(vlm, GaspConfig(), head=FusedCorrespondenceHead(5, 64))


def test_layer_weights_must_match_the_layers(tiny):
    vlm, _, _ = tiny
    with pytest.raises(ValueError, match="4 values"):
        GaspVLM(vlm, GaspConfig(layer_weights=[1.0, 1.0]))


def test_fifty_steps_on_one_fixed_batch_learn(tiny_shards):
    """The tiny model on synthetic clips: InfoNCE falls and head PCK@1 rises (DESIGN §6 learning test)."""
    from data.stream import SampleStream

    torch.manual_seed(0)
    vlm, _, adapter = build_model_and_processor("tiny")
    g = GaspVLM(vlm, GaspConfig(trainable="full", head="mlp"))
    g.init_heads()
    batch = next(iter(SampleStream([tiny_shards], adapter, batch_size=4, rank=0, world_size=1, split="train")))
    inputs = adapter.model_inputs(batch)
    assert int(batch["anchor_mask"].sum()) > 50

    def pck1():
        g.eval()
        head, _ = g.match(batch, inputs, raw=False)
        g.train()
        return float((head.dist <= 1).double().mean())

    opt = torch.optim.Adam([p for p in g.parameters() if p.requires_grad], lr=3e-3)
    pck_before = pck1()
    nce = []
    for _ in range(50):
        loss, parts = g(batch, inputs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        nce.append(parts["nce"])
    pck_after = pck1()
    assert nce[-1] < 0.5 * nce[0], (nce[0], nce[-1])
    assert pck_after > pck_before + 0.15 and pck_after > 0.8, (pck_before, pck_after)
