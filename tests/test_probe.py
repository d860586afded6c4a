"""launch/probe.py: known features give known PCK, the tiny model end to end, one-line failures, MLflow.

The probe's numbers come from `losses.metrics` (tested there); what is tested here is the
probe's own work: every clip of the split scored once, raw and head scored from one
capture, the null rules reported with their reasons, the layer choice on another split, the
three panels and --compare, the outputs, and the failures.
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


def _split_clips(shards: str, split: str) -> int:
    from data.stream import resolve_source

    return resolve_source(shards, split).n_samples


def _identity_heads(path) -> str:
    """Heads with W_l = I (d = D = 64): f_l(x) = x / |x|, so the head keeps any alignment of x."""
    head = FusedCorrespondenceHead(L_TINY, D_TINY, head_dim=D_TINY)
    with torch.no_grad():
        head.weight.copy_(torch.eye(D_TINY).expand(L_TINY, D_TINY, D_TINY))
    save_heads(path, head, meta={"model": "tiny", "family": "qwen2_vl", "tau": 0.07})
    return str(path)


@pytest.fixture(scope="module")
def pair_shards(tiny_corpus, tmp_path_factory) -> str:
    """Clips of two frames (one supervised pair each), dt 1..15: what the aligned-feature test needs."""
    from conftest import build_shards

    out = str(tmp_path_factory.mktemp("pair_shards"))
    build_shards(tiny_corpus, out, clip_frames=2, clip_window=16, clips_per_scene=6, samples_per_shard=4,
                 max_side=160, val_fraction=0.34)
    return out


# ------------------------------------------------------------------ features that are known

def _aligned_capture(self, batch, model_inputs):
    """Per-frame features for clips of two frames: frame B one-hot per cell; each anchor of frame A = its
    target's vector; a random rotation per layer. Cosine of an anchor with its target is 1 and with every
    other cell of B 0, in every layer, so the argmax cell IS the target: PCK = 1 at every dt."""
    L, D = self.num_layers, self.hidden_size
    F, N = batch["cell_pos"].shape
    assert N <= D, "one-hot cells need D >= cells of B"
    g = torch.Generator().manual_seed(F * 1000 + N)
    f = torch.randn(F, N, D, generator=g)  # (F, N, D): cells of A that are no anchor are anything
    for p, (a, b) in enumerate(batch["pair_frames"].tolist()):
        assert b == a + 1, "clips of two frames: one pair (0, 1) each"
        f[b] = torch.eye(D)[:N]
        for m in batch["anchor_mask"][p].nonzero().squeeze(1).tolist():
            f[a, batch["anchor_a"][p, m]] = f[b, batch["target_b"][p, m]]
    Q = torch.linalg.qr(torch.randn(L, D, D, generator=g))[0]  # (L, D, D) orthogonal
    return f[None] @ Q[:, None]  # (L, F, N, D)


def _positional_capture(self, batch, model_inputs):
    """Features that know only the grid position: cell k of every frame gets the same one-hot e_k."""
    L, D = self.num_layers, self.hidden_size
    F, N = batch["cell_pos"].shape
    assert (batch["grid"] == batch["grid"][0]).all(), "the tiny shards' views share one grid"
    return torch.eye(D)[:N].expand(L, F, N, D)


def _random_capture_factory(seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def capture(self, batch, model_inputs):
        F, N = batch["cell_pos"].shape
        return torch.randn(self.num_layers, F, N, self.hidden_size, generator=g)

    return capture


def test_aligned_features_give_pck_one_in_every_layer_and_a_flat_curve(pair_shards, tmp_path, monkeypatch):
    """Through identity heads (W_l = I keeps the alignment exactly): PCK@0 = PCK@1 = PCK@2patch = 1 in every
    layer, and the normalised temporal curve is 1 at every frame distance present."""
    monkeypatch.setattr(GaspVLM, "capture", _aligned_capture)
    heads = _identity_heads(tmp_path / "eye.safetensors")
    assert main(_flags(pair_shards, tmp_path / "out", "--heads", heads, "--split", "train")) == 0
    res = _load(tmp_path / "out")
    assert res["heads"]["kind"] == "trained" and res["heads"]["head"] == "linear"
    assert res["data"]["anchors"] > 50
    for name in ("raw", "head"):
        layers = res[name]["layers"]
        assert len(layers) == L_TINY
        for d in layers:
            assert d["pck0"] == d["pck1"] == d["pck2patch"] == 1.0, (name, d)
            # every anchor right: the correlation is null by DESIGN §6, and the reason says why
            assert d["conf_acc_corr"] is None and "constant" in d["conf_acc_corr_null_reason"]
            curve = d["temporal"]["synthetic"]
            assert len(curve["dt"]) >= 4 and curve["normalised"] == [1.0] * len(curve["dt"])
        assert res[name]["chance2"] < 0.6  # PCK 1 is far from chance here
    assert res["best"]["head"]["pck2patch"] == 1.0


def test_positional_features_score_the_same_cell_baseline(tiny_shards, tmp_path, monkeypatch):
    """A feature that encodes only position scores exactly the reported "no motion" baseline."""
    monkeypatch.setattr(GaspVLM, "capture", _positional_capture)
    assert main(_flags(tiny_shards, tmp_path / "out", "--no-head", "--split", "train")) == 0
    res = _load(tmp_path / "out")
    base = res["baselines"]["same_cell"]
    for d in res["raw"]["layers"]:
        for k in ("pck0", "pck1", "pck2patch"):
            assert d[k] == pytest.approx(base[k]), k
    assert base["pck2patch"] > res["chance"]["pck2patch"]


def test_shuffled_features_give_chance(tiny_shards, tmp_path, monkeypatch):
    monkeypatch.setattr(GaspVLM, "capture", _random_capture_factory(seed=0))
    assert main(_flags(tiny_shards, tmp_path / "out", "--split", "train")) == 0
    res = _load(tmp_path / "out")
    K = res["data"]["anchors"]
    assert K > 150
    for name in ("raw", "head"):
        r = res[name]
        for k, c_key in (("pck0", "chance0"), ("pck1", "chance1"), ("pck2patch", "chance2")):
            c = r[c_key]
            sigma = math.sqrt(c * (1 - c) / K)
            vals = [d[k] for d in r["layers"]]
            for v in vals:  # each layer: its own random draw
                assert abs(v - c) <= 4.5 * sigma + 1e-9, (name, k, vals, c, sigma)
            mean = sum(vals) / len(vals)  # the layers are independent draws: the mean is tighter
            assert abs(mean - c) <= 4.0 * sigma / math.sqrt(len(vals)) + 1e-9, (name, k, mean, c)
        assert res["chance"]["pck2patch"] == r["chance2"]


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
    for name in ("probe.json", "probe_table.txt", "three_panels.png", "pck_by_layer.png", "conf_vs_acc.png"):
        path = os.path.join(out, name)
        assert os.path.isfile(path) and os.path.getsize(path) > 0, name
        if name.endswith(".png"):
            with open(path, "rb") as f:
                assert f.read(8) == PNG_MAGIC
    assert set(result["plots"]) == {"three_panels", "pck_by_layer", "conf_vs_acc"}
    # every val clip exactly once (with batch 4 the stream alone would give a multiple of 4)
    n_val = _split_clips(tiny_shards, "val")
    assert result["data"]["clips"] == n_val == result["shards"]["sources"][0]["clips_scored"]
    assert result["data"]["coverage"] == 1.0 and result["data"]["pairs"] >= n_val
    assert all(_in_unit(result["baselines"]["same_cell"][k]) for k in ("pck0", "pck1", "pck2patch"))
    # provenance
    assert result["schema"] == "gasp-probe/2"
    assert result["config"]["shards"] == [tiny_shards] and result["config"]["split"] == "val"
    assert result["model"] == {**result["model"], "source": "tiny", "kind": "preset", "family": "qwen2_vl",
                               "num_layers": L_TINY, "hidden_size": D_TINY, "device": "cpu", "dtype": "fp32"}
    assert result["heads"]["kind"] == "svd_init" and result["heads"]["file"] is None
    assert result["heads"]["head"] == "mlp" and "untrained" in result["heads"]["note"].lower()
    # shapes and ranges
    K = result["data"]["anchors"]
    for name in ("raw", "head"):
        r = result[name]
        assert len(r["layers"]) == L_TINY and r["n_anchors"] == K
        assert [d["layer"] for d in r["layers"]] == list(range(L_TINY))
        for d in r["layers"]:
            for key in ("pck0", "pck1", "pck2patch"):
                assert _in_unit(d[key]), (name, key, d[key])
            assert d["pck0"] <= d["pck1"] <= d["pck2patch"]  # Chebyshev 1 lies within Euclidean 2
            assert d["conf_acc_corr"] is None or -1.0 <= d["conf_acc_corr"] <= 1.0
            curve = d["temporal"]["synthetic"]
            assert curve["dt"] == sorted(curve["dt"]) and sum(curve["n"]) == K
            # a few dozen anchors per frame distance: the 200-anchor rule makes it null, with the reason
            assert curve["robustness"] is None and "fewer than 200 anchors" in curve["robustness_null_reason"]
        assert r["best_layer"] in range(L_TINY)
        assert r["best_pck2patch"] == max(d["pck2patch"] for d in r["layers"])
    sel = result["selected"]["head"]
    assert sel["chosen_on"] == "this split" and sel["layer"] == result["head"]["best_layer"]
    # the table: one row per layer, chance, the same-cell baseline, reported layers, temporal robustness
    table = open(os.path.join(out, "probe_table.txt")).read()
    assert "UNTRAINED" in table and "SVD" in table
    rows = [ln for ln in table.splitlines() if ln.strip()[:1].isdigit() and "PCK" not in ln]
    assert len(rows) == L_TINY
    for key in ("chance:", "PCK@2patch", "same-cell baseline", "reported layer (head)", "chosen on this split",
                "temporal robustness (head, synthetic", "null (", "normalised PCK@2patch by dt"):
        assert key in table, key
    # progress: clips done / total, rate, ETA
    prog = [ln for ln in lines if "clips/s" in ln]
    assert prog and f"{n_val}/{n_val} clips" in prog[-1] and "done" in prog[-1]


def test_end_to_end_with_heads_file(svd_run, tiny_shards, tmp_path, capsys):
    _, svd, _ = svd_run
    torch.manual_seed(3)
    heads = tmp_path / "export" / "heads.safetensors"
    save_heads(heads, FusedCorrespondenceHead(L_TINY, D_TINY, kind="mlp"),
               meta={"model": "tiny", "step": 7, "tau": 0.1})
    out = tmp_path / "out"
    # the export folder is accepted for the file it holds
    assert main(_flags(tiny_shards, out, "--heads", str(heads.parent))) == 0
    res = _load(out)
    h = res["heads"]
    assert h["kind"] == "trained" and h["head"] == "mlp" and h["file"] == str(heads) and len(h["sha256"]) == 64
    assert h["meta"]["step"] == 7 and (h["meta"]["L"], h["meta"]["d"], h["meta"]["D"]) == (L_TINY, 64, D_TINY)
    assert res["tau"] == {"raw": 0.07, "head": 0.1}  # the heads' own temperature for their confidences
    assert len(res["head"]["layers"]) == L_TINY
    # same clips, same raw features: the raw columns do not depend on the heads
    assert [d["pck2patch"] for d in res["raw"]["layers"]] == [d["pck2patch"] for d in svd["raw"]["layers"]]
    assert res["data"]["anchors"] == svd["data"]["anchors"]
    # random heads are not the SVD ones
    assert [d["pck2patch"] for d in res["head"]["layers"]] != [d["pck2patch"] for d in svd["head"]["layers"]]
    stdout = capsys.readouterr().out
    assert str(heads) in stdout and "UNTRAINED" not in stdout


def test_raw_only_max_clips_and_pairs_per_clip(tiny_shards, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_flags(tiny_shards, out, "--no-head", "--max-clips", "3", "--batch-size", "2",
                       "--pairs-per-clip", "1", "--split", "train")) == 0
    res = _load(out)
    assert res["head"] is None and res["heads"]["kind"] == "none" and res["best"]["head"] is None
    assert res["data"]["clips"] == 3 and res["data"]["max_clips"] == 3 and res["data"]["pairs"] == 3
    assert len(res["raw"]["layers"]) == L_TINY
    table = capsys.readouterr().out
    assert "head PCK" not in table and "raw PCK@2p" in table and "--no-head" in table
    assert set(res["plots"]) == {"three_panels", "pck_by_layer", "conf_vs_acc"}


def test_layer_from_another_split_and_compare_overlay(svd_run, tiny_shards, tmp_path, monkeypatch):
    """--layer-from: the val probe's best layers are the ones a test-split (here: train) probe reports;
    --compare: the other run's curves are overlaid in the three panels (one more bar per layer)."""
    import matplotlib

    val_out, val, _ = svd_run
    out = tmp_path / "train"
    drawn = {}
    from launch import plots

    real = plots.three_panels

    def spy(runs, path, **kw):
        drawn.update(runs)
        return real(runs, path, **kw)

    monkeypatch.setattr(plots, "three_panels", spy)
    assert main(_flags(tiny_shards, out, "--split", "train", "--layer-from", str(val_out), "--compare",
                       str(val_out / "probe.json"), "--run-name", "train-probe")) == 0
    res = _load(out)
    for kind in ("raw", "head"):
        sel = res["selected"][kind]
        assert sel["layer"] == val[kind]["best_layer"] and "(val split)" in sel["chosen_on"]
        assert res["best"][kind]["layer"] == val[kind]["best_layer"]
        assert res["best"][kind]["pck2patch"] == res[kind]["layers"][sel["layer"]]["pck2patch"]
    assert set(drawn) == {"train-probe", val["name"]} and res["compare"] == [val["name"]]
    img = matplotlib.image.imread(os.path.join(out, "three_panels.png"))
    assert img.shape[1] > 2.5 * img.shape[0]  # three panels side by side
    # a probe.json of another schema is refused in one line before the model is built
    bad = tmp_path / "old.json"
    bad.write_text(json.dumps({"schema": "gasp-probe/1"}))
    with pytest.raises(ProbeError, match="gasp-probe/2"):
        run_probe(ProbeArgs(shards=[tiny_shards], compare=[str(bad)], mlflow=False))


def test_table_format_handles_no_anchors():
    """A run with no anchors prints n/a everywhere instead of failing."""
    from losses.metrics import MatchMetrics

    empty = MatchMetrics().compute()
    result = {"name": "x", "raw": empty, "head": None,
              "model": {"kind": "preset", "source": "tiny", "family": "qwen2_vl", "num_layers": 4,
                        "hidden_size": 64, "dtype": "fp32", "device": "cpu"},
              "heads": {"kind": "none"}, "shards": {"split": "val", "sources": [{"spec": "s"}]},
              "data": {"clips": 0, "pairs": 0, "anchors": 0, "max_clips": None},
              "chance": {"pck0": None, "pck1": None, "pck2patch": None},
              "baselines": {"same_cell": {"pck0": None, "pck1": None, "pck2patch": None}},
              "selected": {"raw": {"layer": None, "chosen_on": "this split"}, "head": None},
              "best": {"raw": {"layer": None, "pck0": None, "pck1": None, "pck2patch": None, "conf_acc_corr": None,
                               "conf_acc_corr_null_reason": "no anchors scored", "temporal": {}}, "head": None}}
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
    rc = main(["--shards", tiny_shards, "--output", str(out), "--num-workers", "0", "--max-clips", "4",
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
            for k in ("pck0", "pck1", "pck2patch"):
                key = f"probe/{name}/{k}/layer_{l:02d}"
                assert metrics[key] == pytest.approx(res[name]["layers"][l][k]), key
        assert metrics[f"probe/{name}/chance2"] == pytest.approx(res[name]["chance2"])
        assert metrics[f"probe/{name}/same_cell/pck2patch"] == pytest.approx(res[name]["same_cell"]["pck2patch"])
        # the per-layer series (step = layer index) and the temporal curve (step = dt) for MLflow's charts
        hist = client.get_metric_history(run_id, f"probe/{name}/pck2patch_by_layer")
        assert sorted(m.step for m in hist) == list(range(L_TINY))
        curve = res[name]["layers"][res["selected"][name]["layer"]]["temporal"]["synthetic"]
        hist = client.get_metric_history(run_id, f"probe/{name}/norm_pck2_by_dt/synthetic")
        assert sorted(m.step for m in hist) == [d for d, v in zip(curve["dt"], curve["normalised"]) if v is not None]
    assert run.data.params["heads.kind"] == "svd_init" and run.data.params["preset"] == "tiny"
    assert run.data.tags["kind"] == "probe"
    plots = {os.path.basename(a.path) for a in client.list_artifacts(run_id, "plots")}
    assert {"three_panels.png", "pck_by_layer.png", "conf_vs_acc.png"} <= plots
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"probe.json", "probe_table.txt"} <= top


def test_lm_retention_on_held_out_conversations_equals_the_models_own_loss(tiny_shards, tiny_instruct_shards, tmp_path,
                                                                          capsys):
    """--lm-shards: mean LM loss and next-token accuracy over the answer tokens of the val conversations, as the
    trainer's val/lm computes them; the loss equals the model's own `labels=` loss weighted by each batch's
    labelled positions (an independent computation), and lands in probe.json and the table."""
    from data.stream import SampleStream
    from model.loading import build_model_and_processor

    out = tmp_path / "out"
    assert main(_flags(tiny_shards, out, "--no-head", "--max-clips", "2", "--batch-size", "2",
                       "--lm-shards", tiny_instruct_shards)) == 0
    lm = _load(out)["lm_retention"]
    assert lm["tokens"] > 0 and lm["samples"] > 0 and 0.0 <= lm["accuracy"] <= 1.0 and lm["split"] == "val"
    assert "LM retention (val)" in capsys.readouterr().out

    model, _, adapter = build_model_and_processor("tiny")
    model.eval()
    total = n = samples = 0
    with torch.no_grad():
        for batch in SampleStream([tiny_instruct_shards], adapter, batch_size=2, rank=0, world_size=1, num_workers=0,
                                  seed=0, split="val", video_frames=16):
            samples += len(batch["keys"])
            k = int((batch["labels"][:, 1:] != -100).sum())
            loss = model(**adapter.model_inputs(batch), labels=batch["labels"]).loss
            total, n = total + float(loss) * k, n + k
    assert samples == lm["samples"] and n == lm["tokens"]
    assert lm["loss"] == pytest.approx(total / n, rel=1e-5)


def test_lm_retention_scores_a_held_out_set_smaller_than_one_batch(tiny_shards, tiny_instruct_shards, tmp_path):
    """--batch-size above the number of val conversations: all of them are scored in one smaller batch (it
    failed with a traceback: 'N samples make no full batch')."""
    from data.stream import resolve_source

    held_out = resolve_source(tiny_instruct_shards, "val").n_samples
    out = tmp_path / "out"
    assert main(_flags(tiny_shards, out, "--no-head", "--max-clips", "2", "--batch-size", str(held_out + 5),
                       "--lm-shards", tiny_instruct_shards)) == 0
    lm = _load(out)["lm_retention"]
    assert lm["samples"] == held_out and lm["tokens"] > 0


def test_lm_shards_of_clips_fail_in_one_line(tiny_shards, tmp_path, capsys, no_model_build):
    assert main(_flags(tiny_shards, tmp_path / "out", "--lm-shards", tiny_shards)) == 2
    line = _one_line_error(capsys)
    assert "--lm-shards" in line and "not conversations" in line


@pytest.mark.parametrize("flag, value, want", [("--lm-batches", "-1", "--lm-batches must be >= 0"),
                                               ("--video-frames", "0", "--video-frames must be >= 1")])
def test_lm_retention_flags_are_checked_in_one_line(tiny_shards, tmp_path, capsys, flag, value, want):
    with pytest.raises(SystemExit) as e:
        main(_flags(tiny_shards, tmp_path / "out", "--lm-shards", tiny_shards, flag, value))
    assert e.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and want in err[0], err
