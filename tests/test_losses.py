"""GASP losses: hand-computed InfoNCE (both ways) and depth, empty cases, bf16, global counts, DeepSpeed scaling."""
from __future__ import annotations

import math

import pytest
import torch

from losses.gasp import (GaspLoss, LossTerms, combine, count_items, distributed_scale, gasp_loss_terms,
                         loss_to_backward, similarities)
from losses.metrics import MatchMetrics, match_stats
from model.head import FusedCorrespondenceHead


def make_batch(mask_a, mask_b, anchors, depth_b=None, depth_valid=None, M=None, grid_b=None, gap=None):
    """Padded batch from per-pair python lists; anchors[b] = [(i, j, z_b), ...]."""
    B, Na, Nb = len(mask_a), len(mask_a[0]), len(mask_b[0])
    M = max([len(a) for a in anchors] + [0]) if M is None else M
    anchor_a = torch.zeros(B, M, dtype=torch.long)
    target_b = torch.zeros(B, M, dtype=torch.long)
    z_b = torch.zeros(B, M)
    anchor_mask = torch.zeros(B, M, dtype=torch.bool)
    for b, items in enumerate(anchors):
        for m, (i, j, z) in enumerate(items):
            anchor_a[b, m], target_b[b, m], z_b[b, m], anchor_mask[b, m] = i, j, z, True
    return {
        "cell_mask_a": torch.tensor(mask_a, dtype=torch.bool), "cell_mask_b": torch.tensor(mask_b, dtype=torch.bool),
        "anchor_a": anchor_a, "target_b": target_b, "z_b": z_b, "anchor_mask": anchor_mask,
        "depth_b": torch.ones(B, Nb) if depth_b is None else torch.tensor(depth_b, dtype=torch.float32),
        "depth_b_valid": (torch.ones(B, Nb, dtype=torch.bool) if depth_valid is None
                          else torch.tensor(depth_valid, dtype=torch.bool)),
        "grid_a": torch.tensor([[1, Na]] * B), "grid_b": torch.tensor(grid_b if grid_b is not None else [[1, Nb]] * B),
        "dt": torch.tensor(gap if gap is not None else [1] * B),
    }


def hand_terms(s: torch.Tensor, batch: dict, form: str = "relative"
               ) -> tuple[list[float], list[float], list[float], int, int, int]:
    """DESIGN §6 written out with python loops and math, per layer sums and counts; `form` of the depth
    term: relative |z_b - z_hat| / (z_b + z_hat) (the paper's) or log |log z_hat - log z_b|."""
    S = s.double().tolist()
    L = len(S)
    ab, ba, dep = [0.0] * L, [0.0] * L, [0.0] * L
    n_ab = n_ba = n_dep = 0
    for b in range(len(S[0])):
        real_a = [i for i, ok in enumerate(batch["cell_mask_a"][b].tolist()) if ok]
        real_b = [j for j, ok in enumerate(batch["cell_mask_b"][b].tolist()) if ok]
        valid = [j for j in real_b if batch["depth_b_valid"][b, j] and batch["depth_b"][b, j] > 0]
        anchors = [(int(batch["anchor_a"][b, m]), int(batch["target_b"][b, m]), float(batch["z_b"][b, m]))
                   for m in range(batch["anchor_a"].shape[1]) if batch["anchor_mask"][b, m]]
        targets: dict[int, set[int]] = {}
        for i, j, _ in anchors:
            targets.setdefault(j, set()).add(i)
        n_ab += len(anchors)
        n_ba += len(targets)
        n_dep += len(anchors) if valid else 0
        for l in range(L):
            for i, j, z in anchors:
                ab[l] -= math.log(math.exp(S[l][b][i][j]) / sum(math.exp(S[l][b][i][k]) for k in real_b))
                if valid:
                    den = sum(math.exp(S[l][b][i][k]) for k in valid)
                    z_hat = sum(math.exp(S[l][b][i][k]) / den * float(batch["depth_b"][b, k]) for k in valid)
                    dep[l] += (abs(z - z_hat) / (z + z_hat) if form == "relative"
                               else abs(math.log(z_hat) - math.log(z)))
            for j, P in targets.items():
                den = sum(math.exp(S[l][b][k][j]) for k in real_a)
                ba[l] -= math.log(sum(math.exp(S[l][b][i][j]) / den for i in P))
    return ab, ba, dep, n_ab, n_ba, n_dep


def tiny_case(seed: int = 0):
    """Two pairs: pair 0 has padded cells, two anchors sharing target 1, one invalid-depth cell;
    pair 1 has zero anchors. Padded entries of s hold large garbage."""
    g = torch.Generator().manual_seed(seed)
    batch = make_batch(
        mask_a=[[1, 1, 1, 0], [1, 1, 1, 1]],
        mask_b=[[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]],
        anchors=[[(0, 1, 2.0), (2, 1, 2.5), (1, 3, 1.5)], []],
        depth_b=[[1.0, 3.0, 0.0, 2.0, 9.0], [1.0, 1.0, 1.0, 1.0, 1.0]],
        depth_valid=[[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]],  # cell 4 of pair 0 is padding: flag ignored
        M=4)
    s = torch.randn(2, 2, 4, 5, generator=g) * 2  # (L, B, Na, Nb)
    s[:, 0, 3, :] = 40.0  # padded row of A
    s[:, 0, :, 4] = 40.0  # padded column of B
    return s, batch


@pytest.mark.parametrize("form", ["relative", "log"])
def test_terms_equal_hand_computed_values(form):
    s, batch = tiny_case()
    s.requires_grad_()
    terms = gasp_loss_terms(s, batch, form)
    ab, ba, dep, n_ab, n_ba, n_dep = hand_terms(s.detach(), batch, form)
    assert (terms.n_ab.item(), terms.n_ba.item(), terms.n_depth.item()) == (3, 2, 3)
    assert (n_ab, n_ba, n_dep) == (3, 2, 3)
    for got, want in ((terms.nce_ab_sum, ab), (terms.nce_ba_sum, ba), (terms.depth_sum, dep)):
        assert got.dtype == torch.float32 and got.shape == (2,)
        torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert torch.equal(count_items(batch)[:3], terms.counts()) and count_items(batch)[3] == 0  # no LM labels
    total, parts = combine(terms, lambda_depth=0.5)
    want = sum(0.5 * (ab[l] / 3 + ba[l] / 2) + 0.5 * dep[l] / 3 for l in range(2)) / 2
    assert math.isclose(total.item(), want, rel_tol=1e-5) and math.isclose(parts["total"], want, rel_tol=1e-5)
    total.backward()
    assert torch.isfinite(s.grad).all()
    assert s.grad[:, 1].abs().max() == 0  # pair without anchors
    assert s.grad[:, 0, 3].abs().max() == 0 and s.grad[:, 0, :, 4].abs().max() == 0  # padding
    assert s.grad[:, 0, :3, :4].abs().min() > 0  # every real entry of pair 0 is in some softmax


@pytest.mark.parametrize("form", ["relative", "log"])
def test_depth_needs_a_valid_cell_and_ignores_invalid_cells(form):
    g = torch.Generator().manual_seed(3)
    batch = make_batch(mask_a=[[1, 1, 1]] * 2, mask_b=[[1, 1, 1]] * 2,
                       anchors=[[(0, 0, 2.0), (1, 2, 4.0)], [(2, 1, 3.0)]],
                       depth_b=[[2.0, 5.0, 4.0], [3.0, 3.0, 3.0]], depth_valid=[[1, 0, 1], [0, 0, 0]])
    s = torch.randn(1, 2, 3, 3, generator=g)
    terms = gasp_loss_terms(s, batch, form)
    _, _, dep, n_ab, _, n_dep = hand_terms(s, batch, form)
    assert (terms.n_ab.item(), terms.n_depth.item()) == (n_ab, n_dep) == (3, 2)
    assert math.isclose(terms.depth_sum.item(), dep[0], rel_tol=1e-5)
    # A perfectly peaked match on a valid cell of the right depth costs ~0.
    s_peak = torch.full((1, 2, 3, 3), -30.0)
    s_peak[0, 0, 0, 0] = s_peak[0, 0, 1, 2] = 30.0
    assert gasp_loss_terms(s_peak, batch, form).depth_sum.item() < 1e-5
    # Mass on the invalid cell (depth 5) is excluded, not counted.
    s_inv = s_peak.clone()
    s_inv[0, 0, 0, 1] = 60.0
    assert gasp_loss_terms(s_inv, batch, form).depth_sum.item() < 1e-5


def test_relative_depth_loss_by_hand():
    """One anchor, two valid cells of depths 1 and 3 with probabilities 3/4 and 1/4: z_hat = 1.5; with
    z_b = 2 the relative loss is |2 - 1.5| / (2 + 1.5) = 1/7 and the log loss |log 1.5 - log 2|."""
    batch = make_batch(mask_a=[[1]], mask_b=[[1, 1]], anchors=[[(0, 0, 2.0)]], depth_b=[[1.0, 3.0]])
    s = torch.tensor([[[[math.log(3.0), 0.0]]]])  # (L=1, B=1, Na=1, Nb=2): softmax = (3/4, 1/4)
    assert math.isclose(gasp_loss_terms(s, batch, "relative").depth_sum.item(), 1 / 7, rel_tol=1e-6)
    assert math.isclose(gasp_loss_terms(s, batch, "log").depth_sum.item(), abs(math.log(1.5 / 2.0)), rel_tol=1e-6)
    with pytest.raises(ValueError, match="depth_loss must be one of relative, log"):
        gasp_loss_terms(s, batch, "l1")


def test_padding_values_do_not_change_loss():
    s, batch = tiny_case(1)
    base = gasp_loss_terms(s, batch)
    s2 = s.clone()
    s2[:, 0, 3, :] = -1e4
    s2[:, 0, :, 4] = float("nan")  # even NaN in padding is masked out
    other = gasp_loss_terms(s2, batch)
    for a, b in zip(base.counts().tolist() + base.nce_ab_sum.tolist() + base.nce_ba_sum.tolist(),
                    other.counts().tolist() + other.nce_ab_sum.tolist() + other.nce_ba_sum.tolist()):
        assert a == b
    assert torch.equal(base.depth_sum, other.depth_sum)


@pytest.mark.parametrize("M", [0, 3])
def test_no_anchors_anywhere_gives_zero_loss_and_zero_head_gradient(M: int):
    torch.manual_seed(0)
    L, D = 3, 16
    head = FusedCorrespondenceHead(L, D, head_dim=8)
    batch = make_batch(mask_a=[[1, 1, 0]] * 2, mask_b=[[1, 1, 1, 0]] * 2, anchors=[[], []], M=M,
                       depth_valid=[[0, 0, 0, 0]] * 2)
    loss, parts = GaspLoss(head)(torch.randn(L, 2, 3, D), torch.randn(L, 2, 4, D), batch)
    assert loss.item() == 0.0 and parts["total"] == 0.0 and math.isfinite(parts["nce"])
    loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().max() == 0
    # The same with global counts from other ranks (this rank has nothing): still in the graph, zero.
    head.weight.grad = None
    loss, _ = GaspLoss(head)(torch.randn(L, 2, 3, D), torch.randn(L, 2, 4, D), batch,
                             global_counts=torch.tensor([5.0, 4.0, 5.0]), grad_accum_steps=2, world_size=2)
    loss.backward()
    assert loss.item() == 0.0 and head.weight.grad is not None and head.weight.grad.abs().max() == 0


def random_batch(g: torch.Generator, B: int, Na: int, Nb: int, M: int, n_anchors: list[int]) -> dict:
    """Random labels; pair b has n_anchors[b] anchors (targets may repeat), some padded cells and invalid depth."""
    ra = [Na - int(torch.randint(0, 3, (1,), generator=g)) for _ in range(B)]
    rb = [Nb - int(torch.randint(0, 3, (1,), generator=g)) for _ in range(B)]
    anchors = []
    for b in range(B):
        cells = torch.randperm(ra[b], generator=g)[: n_anchors[b]].tolist()
        anchors.append([(i, int(torch.randint(0, rb[b], (1,), generator=g)),
                         float(torch.rand(1, generator=g)) * 4 + 1) for i in cells])
    return make_batch(mask_a=[[k < ra[b] for k in range(Na)] for b in range(B)],
                      mask_b=[[k < rb[b] for k in range(Nb)] for b in range(B)], anchors=anchors, M=M,
                      depth_b=(torch.rand(B, Nb, generator=g) * 4 + 1).tolist(),
                      depth_valid=(torch.rand(B, Nb, generator=g) > 0.3).tolist())


def test_bf16_features_give_float32_loss_close_to_float32():
    g = torch.Generator().manual_seed(0)
    L, B, Na, Nb, D = 4, 3, 12, 10, 64
    batch = random_batch(g, B, Na, Nb, 8, [8, 5, 0])
    fa, fb = torch.randn(L, B, Na, D, generator=g), torch.randn(L, B, Nb, D, generator=g)
    crit = GaspLoss(FusedCorrespondenceHead(L, D, head_dim=32))
    l32, _ = crit(fa, fb, batch)
    l16, _ = crit(fa.bfloat16(), fb.bfloat16(), batch)
    assert l16.dtype == torch.float32
    assert abs(l16.item() - l32.item()) / l32.item() < 2e-2


def test_combine_with_global_counts_and_zero_counts():
    s, batch = tiny_case(2)
    terms = gasp_loss_terms(s, batch)
    local, _ = combine(terms, [1.0, 3.0], 1.0)
    doubled, _ = combine(terms, [1.0, 3.0], 1.0, global_counts=2 * terms.counts())
    assert math.isclose(doubled.item(), local.item() / 2, rel_tol=1e-6)
    w = torch.tensor([1.0, 3.0]) / 4
    per = [0.5 * (terms.nce_ab_sum[l] / 3 + terms.nce_ba_sum[l] / 2) + terms.depth_sum[l] / 3 for l in range(2)]
    assert math.isclose(local.item(), float(w[0] * per[0] + w[1] * per[1]), rel_tol=1e-6)
    empty = LossTerms(*(torch.zeros(2) for _ in range(3)), *(torch.zeros(()) for _ in range(3)))
    total, parts = combine(empty, None, 1.0)
    assert total.item() == 0.0 and all(math.isfinite(v) for v in parts.values())
    with pytest.raises(ValueError, match="layer_weights"):
        combine(terms, [1.0, 2.0, 3.0])


def test_distributed_scaling_equals_union_batch():
    """2 ranks x 2 micro-batches, unequal anchor counts: DeepSpeed's reduction of `loss_to_backward`
    (sum over micro-batches / GAS, mean over ranks) gives the union batch's gradient."""
    g = torch.Generator().manual_seed(0)
    L, Na, Nb, D, M, GAS, WORLD = 3, 9, 8, 24, 7, 2, 2
    torch.manual_seed(0)
    head = FusedCorrespondenceHead(L, D, head_dim=12)
    crit = GaspLoss(head, layer_weights=[1.0, 0.5, 2.0], lambda_depth=0.7)
    anchor_counts = [[7, 0], [2, 5], [1, 1], [0, 0]]  # per micro-batch, per pair
    micro = [(random_batch(g, 2, Na, Nb, M, n), torch.randn(L, 2, Na, D, generator=g),
              torch.randn(L, 2, Nb, D, generator=g)) for n in anchor_counts]
    global_counts = sum(count_items(b) for b, _, _ in micro)  # what the all-reduce gives every rank
    assert distributed_scale(GAS, WORLD) == 4.0

    step_loss = 0.0
    for rank in range(WORLD):
        for k in range(GAS):
            batch, fa, fb = micro[rank * GAS + k]
            loss, parts = crit(fa, fb, batch, global_counts=global_counts, grad_accum_steps=GAS, world_size=WORLD)
            (loss / (GAS * WORLD)).backward()  # DeepSpeed: / GAS in backward, mean over ranks in all-reduce
            step_loss += parts["total"]
    grad_ranks = head.weight.grad.clone()

    head.weight.grad = None
    union = {key: torch.cat([b[key] for b, _, _ in micro]) for key in micro[0][0]}
    loss_u, parts_u = crit(torch.cat([m[1] for m in micro], 1), torch.cat([m[2] for m in micro], 1), union)
    loss_u.backward()
    assert math.isclose(step_loss, loss_u.item(), rel_tol=1e-5)
    assert float((grad_ranks - head.weight.grad).norm() / head.weight.grad.norm()) < 1e-5
    # Averaging per-rank means instead (the mistake this avoids) gives a different gradient.
    head.weight.grad = None
    for rank in range(WORLD):
        b = {key: torch.cat([micro[rank * GAS + k][0][key] for k in range(GAS)]) for key in union}
        fa = torch.cat([micro[rank * GAS + k][1] for k in range(GAS)], 1)
        fb = torch.cat([micro[rank * GAS + k][2] for k in range(GAS)], 1)
        (crit(fa, fb, b)[0] / WORLD).backward()
    assert float((grad_ranks - head.weight.grad).norm() / grad_ranks.norm()) > 1e-2


def test_similarities_float32_and_scaled():
    fa, fb = torch.randn(2, 1, 3, 4).bfloat16(), torch.randn(2, 1, 5, 4).bfloat16()
    s = similarities(fa, fb, tau=0.5)
    assert s.shape == (2, 1, 3, 5) and s.dtype == torch.float32
    torch.testing.assert_close(s, fa.float() @ fb.float().transpose(-1, -2) * 2)


def test_learning_sanity_head_learns_rotation_invariant_subspace():
    """B's features = A's content (6 dims, noisy) + A's nuisance (26 dims, larger) rotated.
    Training only the head must find the content subspace: InfoNCE falls, head PCK@1 rises."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    L, B, R, C, D, k = 2, 2, 6, 6, 32, 6
    N = R * C
    content = torch.randn(L, B, N, k, generator=g)
    nuisance = torch.randn(L, B, N, D - k, generator=g) * 2
    Q = torch.linalg.qr(torch.randn(D - k, D - k, generator=g))[0]  # rotation of the nuisance subspace
    fa = torch.cat([content, nuisance], -1)  # (L, B, N, D)
    moved = torch.cat([content + 0.2 * torch.randn(L, B, N, k, generator=g), nuisance @ Q.T], -1)
    perm = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])  # target cell of anchor i
    fb = torch.zeros(L, B, N, D)
    for b in range(B):
        fb[:, b, perm[b]] = moved[:, b]
    depth_b = torch.rand(B, N, generator=g) * 4 + 1
    batch = {"cell_mask_a": torch.ones(B, N, dtype=torch.bool), "cell_mask_b": torch.ones(B, N, dtype=torch.bool),
             "anchor_a": torch.arange(N).repeat(B, 1), "target_b": perm,
             "anchor_mask": torch.ones(B, N, dtype=torch.bool),
             "z_b": depth_b.gather(1, perm), "depth_b": depth_b, "depth_b_valid": torch.ones(B, N, dtype=torch.bool),
             "grid_a": torch.tensor([[R, C]] * B), "grid_b": torch.tensor([[R, C]] * B), "dt": torch.tensor([1, 3])}
    head = FusedCorrespondenceHead(L, D, head_dim=8)
    crit = GaspLoss(head)

    def evaluate() -> tuple[float, float, list[float]]:
        with torch.no_grad():
            _, parts = crit(fa, fb, batch)
            acc = MatchMetrics()
            acc.update(match_stats(similarities(head(fa), head(fb), 0.07), batch))
        return parts["nce"], parts["depth"], [d["pck1"] for d in acc.compute()["layers"]]

    nce0, depth0, pck0 = evaluate()
    opt = torch.optim.Adam(head.parameters(), lr=5e-2)
    for _ in range(60):
        loss, _ = crit(fa, fb, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    nce1, depth1, pck1 = evaluate()
    assert nce1 < 0.2 * nce0 and depth1 < 0.5 * depth0
    assert all(p < 0.5 for p in pck0) and all(p > 0.9 for p in pck1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_autocast_matches_cpu_float32():
    g = torch.Generator().manual_seed(0)
    L, B, Na, Nb, D = 6, 3, 40, 36, 128
    batch = random_batch(g, B, Na, Nb, 30, [30, 12, 0])
    fa, fb = torch.randn(L, B, Na, D, generator=g), torch.randn(L, B, Nb, D, generator=g)
    torch.manual_seed(0)
    head = FusedCorrespondenceHead(L, D, head_dim=64)
    ref, _ = GaspLoss(head)(fa, fb, batch)
    head_gpu = FusedCorrespondenceHead(L, D, head_dim=64).cuda()
    head_gpu.load_state_dict(head.state_dict())
    cuda_batch = {k: v.cuda() for k, v in batch.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, parts = GaspLoss(head_gpu)(fa.cuda().bfloat16(), fb.cuda().bfloat16(), cuda_batch)
    assert loss.dtype == torch.float32 and math.isfinite(parts["total"])
    assert abs(loss.item() - ref.item()) / ref.item() < 2e-2
    loss.backward()
    assert head_gpu.weight.grad.dtype == torch.float32 and torch.isfinite(head_gpu.weight.grad).all()


# ------------------------------------------------------------------ pair_loss_terms: the training path

def clip_case(seed: int, L: int = 3, F: int = 4, N: int = 12, d: int = 8, M: int = 7):
    """Per-frame features and a clip batch with every awkward label: padded cells, anchors out of range or
    repeated, shared targets, a frame without valid depth (a pair's B), a pair with no anchor, z_b <= 0."""
    g = torch.Generator().manual_seed(seed)
    pf = torch.tensor([[0, 1], [0, 2], [1, 3], [2, 3], [0, 3]])
    P = len(pf)
    b = {"pair_frames": pf, "cell_mask": torch.rand(F, N, generator=g) > 0.15,
         "depth": torch.rand(F, N, generator=g) * 3 + 0.5, "depth_valid": torch.rand(F, N, generator=g) > 0.3,
         "anchor_a": torch.randint(-1, N + 1, (P, M), generator=g),
         "target_b": torch.randint(0, N, (P, M), generator=g) % 5,  # few targets: shared ones
         "anchor_mask": torch.rand(P, M, generator=g) > 0.2, "z_b": torch.rand(P, M, generator=g) * 3 - 0.3}
    b["depth_valid"][3] = False
    b["anchor_mask"][4] = False
    f = torch.nn.functional.normalize(torch.randn(L, F, N, d, generator=g), dim=-1)
    return f, b


@pytest.mark.parametrize("form", ["relative", "log"])
def test_pair_loss_terms_equal_the_reference_in_values_and_gradients(form):
    """The chunked loss with its closed-form backward = autograd through gasp_loss_terms on all pairs'
    similarities at once, for one layer a chunk and all layers in one chunk."""
    from losses.gasp import pair_loss_terms, pair_similarities

    for seed in range(4):
        f0, batch = clip_case(seed)
        w = torch.randn(3, f0.shape[0], generator=torch.Generator().manual_seed(seed))
        f = f0.clone().requires_grad_()
        ref = gasp_loss_terms(pair_similarities(f, batch["pair_frames"], 0.07), batch, form)
        (grad_ref,) = torch.autograd.grad((w[0] * ref.nce_ab_sum + w[1] * ref.nce_ba_sum
                                          + w[2] * ref.depth_sum).sum(), f)
        assert grad_ref.abs().max() > 0
        for chunk_bytes in (1, 2 ** 40):
            got = pair_loss_terms(f, batch, 0.07, form, chunk_bytes=chunk_bytes)
            for a, b in ((got.nce_ab_sum, ref.nce_ab_sum), (got.nce_ba_sum, ref.nce_ba_sum),
                         (got.depth_sum, ref.depth_sum), (got.counts(), ref.counts())):
                assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), (seed, chunk_bytes)
            (grad,) = torch.autograd.grad((w[0] * got.nce_ab_sum + w[1] * got.nce_ba_sum
                                          + w[2] * got.depth_sum).sum(), f)
            assert (grad - grad_ref).abs().max() <= 1e-5 * grad_ref.abs().max(), (seed, chunk_bytes)


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_head_inside_the_chunks_equals_autograd_through_head_and_reference_loss(kind):
    """FusedCorrespondenceHead.forward(x, loss=...): the head recomputed per chunk in backward gives the
    reference loss's values and the gradients of x and of every head weight."""
    from losses.gasp import pair_similarities

    for seed in range(3):
        f0, batch = clip_case(seed)
        L, F, N, _ = f0.shape
        torch.manual_seed(seed)
        head = FusedCorrespondenceHead(L, 16, head_dim=8, kind=kind)
        x = torch.randn(L, F, N, 16).requires_grad_()
        w = torch.randn(3, L)
        ref = gasp_loss_terms(pair_similarities(head(x), batch["pair_frames"], 0.07), batch)
        want = torch.autograd.grad((w[0] * ref.nce_ab_sum + w[1] * ref.nce_ba_sum + w[2] * ref.depth_sum).sum(),
                                   [x, *head.weights])
        for chunk_bytes in (1, 2 ** 40):
            got = LossTerms.of(*head(x, loss=dict(batch=batch, tau=0.07, chunk_bytes=chunk_bytes)))
            assert torch.allclose(got.nce_ab_sum, ref.nce_ab_sum, rtol=1e-6, atol=1e-6)
            assert torch.allclose(got.depth_sum, ref.depth_sum, rtol=1e-6, atol=1e-6)
            assert torch.equal(got.counts(), ref.counts())
            grads = torch.autograd.grad((w[0] * got.nce_ab_sum + w[1] * got.nce_ba_sum + w[2] * got.depth_sum).sum(),
                                        [x, *head.weights])
            for g, r in zip(grads, want):
                assert r.abs().max() > 0 and (g - r).abs().max() <= 1e-5 * r.abs().max(), (seed, chunk_bytes)


def test_head_inside_the_chunks_without_input_gradient():
    """--trainable heads: the VLM's features need no gradient; only the head weights get one."""
    f0, batch = clip_case(0)
    L, F, N, _ = f0.shape
    head = FusedCorrespondenceHead(L, 16, head_dim=8, kind="mlp")
    x = torch.randn(L, F, N, 16)
    combine(LossTerms.of(*head(x, loss=dict(batch=batch))))[0].backward()
    assert head.w1.grad.abs().max() > 0 and head.w2.grad.abs().max() > 0


def test_pair_loss_terms_without_anchors_reach_the_features_with_zero_gradient():
    from losses.gasp import pair_loss_terms

    f0, batch = clip_case(0)
    batch["anchor_mask"][:] = False
    f = f0.clone().requires_grad_()
    loss, parts = combine(pair_loss_terms(f, batch))
    assert loss.item() == 0.0 and all(math.isfinite(v) for v in parts.values())
    loss.backward()
    assert f.grad is not None and f.grad.abs().max() == 0


def test_pair_loss_terms_bf16_features_give_float32_terms_and_bf16_gradient():
    from losses.gasp import pair_loss_terms

    f0, batch = clip_case(1)
    f = f0.bfloat16().requires_grad_()
    t = pair_loss_terms(f, batch)
    assert t.nce_ab_sum.dtype == torch.float32
    ref = pair_loss_terms(f0, batch)
    assert torch.allclose(t.nce_ab_sum, ref.nce_ab_sum, rtol=2e-2)
    combine(t)[0].backward()
    assert f.grad.dtype == torch.bfloat16 and f.grad.abs().max() > 0


def test_pair_loss_terms_hold_a_fraction_of_what_autograd_keeps():
    """The point of the chunked loss: at 8 layers its peak (forward + backward, beyond the features) is
    under a third of autograd's through the whole (L, P, N, N) similarities, every cell an anchor."""
    from conftest import cpu_peak_bytes
    from losses.gasp import pair_loss_terms, pair_similarities

    L, K, N, d = 8, 4, 40, 32
    g = torch.Generator().manual_seed(0)
    pf = torch.tensor([(i, j) for i in range(K) for j in range(i + 1, K)])
    P = len(pf)
    batch = {"pair_frames": pf, "cell_mask": torch.ones(K, N, dtype=torch.bool),
             "depth": torch.rand(K, N, generator=g) + 1, "depth_valid": torch.ones(K, N, dtype=torch.bool),
             "anchor_a": torch.stack([torch.randperm(N, generator=g) for _ in range(P)]),
             "target_b": torch.randint(0, N, (P, N), generator=g), "anchor_mask": torch.ones(P, N, dtype=torch.bool),
             "z_b": torch.rand(P, N, generator=g) + 1}
    f = torch.nn.functional.normalize(torch.randn(L, K, N, d, generator=g), dim=-1).requires_grad_()

    def chunked():
        combine(pair_loss_terms(f, batch, chunk_bytes=1))[0].backward()

    def whole():
        combine(gasp_loss_terms(pair_similarities(f, pf), batch))[0].backward()

    ours, ref = cpu_peak_bytes(chunked), cpu_peak_bytes(whole)
    print(f"peak {ours} vs {ref} bytes")
    assert 0 < ours < ref / 3, (ours, ref)
