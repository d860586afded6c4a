"""launch/probe.py: known features give known PCK, the tiny model end to end, one-line failures, MLflow.

The probe's numbers come from `losses.metrics` (tested there); what is tested here is the
probe's own work: every pair of the split scored once, raw and head scored from one
capture, the null rules reported with their reasons, the outputs, and the failures.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from launch.probe import main
from launch.probe_lib import ProbeArgs, ProbeError, format_table, run_probe
from model.head import FusedCorrespondenceHead, save_heads
from model.wrapper import GaspVLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L_TINY, D_TINY = 4, 64
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _flags(shards: str, out, *extra: str) -> list[str]:
    return ["--shards", shards, "--output", str(out), "--no-mlflow", "--num-workers", "0", *extra]


def _load(out) -> dict:
    with open(os.path.join(str(out), "probe.json")) as f:
        return json.load(f)


def _split_pairs(shards: str, split: str) -> int:
    from data.stream import resolve_source

    return resolve_source(shards, split).n_samples


def _identity_heads(path) -> str:
    """Heads with W_l = I (d = D = 64): f_l(x) = x / |x|, so the head keeps any alignment of x."""
    head = FusedCorrespondenceHead(L_TINY, D_TINY, head_dim=D_TINY)
    with torch.no_grad():
        head.weight.copy_(torch.eye(D_TINY).expand(L_TINY, D_TINY, D_TINY))
    save_heads(path, head, meta={"model": "tiny", "family": "qwen2_vl", "tau": 0.07})
    return str(path)


# ------------------------------------------------------------------ features that are known

def _aligned_capture(self, batch, model_inputs):
    """feat_b: one-hot per cell of B; each anchor of A = its target's vector; a random rotation per layer.

    Cosine of an anchor with its target is 1 and with every other cell of B 0, in every
    layer (the rotation is orthogonal), so the argmax cell IS the target: PCK@0 = 1.
    """
    L, D = self.num_layers, self.hidden_size
    B, Na = batch["cell_pos_a"].shape
    Nb = batch["cell_pos_b"].shape[1]
    assert Nb <= D, "one-hot cells need D >= cells of B"
    g = torch.Generator().manual_seed(Na * 1000 + Nb)
    fb = torch.eye(D)[:Nb].expand(B, Nb, D).clone()  # (B, Nb, D)
    fa = torch.randn(B, Na, D, generator=g)  # (B, Na, D): non-anchor cells are anything
    anchors = batch["anchor_mask"].nonzero().tolist()
    for b, m in anchors:
        fa[b, batch["anchor_a"][b, m]] = fb[b, batch["target_b"][b, m]]
    Q = torch.linalg.qr(torch.randn(L, D, D, generator=g))[0]  # (L, D, D) orthogonal
    return fa[None] @ Q[:, None], fb[None] @ Q[:, None]  # (L, B, Na, D), (L, B, Nb, D)


def _positional_capture(self, batch, model_inputs):
    """Features that know only the grid position: cell k of A and cell k of B get the same one-hot e_k."""
    L, D = self.num_layers, self.hidden_size
    B, Na = batch["cell_pos_a"].shape
    Nb = batch["cell_pos_b"].shape[1]
    assert torch.equal(batch["grid_a"], batch["grid_b"]), "the tiny shards' views share one grid"
    eye = torch.eye(D)
    return eye[:Na].expand(L, B, Na, D), eye[:Nb].expand(L, B, Nb, D)


def _random_capture_factory(seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def capture(self, batch, model_inputs):
        L, D = self.num_layers, self.hidden_size
        B, Na = batch["cell_pos_a"].shape
        Nb = batch["cell_pos_b"].shape[1]
        return torch.randn(L, B, Na, D, generator=g), torch.randn(L, B, Nb, D, generator=g)

    return capture


def test_aligned_features_give_pck_one_in_every_layer(tiny_shards, tmp_path, monkeypatch):
    """Through identity heads (W_l = I keeps the alignment; the SVD init would also map equal inputs to
    equal outputs, but identity heads make the expected value exact by construction)."""
    monkeypatch.setattr(GaspVLM, "capture", _aligned_capture)
    heads = _identity_heads(tmp_path / "eye.safetensors")
    assert main(_flags(tiny_shards, tmp_path / "out", "--heads", heads)) == 0
    res = _load(tmp_path / "out")
    assert res["heads"]["kind"] == "trained"
    assert res["data"]["anchors"] > 50
    for name in ("raw", "head"):
        layers = res[name]["layers"]
        assert len(layers) == L_TINY
        for d in layers:
            assert d["pck0"] == 1.0 and d["pck1"] == 1.0, (name, d)
            # every anchor right: the correlation is null by DESIGN §6, and the reason says why
            assert d["conf_acc_corr"] is None
            assert "constant" in d["conf_acc_corr_null_reason"]
        assert res[name]["chance1"] < 0.5  # PCK 1 is far from chance here
    assert res["best"]["head"]["pck1"] == 1.0


def test_positional_features_score_the_same_cell_baseline(tiny_shards, tmp_path, monkeypatch):
    """A feature that encodes only position scores exactly the reported "no motion" baseline."""
    monkeypatch.setattr(GaspVLM, "capture", _positional_capture)
    assert main(_flags(tiny_shards, tmp_path / "out", "--no-head")) == 0
    res = _load(tmp_path / "out")
    base = res["baselines"]["same_cell"]
    for d in res["raw"]["layers"]:
        assert d["pck0"] == pytest.approx(base["pck0"]) and d["pck1"] == pytest.approx(base["pck1"])
    assert base["pck1"] > res["chance"]["pck1"]


def test_random_features_give_chance(tiny_shards, tmp_path, monkeypatch):
    monkeypatch.setattr(GaspVLM, "capture", _random_capture_factory(seed=0))
    assert main(_flags(tiny_shards, tmp_path / "out", "--split", "train")) == 0
    res = _load(tmp_path / "out")
    K = res["data"]["anchors"]
    assert K > 150
    for name in ("raw", "head"):
        r = res[name]
        for k in ("0", "1"):
            c = r[f"chance{k}"]
            sigma = math.sqrt(c * (1 - c) / K)
            vals = [d[f"pck{k}"] for d in r["layers"]]
            for v in vals:  # each layer: its own random draw
                assert abs(v - c) <= 4.5 * sigma + 1e-9, (name, k, vals, c, sigma)
            mean = sum(vals) / len(vals)  # the layers are independent draws: the mean is tighter
            assert abs(mean - c) <= 4.0 * sigma / math.sqrt(len(vals)) + 1e-9, (name, k, mean, c)
        assert res["chance"]["pck1"] == r["chance1"]


# ------------------------------------------------------------------ the tiny model, end to end

@pytest.fixture(scope="module")
def svd_run(tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe_svd")
    lines: list[str] = []
    args = ProbeArgs(shards=[tiny_shards], output=str(out), mlflow=False, num_workers=0, batch_size=4,
                     progress_every=1e-6)
    result = run_probe(args, emit=lines.append)
    return out, result, lines


def _in_unit(x) -> bool:
    return x is None or (0.0 <= x <= 1.0)


def test_end_to_end_without_heads(svd_run, tiny_shards):
    out, result, lines = svd_run
    # the library's return value is what probe.json holds
    assert json.loads(json.dumps(result)) == _load(out)
    for name in ("probe.json", "probe_table.txt", "pck_by_layer.png", "pck_by_gap.png", "conf_vs_acc.png",
                 "conf_vs_acc_raw.png"):
        path = os.path.join(out, name)
        assert os.path.isfile(path) and os.path.getsize(path) > 0, name
        if name.endswith(".png"):
            with open(path, "rb") as f:
                assert f.read(8) == PNG_MAGIC
    assert set(result["plots"]) == {"pck_by_layer", "pck_by_gap", "conf_vs_acc", "conf_vs_acc_raw"}
    # every val pair exactly once (6 pairs with batch 4: the stream alone would give 4 or 8)
    n_val = _split_pairs(tiny_shards, "val")
    assert result["data"]["pairs"] == n_val == result["shards"]["sources"][0]["pairs_scored"]
    assert result["data"]["coverage"] == 1.0
    assert all(_in_unit(result["baselines"]["same_cell"][k]) for k in ("pck0", "pck1"))
    # provenance
    assert result["schema"] == "gasp-probe/1"
    assert result["config"]["shards"] == [tiny_shards] and result["config"]["split"] == "val"
    assert result["model"] == {**result["model"], "source": "tiny", "kind": "preset", "family": "qwen2_vl",
                               "num_layers": L_TINY, "hidden_size": D_TINY, "device": "cpu", "dtype": "fp32"}
    assert result["heads"]["kind"] == "svd_init" and result["heads"]["file"] is None
    assert "untrained" in result["heads"]["note"].lower()
    assert result["shards"]["gap_buckets"] == [1, 5, 15] and result["shards"]["gap_buckets_from"] == "plan.json"
    # shapes and ranges
    K = result["data"]["anchors"]
    for name in ("raw", "head"):
        r = result[name]
        assert len(r["layers"]) == L_TINY and r["n_anchors"] == K
        assert [d["layer"] for d in r["layers"]] == list(range(L_TINY))
        for d in r["layers"]:
            for key in ("pck0", "pck1", "chance0", "chance1"):
                assert _in_unit(d[key]), (name, key, d[key])
            assert d["pck0"] <= d["pck1"]
            assert d["conf_acc_corr"] is None or -1.0 <= d["conf_acc_corr"] <= 1.0
            assert len(d["pck1_by_gap"]) == 3 and all(_in_unit(v) for v in d["pck1_by_gap"])
            # a few dozen anchors per bucket: the 200-anchor rule makes it null, with the reason
            assert d["temporal_robustness"] is None
            assert "< 200" in d["temporal_robustness_null_reason"]
        assert sum(r["gap_buckets"]["counts"]) + r["gap_buckets"]["unbucketed"] == K
        assert r["best_layer"] in range(L_TINY)
        assert r["best_pck1"] == max(d["pck1"] for d in r["layers"])
    # the table: one row per layer, chance, best layer, temporal robustness, anchors per bucket
    table = open(os.path.join(out, "probe_table.txt")).read()
    assert "UNTRAINED" in table and "SVD" in table
    rows = [ln for ln in table.splitlines() if ln.strip()[:1].isdigit() and "PCK" not in ln]
    assert len(rows) == L_TINY
    for key in ("chance:", "best layer (head)", "best layer (raw)", "temporal robustness (head", "null (",
                "anchors per gap bucket: 1-4:", "15+:"):
        assert key in table, key
    # progress: pairs done / total, rate, ETA
    prog = [ln for ln in lines if "pairs/s" in ln]
    assert prog and f"{n_val}/{n_val} pairs" in prog[-1] and "done" in prog[-1]
    assert any("ETA" in ln for ln in prog) or len(prog) == 1


def test_end_to_end_with_heads_file(svd_run, tiny_shards, tmp_path, capsys):
    _, svd, _ = svd_run
    torch.manual_seed(3)
    heads = tmp_path / "export" / "heads.safetensors"
    save_heads(heads, FusedCorrespondenceHead(L_TINY, D_TINY), meta={"model": "tiny", "step": 7, "tau": 0.1})
    out = tmp_path / "out"
    # the export folder is accepted for the file it holds
    assert main(_flags(tiny_shards, out, "--heads", str(heads.parent))) == 0
    res = _load(out)
    h = res["heads"]
    assert h["kind"] == "trained" and h["file"] == str(heads) and len(h["sha256"]) == 64
    assert h["meta"]["step"] == 7 and (h["meta"]["L"], h["meta"]["d"], h["meta"]["D"]) == (L_TINY, 64, D_TINY)
    assert res["tau"] == {"raw": 0.07, "head": 0.1}  # the heads' own temperature for their confidences
    assert len(res["head"]["layers"]) == L_TINY
    # same pairs, same raw features: the raw columns do not depend on the heads
    assert [d["pck1"] for d in res["raw"]["layers"]] == [d["pck1"] for d in svd["raw"]["layers"]]
    assert res["data"]["anchors"] == svd["data"]["anchors"]
    # random heads are not the SVD ones
    assert [d["pck1"] for d in res["head"]["layers"]] != [d["pck1"] for d in svd["head"]["layers"]]
    stdout = capsys.readouterr().out
    assert str(heads) in stdout and "UNTRAINED" not in stdout
    assert os.path.isfile(out / "conf_vs_acc.png")


def test_raw_only_and_max_pairs(tiny_shards, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_flags(tiny_shards, out, "--no-head", "--max-pairs", "3", "--batch-size", "2")) == 0
    res = _load(out)
    assert res["head"] is None and res["heads"]["kind"] == "none" and res["best"]["head"] is None
    assert res["data"]["pairs"] == 3 and res["data"]["max_pairs"] == 3
    assert len(res["raw"]["layers"]) == L_TINY
    table = capsys.readouterr().out
    assert "head PCK" not in table and "raw PCK@1" in table and "--no-head" in table
    assert set(res["plots"]) == {"pck_by_layer", "pck_by_gap", "conf_vs_acc"}


def test_table_format_handles_no_anchors():
    """A run with no anchors prints n/a everywhere instead of failing."""
    empty = {"n_anchors": 0, "chance0": None, "chance1": None, "best_layer": None, "best_pck1": None,
             "gap_buckets": {"edges": [1, 5], "labels": ["1-4", "5+"], "counts": [0, 0], "chance1": [None, None],
                             "unbucketed": 0}, "layers": []}
    result = {"name": "x", "raw": empty, "head": None,
              "model": {"kind": "preset", "source": "tiny", "family": "qwen2_vl", "num_layers": 4,
                        "hidden_size": 64, "dtype": "fp32", "device": "cpu"},
              "heads": {"kind": "none"}, "shards": {"split": "val", "sources": [{"spec": "s"}],
                                                    "gap_buckets_from": "default"},
              "data": {"pairs": 0, "anchors": 0, "max_pairs": None}, "chance": {"pck0": None, "pck1": None},
              "best": {"raw": {"layer": None, "pck0": None, "pck1": None, "conf_acc_corr": None,
                               "temporal_robustness": None,
                               "temporal_robustness_null_reason": "no anchors scored"}, "head": None}}
    table = format_table(result)
    assert "(no anchors scored)" in table and "n/a" in table


# ------------------------------------------------------------------ one-line failures, before heavy work

@pytest.fixture
def no_model_build(monkeypatch):
    """Building the model is the heavy part: these failures must come before it."""
    import model.loading

    def refuse(*a, **k):
        raise AssertionError("the model was built before the inputs were checked")

    monkeypatch.setattr(model.loading, "build_model_and_processor", refuse)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("launch/probe.py: error: ")
    return lines[0]


def test_heads_of_another_shape_fail_in_one_line(tiny_shards, tmp_path, capsys, no_model_build):
    bad = tmp_path / "heads3.safetensors"
    save_heads(bad, FusedCorrespondenceHead(3, D_TINY), meta={"model": "somewhere-else"})
    assert main(_flags(tiny_shards, tmp_path / "out", "--heads", str(bad))) == 2
    line = _one_line_error(capsys)
    assert "L=3" in line and "L=4" in line and "do not fit" in line
    assert not os.path.exists(tmp_path / "out")


def test_unsupported_family_fails_in_one_line(tiny_shards, tmp_path, capsys, no_model_build):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    folder = tmp_path / "llama"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(_flags(tiny_shards, tmp_path / "out", "--model", str(folder))) == 2
    line = _one_line_error(capsys)
    assert "'llama'" in line and "not supported" in line
    # the same from a shell: exit status 2 and exactly one line on stderr (no warnings, no traceback)
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "probe.py"), "--model", str(folder),
                           "--shards", tiny_shards, "--no-mlflow"], capture_output=True, text=True, cwd=str(tmp_path),
                          env=env, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "not supported" in proc.stderr


@pytest.mark.parametrize("shards", ["missing-folder", "missing/manifest.json", "missing/val-000000.tar"])
def test_missing_shards_fail_in_one_line(tmp_path, capsys, no_model_build, shards):
    assert main(_flags(str(tmp_path / shards), tmp_path / "out")) == 2
    line = _one_line_error(capsys)
    assert "--shards" in line


def test_contradictory_flags_fail_in_one_line(tiny_shards, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--shards", tiny_shards, "--heads", "x.safetensors", "--no-head"])
    assert e.value.code == 2
    assert "contradict" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--preset", "tiny"])  # no --shards
    assert "--shards is required" in capsys.readouterr().err
    with pytest.raises(ProbeError, match="unknown --preset"):
        run_probe(ProbeArgs(preset="nope", shards=[tiny_shards], mlflow=False))


# ------------------------------------------------------------------ MLflow

def test_mlflow_run_holds_metrics_and_plots(tiny_shards, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the sqlite store's default artifact root is ./mlruns
    out = tmp_path / "out"
    rc = main(["--shards", tiny_shards, "--output", str(out), "--num-workers", "0", "--max-pairs", "4",
               "--experiment", "probe-test", "--run-name", "tiny-probe"])
    assert rc == 0
    res = _load(out)
    run_id = res["mlflow"]["run_id"]
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-probe"
    assert client.get_experiment(run.info.experiment_id).name == "probe-test"
    metrics = run.data.metrics
    for name in ("raw", "head"):
        for l in range(L_TINY):
            for k in ("pck0", "pck1"):
                key = f"probe/{name}/{k}/layer_{l:02d}"
                assert metrics[key] == pytest.approx(res[name]["layers"][l][k]), key
        assert metrics[f"probe/{name}/chance1"] == pytest.approx(res[name]["chance1"])
        # PCK@1 per gap bucket per layer; MLflow refuses '+', so the open bucket '15+' is '15plus'
        assert metrics[f"probe/{name}/pck1_gap_15plus/layer_00"] == pytest.approx(
            res[name]["layers"][0]["pck1_by_gap"][2])
        # the per-layer series (step = layer index) for MLflow's charts
        hist = client.get_metric_history(run_id, f"probe/{name}/pck1_by_layer")
        assert sorted(m.step for m in hist) == list(range(L_TINY))
    assert run.data.params["heads.kind"] == "svd_init" and run.data.params["preset"] == "tiny"
    assert run.data.tags["kind"] == "probe"
    plots = {os.path.basename(a.path) for a in client.list_artifacts(run_id, "plots")}
    assert {"pck_by_layer.png", "pck_by_gap.png", "conf_vs_acc.png"} <= plots
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"probe.json", "probe_table.txt"} <= top
