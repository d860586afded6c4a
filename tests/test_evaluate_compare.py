"""evaluate.py --compare A B: the paper-style table with the three headline sub-scores first, B - A per
sub-score, the JSON file and the MLflow run; version mismatches and malformed files refused in one line (CPU)."""
from __future__ import annotations

import json
import os

import pytest

from launch import evaluate


def results(bench: str, model: str, scores: dict, reference: str | None = None, **extra) -> dict:
    """A results file as evaluate.py writes it (the fields --compare reads)."""
    res = {"benchmark": bench, "model": model, "scores": scores, "counts": {}, "n_questions": 100,
           "n_answered": 100, "complete": True, "incomplete_reason": "", "annotations_sha256": f"sha-{bench}"}
    if reference:
        res["reference_version"] = reference
    res.update(extra)
    return res


def write_side(root: str, model: str, aab: dict, vsi: dict, blink: dict, refs: dict | None = None,
               pairs: float | None = None) -> str:
    """root/<benchmark>/results.json for the three benchmarks (the layout of --output runs/eval/NAME/<bench>)."""
    refs = refs or {}
    for bench, scores in (("all-angles", aab), ("vsi-bench", vsi), ("blink-multiview", blink)):
        os.makedirs(os.path.join(root, bench), exist_ok=True)
        extra = {"pairs": {"n_pairs": 10, "pair_consistency": pairs}} if bench == "all-angles" and pairs else {}
        with open(os.path.join(root, bench, "results.json"), "w") as f:
            json.dump(results(bench, model, scores, refs.get(bench), **extra), f)
    return root


AAB_A = {"overall": 0.45, "camera_pose_estimation": 0.402, "counting": 0.6}
AAB_B = {"overall": 0.50, "camera_pose_estimation": 0.584, "counting": 0.55}
VSI_A = {"object_counting_MRA:.5:.95:.05": 0.31, "route_planning_accuracy": 0.3, "overall": 0.35}
VSI_B = {"object_counting_MRA:.5:.95:.05": 0.60, "route_planning_accuracy": 0.28, "overall": 0.41}
BLINK_A, BLINK_B = {"blink_acc": 0.45}, {"blink_acc": 0.60}


def test_compare_table_json_and_mlflow(tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    a = write_side(str(tmp_path / "sft"), "sft-baseline", AAB_A, VSI_A, BLINK_A, pairs=0.30)
    b = write_side(str(tmp_path / "gasp"), "gasp", AAB_B, VSI_B, BLINK_B, pairs=0.42)
    out = str(tmp_path / "cmp.json")
    capsys.readouterr()
    assert evaluate.main(["--compare", a, b, "--output", out, "--experiment", "cmp"]) == 0
    table = capsys.readouterr().out.splitlines()
    # the paper's three headline sub-scores first, in the paper's order, with B - A in points
    body = [ln for ln in table if ln and not ln.startswith(("A =", "benchmark", "---", "reference", "[", "note"))]
    assert body[0].split() == ["All-Angles", "camera_pose_estimation", "40.2", "58.4", "+18.2"]
    assert body[1].split() == ["VSI-Bench", "object_counting_MRA:.5:.95:.05", "31.0", "60.0", "+29.0"]
    assert body[2].split() == ["BLINK", "multi-view", "blink_acc", "45.0", "60.0", "+15.0"]
    assert "A = sft-baseline    B = gasp" in table[0]

    with open(out) as f:
        cmp = json.load(f)
    rows = cmp["rows"]
    assert [(r["benchmark"], r["score"]) for r in rows if r["headline"]] == [
        ("all-angles", "camera_pose_estimation"), ("vsi-bench", "object_counting_MRA:.5:.95:.05"),
        ("blink-multiview", "blink_acc")]
    full = {(r["benchmark"], r["score"]): r for r in rows if not r["headline"]}
    want = {("all-angles", k): AAB_B[k] - AAB_A[k] for k in AAB_A}
    want.update({("vsi-bench", k): VSI_B[k] - VSI_A[k] for k in VSI_A})
    want[("blink-multiview", "blink_acc")] = 0.15
    want[("all-angles", "pair_consistency")] = 0.42 - 0.30
    assert set(full) == set(want)
    for key, d in want.items():
        assert full[key]["diff"] == pytest.approx(d, abs=1e-12), key
        assert full[key]["diff"] == full[key]["b"] - full[key]["a"]
    assert cmp["references"]["vsi-bench"] == {"a": "lmms-eval-v0.5", "b": "lmms-eval-v0.5"}  # files without one
    assert cmp["a"]["models"] == ["sft-baseline"] and cmp["notes"] == []

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cmp").experiment_id])
    assert run.data.tags["kind"] == "eval-compare" and run.info.run_name == "compare-sft-baseline-vs-gasp"
    assert run.data.metrics["diff/all-angles/camera_pose_estimation"] == pytest.approx(0.182)
    assert run.data.metrics["A/blink-multiview/blink_acc"] == pytest.approx(0.45)
    assert run.data.metrics["B/vsi-bench/object_counting_MRA:.5:.95:.05"] == pytest.approx(0.60)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"cmp.json"}


def test_a_benchmark_only_one_side_has_shows_no_difference(tmp_path, capsys):
    a = write_side(str(tmp_path / "a"), "m1", AAB_A, VSI_A, BLINK_A)
    b = str(tmp_path / "b.json")
    with open(b, "w") as f:
        json.dump(results("blink-multiview", "m2", BLINK_B), f)
    out = str(tmp_path / "c.json")
    assert evaluate.main(["--compare", a, b, "--output", out, "--no-mlflow", "--quiet"]) == 0
    with open(out) as f:
        rows = json.load(f)["rows"]
    aab = [r for r in rows if r["benchmark"] == "all-angles"]
    assert aab and all(r["b"] is None and r["diff"] is None and r["a"] is not None for r in aab)
    (blink,) = [r for r in rows if r["benchmark"] == "blink-multiview" and not r["headline"]]
    assert blink["diff"] == pytest.approx(0.15)


def test_scores_under_different_reference_versions_are_refused_unless_allowed(tmp_path, capsys):
    a = write_side(str(tmp_path / "a"), "m1", AAB_A, VSI_A, BLINK_A)
    b = write_side(str(tmp_path / "b"), "m2", AAB_B, VSI_B, BLINK_B, refs={"vsi-bench": "lmms-eval-main"})
    capsys.readouterr()
    assert evaluate.main(["--compare", a, b, "--no-mlflow", "--output", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "vsi-bench" in err and "lmms-eval-v0.5" in err and "lmms-eval-main" in err
    assert "--allow-mixed-references" in err and not os.path.exists(tmp_path / "c.json")
    assert evaluate.main(["--compare", a, b, "--no-mlflow", "--output", str(tmp_path / "c.json"),
                          "--allow-mixed-references"]) == 0
    out = capsys.readouterr().out
    assert "note: vsi-bench: A scored under lmms-eval-v0.5, B under lmms-eval-main" in out


@pytest.mark.parametrize("kind,needle", [
    ("no scores", "field 'scores'"), ("score not a number", "scores.overall is not a number"),
    ("unknown benchmark", "field 'benchmark'"), ("not json", "cannot read"), ("missing", "no such file"),
    ("two of one benchmark", "two results of blink-multiview"),
])
def test_malformed_results_fail_in_one_line(tmp_path, capsys, kind, needle):
    good = str(tmp_path / "good.json")
    with open(good, "w") as f:
        json.dump(results("blink-multiview", "m", BLINK_A), f)
    bad = str(tmp_path / "bad")
    os.makedirs(bad)
    path = os.path.join(bad, "results.json")
    res = results("vsi-bench", "m", dict(VSI_A))
    if kind == "no scores":
        del res["scores"]
    elif kind == "score not a number":
        res["scores"]["overall"] = "0.3"
    elif kind == "unknown benchmark":
        res["benchmark"] = "blink"
    with open(path, "w") as f:
        f.write("{not json" if kind == "not json" else json.dumps(res))
    if kind == "missing":
        bad = str(tmp_path / "nowhere")
    if kind == "two of one benchmark":
        with open(path, "w") as f:
            json.dump(results("blink-multiview", "m", BLINK_A), f)
        with open(os.path.join(bad, "results-lmms-eval-main.json"), "w") as f:
            json.dump(results("blink-multiview", "m", BLINK_A, "lmms-eval-main"), f)
    capsys.readouterr()
    assert evaluate.main(["--compare", good, bad, "--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("launch/evaluate.py: error: --compare") and needle in err, err


@pytest.mark.parametrize("argv,needle", [
    (["--compare", "a.json"], "takes two results"),
    (["--compare", "a.json", "b.json", "c.json"], "takes two results"),
    (["--compare", "a.json", "b.json", "--benchmark", "vsi-bench"], "give no --benchmark"),
])
def test_compare_flags_fail_in_one_line(capsys, argv, needle):
    with pytest.raises(SystemExit) as exc:
        evaluate.main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_compare_of_two_real_runs(tmp_path, capsys):
    """Two models' BLINK runs through evaluate.py, compared from their output folders: B - A equals the
    difference of their results files."""
    from test_evaluate_blink import blink_records, write_parquet

    data = str(tmp_path / "BLINK")
    write_parquet(data, blink_records(4))
    outs = {}
    for preset in ("tiny", "tiny-qwen2.5"):
        outs[preset] = str(tmp_path / "runs" / preset / "blink")
        assert evaluate.main(["--benchmark", "blink-multiview", "--data", data, "--preset", preset, "--batch-size",
                              "4", "--max-new-tokens", "3", "--output", outs[preset], "--no-mlflow", "--quiet"]) == 0
    cmp_path = str(tmp_path / "cmp.json")
    assert evaluate.main(["--compare", str(tmp_path / "runs" / "tiny"), str(tmp_path / "runs" / "tiny-qwen2.5"),
                          "--output", cmp_path, "--no-mlflow", "--quiet"]) == 0
    res = {}
    for p, o in outs.items():
        with open(os.path.join(o, "results.json")) as f:
            res[p] = json.load(f)
    with open(cmp_path) as f:
        (row, _) = json.load(f)["rows"]
    assert row["headline"] and row["a"] == res["tiny"]["scores"]["blink_acc"]
    assert row["diff"] == res["tiny-qwen2.5"]["scores"]["blink_acc"] - res["tiny"]["scores"]["blink_acc"]
    assert row["n_a"] == row["n_b"] == 4
