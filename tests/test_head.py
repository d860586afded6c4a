"""Fused correspondence head: parity with the per-layer loop, SVD init, ZeRO-3 gathering, save/load."""
from __future__ import annotations

import sys
import types
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from model.head import (FusedCorrespondenceHead, HeadShapeError, PerLayerHeads, gather_query_weights,
                        head_from_file, load_heads, save_heads)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def test_head_dim_default_and_configurable():
    assert FusedCorrespondenceHead(2, 300).weight.shape == (2, 256, 300)
    assert FusedCorrespondenceHead(2, 64).weight.shape == (2, 64, 64)
    assert FusedCorrespondenceHead(2, 64, max_dim=16).weight.shape == (2, 16, 64)
    assert FusedCorrespondenceHead(3, 64, head_dim=8).weight.shape == (3, 8, 64)
    assert [n for n, _ in FusedCorrespondenceHead(2, 8).named_parameters()] == ["weight"]
    with pytest.raises(ValueError):
        FusedCorrespondenceHead(2, 8, head_dim=9)


def test_fused_equals_per_layer_loop_outputs_and_gradients():
    torch.manual_seed(0)
    L, B, N, D, d = 4, 2, 7, 48, 16
    fused = FusedCorrespondenceHead(L, D, head_dim=d)
    ref = PerLayerHeads.from_fused(fused)
    x = torch.randn(L, B, N, D)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = fused(x1), ref(x2)
    assert y1.shape == (L, B, N, d) and y1.dtype == torch.float32
    assert _rel(y1, y2) < 1e-6
    assert torch.allclose(y1.norm(dim=-1), torch.ones(L, B, N), atol=1e-6)  # unit vectors
    r = torch.randn_like(y1)
    (y1 * r).sum().backward()
    (y2 * r).sum().backward()
    assert _rel(x1.grad, x2.grad) < 1e-6
    w_ref = torch.stack([lin.weight.grad for lin in ref.heads])  # (L, d, D)
    assert fused.weight.grad.abs().sum() > 0
    assert _rel(fused.weight.grad, w_ref) < 1e-6


def test_head_is_float32_for_bf16_input_and_checks_shape():
    torch.manual_seed(0)
    head = FusedCorrespondenceHead(2, 32, head_dim=8)
    x = torch.randn(2, 5, 32)
    y16 = head(x.bfloat16())
    assert y16.dtype == torch.float32 and head.weight.dtype == torch.float32
    assert torch.allclose(y16, head(x.bfloat16().float()))  # only the input was rounded
    with pytest.raises(ValueError, match="L=2"):
        head(torch.randn(3, 5, 32))
    with pytest.raises(ValueError, match="D=32"):
        head(torch.randn(2, 5, 31))


@pytest.mark.parametrize("out_dim", [40, 24])
def test_svd_init_gram_matrix(out_dim: int):
    """W_l^T W_l == V_d S_d^2 V_d^T / S_0^2 (sign-free), from a stack of q_proj stand-ins."""
    torch.manual_seed(1)
    L, D, d = 3, 32, 12
    q_projs = nn.ModuleList(nn.Linear(D, out_dim, bias=False) for _ in range(L))  # weight (out, D)
    head = FusedCorrespondenceHead(L, D, head_dim=d)
    head.init_from_query_modules(q_projs)
    for l, q in enumerate(q_projs):
        _, S, Vh = torch.linalg.svd(q.weight.detach().double(), full_matrices=False)
        expected = Vh[:d].T @ torch.diag(S[:d] ** 2) @ Vh[:d] / S[0] ** 2  # (D, D)
        w = head.weight[l].detach().double()
        torch.testing.assert_close(w.T @ w, expected, rtol=0, atol=1e-5)
        # The top singular direction has unit norm after the 1/S_0 scaling.
        assert abs(torch.linalg.matrix_norm(w, ord=2).item() - 1.0) < 1e-5


def test_svd_init_rejects_wrong_shapes():
    head = FusedCorrespondenceHead(2, 16, head_dim=4)
    with pytest.raises(HeadShapeError):
        head.init_from_query_weights([torch.randn(16, 16)])  # one weight for two layers
    with pytest.raises(HeadShapeError):
        head.init_from_query_weights([torch.randn(16, 15), torch.randn(16, 15)])  # wrong D


def test_gather_query_weights_plain_and_zero3(monkeypatch):
    lin = nn.Linear(8, 8, bias=False)
    got = gather_query_weights([lin])
    assert torch.equal(got[0], lin.weight.detach()) and got[0].data_ptr() != lin.weight.data_ptr()

    # A ZeRO-3 partitioned parameter (has ds_id): access goes through GatheredParameters, read-only.
    calls: list[tuple[list, object]] = []
    full = torch.randn(8, 8)

    @contextmanager
    def gathered_parameters(params, modifier_rank=None):
        calls.append((params, modifier_rank))
        saved = params[0].data
        params[0].data = full  # what DeepSpeed does: materialise the full tensor inside the block
        yield
        params[0].data = saved

    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(GatheredParameters=gathered_parameters)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    part = nn.Linear(8, 8, bias=False)
    part.weight.data = torch.empty(0)
    part.weight.ds_id = 7
    got = gather_query_weights([part, lin])
    assert len(calls) == 1 and calls[0][0][0] is part.weight and calls[0][1] is None
    assert torch.equal(got[0], full) and part.weight.numel() == 0  # copy survives the release
    assert torch.equal(got[1], lin.weight.detach())


def test_save_load_roundtrip_and_shape_errors(tmp_path):
    torch.manual_seed(0)
    head = FusedCorrespondenceHead(3, 24, head_dim=8)
    path = tmp_path / "heads" / "heads.safetensors"
    save_heads(path, head, {"family": "qwen2_5_vl", "model": "tiny"})
    state, meta = load_heads(path, num_layers=3, hidden_size=24)
    assert torch.equal(state["weight"], head.weight.detach())
    assert (meta["L"], meta["d"], meta["D"], meta["family"], meta["model"]) == (3, 8, 24, "qwen2_5_vl", "tiny")
    loaded, _ = head_from_file(path, 3, 24)
    x = torch.randn(3, 4, 24)
    assert torch.equal(loaded(x), head(x))
    with pytest.raises(HeadShapeError, match=r"L=3.*L=4"):
        load_heads(path, num_layers=4, hidden_size=24)
    with pytest.raises(HeadShapeError, match=r"D=24.*D=32"):
        head_from_file(path, 3, 32)


# ------------------------------------------------------------------ the two-layer (MLP) head (DESIGN §6)

def test_mlp_head_shapes_and_parity_with_the_per_layer_loop():
    torch.manual_seed(2)
    L, B, N, D, d = 3, 2, 5, 40, 12
    fused = FusedCorrespondenceHead(L, D, head_dim=d, kind="mlp")
    assert [(n, tuple(p.shape)) for n, p in fused.named_parameters()] == [("w1", (L, 2 * d, D)), ("w2", (L, d, 2 * d))]
    assert (fused.num_layers, fused.head_dim, fused.hidden_size) == (L, d, D)
    ref = PerLayerHeads.from_fused(fused)
    x = torch.randn(L, B, N, D)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = fused(x1), ref(x2)
    assert y1.shape == (L, B, N, d) and _rel(y1, y2) < 1e-6
    r = torch.randn_like(y1)
    (y1 * r).sum().backward()
    (y2 * r).sum().backward()
    assert _rel(x1.grad, x2.grad) < 1e-6
    assert _rel(fused.w1.grad, torch.stack([m[0].weight.grad for m in ref.heads])) < 1e-6
    assert _rel(fused.w2.grad, torch.stack([m[2].weight.grad for m in ref.heads])) < 1e-6


def test_mlp_head_at_initialisation_equals_the_linear_head():
    """W1 = [W; -W], W2 = [I, -I] with GELU(a) - GELU(-a) = a: the MLP head is the linear head at init
    (to 1e-6 in fp32), and the first step breaks the symmetry."""
    torch.manual_seed(3)
    L, D, d = 4, 48, 16
    q_projs = nn.ModuleList(nn.Linear(D, 56, bias=False) for _ in range(L))
    lin, mlp = FusedCorrespondenceHead(L, D, head_dim=d), FusedCorrespondenceHead(L, D, head_dim=d, kind="mlp")
    lin.init_from_query_modules(q_projs)
    mlp.init_from_query_modules(q_projs)
    eye = torch.eye(d)
    assert torch.equal(mlp.w1, torch.cat([lin.weight, -lin.weight], 1)) and torch.equal(mlp.w2[0], torch.cat([eye, -eye], 1))
    x = torch.randn(L, 3, 7, D) * 3
    assert (mlp(x) - lin(x)).abs().max() < 1e-6
    opt = torch.optim.SGD(mlp.parameters(), lr=0.5)
    (mlp(x)[..., 0].sum()).backward()
    opt.step()
    assert (mlp(x) - lin(x)).abs().max() > 1e-3


def test_heads_file_records_the_kind_and_a_mismatch_is_refused(tmp_path):
    torch.manual_seed(4)
    head = FusedCorrespondenceHead(2, 24, head_dim=8, kind="mlp")
    path = tmp_path / "heads.safetensors"
    save_heads(path, head, {"model": "tiny"})
    state, meta = load_heads(path, 2, 24)
    assert meta["kind"] == "mlp" and set(state) == {"w1", "w2"}
    loaded, _ = head_from_file(path, 2, 24, kind="mlp")
    x = torch.randn(2, 3, 24)
    assert loaded.kind == "mlp" and torch.equal(loaded(x), head(x))
    with pytest.raises(HeadShapeError, match=r"holds mlp heads, but linear heads are asked for \(--head linear\)"):
        head_from_file(path, 2, 24, kind="linear")
    with pytest.raises(ValueError, match="head kind must be one of linear, mlp"):
        FusedCorrespondenceHead(2, 24, kind="conv")
