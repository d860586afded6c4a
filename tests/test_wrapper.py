"""The VLM wrapper on the tiny model: capture, SVD init, what trains, checkpointing, bf16 (DESIGN §6)."""
import numpy as np
import pytest
import torch

from model.loading import build_model_and_processor
from model.wrapper import GaspConfig, GaspVLM


def _pair_batch(adapter, seed=0, n_pairs=2):
    """A collated batch of random-image pairs with hand-made labels (two anchors share a target)."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n_pairs):
        a = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
        b = np.roll(a, 28 * 10 // 7, axis=1)  # B: A shifted sideways
        items.append(adapter.encode_pair(a, b))
    batch = adapter.collate(items)
    B = n_pairs
    batch["cell_pos_a"] = torch.stack(batch["cell_pos_a"])
    batch["cell_pos_b"] = torch.stack(batch["cell_pos_b"])
    Na, Nb = batch["cell_pos_a"].shape[1], batch["cell_pos_b"].shape[1]
    batch["cell_mask_a"] = torch.ones(B, Na, dtype=torch.bool)
    batch["cell_mask_b"] = torch.ones(B, Nb, dtype=torch.bool)
    batch["anchor_a"] = torch.tensor([[0, 9, 17, 30]] * B)
    batch["target_b"] = torch.tensor([[1, 10, 10, 31]] * B)
    batch["anchor_mask"] = torch.tensor([[True, True, True, True], [True, True, False, False]][:B])
    batch["z_b"] = torch.full((B, 4), 2.0)
    batch["depth_b"] = torch.linspace(1.0, 4.0, Nb).repeat(B, 1)
    batch["depth_b_valid"] = torch.ones(B, Nb, dtype=torch.bool)
    batch["grid_a"] = torch.tensor([[6, 8]] * B)
    batch["grid_b"] = torch.tensor([[6, 8]] * B)
    batch["gap"] = torch.tensor([1, 20][:B])
    return batch


@pytest.fixture(scope="module")
def tiny():
    return build_model_and_processor("tiny")


def _wrap(mode="heads", **kw):
    vlm, _, adapter = build_model_and_processor("tiny")
    g = GaspVLM(vlm, GaspConfig(trainable=mode, **kw))
    g.init_heads()
    return g, adapter


def test_captured_tensors_equal_the_query_projection_input(tiny):
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
        fa, fb = g.capture(batch, adapter.model_inputs(batch))
    finally:
        for h in hooks:
            h.remove()
    L, B, Na, D = fa.shape
    assert (L, B, Na, D) == (4, 2, 48, 64) and fb.shape == (4, 2, 48, 64)
    for l in range(L):
        for b in range(B):
            assert torch.equal(fa[l, b], seen[l][b, batch["cell_pos_a"][b]])
            assert torch.equal(fb[l, b], seen[l][b, batch["cell_pos_b"][b]])
    # and it is what the layer's attention reads: the input norm of the layer's input
    assert not torch.equal(fa[0], fa[1])


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
    assert torch.isfinite(loss) and parts["n_ab"] == 6 and parts["n_ba"] == 5
    loss.backward()
    got = {n for n, p in g.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "head.weight" in got
    assert not any("visual" in n for n in got), "the frozen vision tower got gradients"
    lm = {n for n in got if "language_model.layers" in n}
    if mode == "heads":
        assert got == {"head.weight"}
    elif mode == "lora":
        assert lm and all("lora_" in n for n in lm)
        assert {n for n, p in g.named_parameters() if p.requires_grad} - {"head.weight"} == \
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
    """The tiny model on synthetic pairs: InfoNCE falls and head PCK@1 rises (DESIGN §6 learning test)."""
    from data.stream import PairStream

    torch.manual_seed(0)
    vlm, _, adapter = build_model_and_processor("tiny")
    g = GaspVLM(vlm, GaspConfig(trainable="full"))
    g.init_heads()
    batch = next(iter(PairStream([tiny_shards], adapter, batch_size=4, rank=0, world_size=1, split="train")))
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
