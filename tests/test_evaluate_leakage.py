"""The one-line warning when a benchmark's scenes are in the model's training data: a real shard job's
manifest (overlapping and disjoint), an export's gasp_training.json, s3://, repeated flags, and one-line
failures for malformed manifests (CPU)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from launch import evaluate
from launch.benchmarks import generation, leakage

from test_evaluate import read_results, write_table, write_video


def make_vsi_on(root: str, scenes: list[tuple[str, str]]) -> None:
    """A VSI-Bench of one counting question per (dataset, scene), videos in the official layout."""
    rng = np.random.default_rng(0)
    rows = []
    for i, (ds, scene) in enumerate(scenes):
        write_video(os.path.join(root, ds, f"{scene}.mp4"),
                    [rng.integers(0, 255, (32, 48, 3), dtype=np.uint8) for _ in range(3)])
        rows.append({"id": i, "dataset": ds, "scene_name": scene, "question_type": "object_counting",
                     "question": "How many chairs?", "options": None, "ground_truth": "3"})
    write_table(rows, root, "parquet")


@pytest.fixture()
def answer_three(monkeypatch):
    """No generation: every question is answered "3" (the model still loads; the check runs before it)."""
    monkeypatch.setattr(generation, "generate_batch", lambda model, processor, requests, **kw: ["3"] * len(requests))


def run_vsi(data, out, extra, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    rc = evaluate.main(["--benchmark", "vsi-bench", "--data", data, "--num-frames", "2", "--output", out,
                        "--no-mlflow", "--quiet"] + (["--preset", "tiny"] if "--model" not in extra else []) + extra)
    # this tool's lines only (transformers prints a weight-loading progress bar for --model checkpoints)
    return rc, [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith(("[eval]", "launch/evaluate.py"))]


@pytest.fixture(scope="module")
def scannet_shards(ray_local, tmp_path_factory):
    """A real shard job (pipeline/shard.py) over three ScanNet exports; (output folder, its manifest)."""
    from corpus_writers import write_scannet_scene
    from pipeline import shard

    root = tmp_path_factory.mktemp("scannet")
    for i in range(3):
        write_scannet_scene(root, f"scene{i:04d}_00", seed=60 + i, n_frames=12, color_size=(162, 121),
                            depth_size=(80, 60))
    out = str(tmp_path_factory.mktemp("shards"))
    assert shard.main(["--input", str(root), "--format", "scannet", "--output", out, "--clips-per-scene", "2",
                       "--clip-frames", "3", "--clip-window", "9", "--samples-per-shard", "4", "--max-side", "80",
                       "--val-fraction", "0.34", "--quiet"]) == 0
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["config"]["format"] == "scannet" and len(manifest["splits"]["val"]) == 1
    return out, manifest


def test_warning_fires_on_an_overlapping_manifest_and_not_on_a_disjoint_one(scannet_shards, tmp_path, capsys,
                                                                             answer_three):
    out, manifest = scannet_shards
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    # overlapping: two of the benchmark's three scenes are training scenes of the shard job
    data = str(tmp_path / "vsi-overlap")
    make_vsi_on(data, [("scannet", train[0]), ("scannet", train[1]), ("arkitscenes", "41069025")])
    rc, err = run_vsi(data, str(tmp_path / "o1"), ["--check-training-manifest", out], capsys)
    assert rc == 0 and len(err) == 1, err
    assert err[0].startswith("[eval] WARNING: 2 of 3 vsi-bench scenes are in the train split")
    assert f"{out}/manifest.json: 2" in err[0] and "2 questions ask about scenes the model was trained on" in err[0]
    rep = read_results(str(tmp_path / "o1"))["training_leakage"]
    assert rep["train_scenes"] == sorted(f"scannet/{s}" for s in train[:2]) and rep["n_train_overlap"] == 2
    assert rep["n_questions_on_training_scenes"] == 2 and rep["manifests"][0]["n_train"] == len(train)

    # disjoint: the val scene and scenes of other corpora (an ARKitScenes id equal to nothing trained)
    data = str(tmp_path / "vsi-disjoint")
    make_vsi_on(data, [("scannet", val[0]), ("scannetpp", train[0]), ("scannet", "scene0999_00")])
    rc, err = run_vsi(data, str(tmp_path / "o2"), ["--check-training-manifest", os.path.join(out, "manifest.json")],
                      capsys)
    assert rc == 0 and err == []  # no warning: a val-split scene is not trained on, scannetpp is another corpus
    rep = read_results(str(tmp_path / "o2"))["training_leakage"]
    assert rep["checked"] and rep["n_train_overlap"] == 0 and rep["val_scenes"] == [f"scannet/{val[0]}"]


def test_the_exports_training_record_is_read_with_rescans_and_formats(tmp_path, capsys, answer_three):
    from model.loading import save_preset_checkpoint

    ckpt = str(save_preset_checkpoint("tiny", tmp_path / "export" / "model"))
    record = {"training_manifests": [
        {"url": "s3://corpora/scannet-shards/manifest.json", "sha256": "ab" * 32, "format": "scannet",
         "splits": {"train": ["scans/scene0011_01", "scene0500_00", "41069025"], "val": []}},
        {"url": "runs/shards-arkit/manifest.json", "sha256": None, "format": "arkitscenes",
         "splits": {"train": ["Training/41069025"], "val": ["Validation/42445991"]}}]}
    with open(os.path.join(ckpt, leakage.EXPORT_FILE), "w") as f:
        json.dump(record, f)
    data = str(tmp_path / "vsi")
    make_vsi_on(data, [("scannet", "scene0011_00"), ("arkitscenes", "41069025"), ("arkitscenes", "42445991"),
                       ("scannet", "scene0500_00")])
    rc, err = run_vsi(data, str(tmp_path / "o"), ["--model", ckpt], capsys)
    assert rc == 0 and len(err) == 1, err
    # scene0500_00 and ARKitScenes 41069025 (the scannet manifest's "41069025" is another corpus's key);
    # scene0011_00's room was trained on through its rescan scene0011_01
    assert err[0].startswith("[eval] WARNING: 2 of 4 vsi-bench scenes are in the train split of the training data "
                             "(+1 ScanNet rooms trained on through another scan)")
    rep = read_results(str(tmp_path / "o"))["training_leakage"]
    assert rep["train_scenes"] == ["arkitscenes/41069025", "scannet/scene0500_00"]
    assert rep["rescan_scenes"] == ["scannet/scene0011_00"] and rep["val_scenes"] == ["arkitscenes/42445991"]
    assert [m["n_train_overlap"] for m in rep["manifests"]] == [1, 1]
    assert rep["manifests"][0]["sha256"] == "ab" * 32 and rep["n_questions_on_training_scenes"] == 3


def _manifest(path, scenes, fmt="posed"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"version": 2, "kind": "clips", "splits": {"train": scenes, "val": []}, "config": {"format": fmt}}, f)


def test_the_flag_is_repeatable_and_reads_s3(tmp_path, capsys, answer_three, s3_server, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    fs = s3_server.fs()
    fs.mkdir("leak-bucket")
    with fs.open("leak-bucket/shards/manifest.json", "wb") as f:
        f.write(json.dumps({"splits": {"train": ["scene0001_00"], "val": []}, "config": {"format": "posed"}}).encode())
    local = str(tmp_path / "m2" / "manifest.json")
    _manifest(local, ["0a5c013435"])
    data = str(tmp_path / "vsi")
    make_vsi_on(data, [("scannet", "scene0001_00"), ("scannetpp", "0a5c013435"), ("scannet", "scene0002_00")])
    rc, err = run_vsi(data, str(tmp_path / "o"), ["--check-training-manifest", "s3://leak-bucket/shards",
                                                   "--limit", "3", f"--check-training-manifest={local}"], capsys)
    assert rc == 0 and len(err) == 1 and err[0].startswith("[eval] WARNING: 2 of 3 vsi-bench scenes"), err
    rep = read_results(str(tmp_path / "o"))["training_leakage"]
    assert [m["url"] for m in rep["manifests"]] == ["s3://leak-bucket/shards/manifest.json", local]
    assert rep["train_scenes"] == ["scannet/scene0001_00", "scannetpp/0a5c013435"]


def test_benchmarks_that_name_no_scenes_say_so_in_one_line(tmp_path, capsys):
    from test_evaluate_blink import blink_records, write_parquet

    data = str(tmp_path / "BLINK")
    write_parquet(data, blink_records(2))
    m = str(tmp_path / "m" / "manifest.json")
    _manifest(m, ["scene0001_00"])
    capsys.readouterr()
    assert evaluate.main(["--benchmark", "blink-multiview", "--data", data, "--preset", "tiny", "--max-new-tokens",
                          "1", "--output", str(tmp_path / "o"), "--no-mlflow", "--quiet",
                          "--check-training-manifest", m]) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "name no scenes" in err[0] and "does not apply" in err[0], err
    assert read_results(str(tmp_path / "o"))["training_leakage"]["checked"] is False


@pytest.fixture()
def no_model(monkeypatch):
    import model.loading

    def boom(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(model.loading, "build_model_and_processor", boom)


@pytest.mark.parametrize("kind,needle", [
    ("missing", "name a shard job's manifest.json"), ("not json", "is not JSON"), ("no splits", "no splits.train"),
    ("train not a list", "splits.train must be a list"), ("instruction", "instruction-data manifest"),
    ("format not a string", "config.format must be a string"),
    ("export: no list", "training_manifests must be a list"),
    ("export: no url", "training_manifests[0].url"), ("export: no format", "training_manifests[1].format"),
    ("export: bad keys", "training_manifests[0].splits.val must be a list"),
    ("export: sha", "training_manifests[0].sha256"),
])
def test_malformed_manifests_fail_in_one_line_naming_the_field(tmp_path, capsys, no_model, kind, needle):
    data = str(tmp_path / "vsi")
    make_vsi_on(data, [("scannet", "scene0001_00")])
    path = str(tmp_path / "m" / "manifest.json")
    good = {"url": "m.json", "sha256": None, "format": "scannet", "splits": {"train": [], "val": []}}
    extra = ["--check-training-manifest", path]
    if kind.startswith("export"):
        from model.loading import save_preset_checkpoint

        ckpt = str(save_preset_checkpoint("tiny", tmp_path / "ckpt"))
        entries = {"export: no list": {"training_manifests": {"url": "x"}},
                   "export: no url": {"training_manifests": [dict(good, url=None)]},
                   "export: no format": {"training_manifests": [good, dict(good, format="")]},
                   "export: bad keys": {"training_manifests": [dict(good, splits={"train": [], "val": [3]})]},
                   "export: sha": {"training_manifests": [dict(good, sha256=12)]}}[kind]
        with open(os.path.join(ckpt, leakage.EXPORT_FILE), "w") as f:
            json.dump(entries, f)
        extra = ["--model", ckpt]
    elif kind != "missing":
        os.makedirs(os.path.dirname(path))
        content = {"not json": "{oops", "no splits": json.dumps({"config": {"format": "scannet"}}),
                   "train not a list": json.dumps({"splits": {"train": "scene0001_00"}}),
                   "instruction": json.dumps({"kind": "instruction", "splits": {"train": []}}),
                   "format not a string": json.dumps({"splits": {"train": []}, "config": {"format": 3}})}[kind]
        with open(path, "w") as f:
            f.write(content)
    rc, err = run_vsi(data, str(tmp_path / "o"), extra, capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("launch/evaluate.py: error: ") and needle in err[0], err


def test_merge_repeats():
    m = evaluate.merge_repeats
    f = "--check-training-manifest"
    assert m(["--a", f, "x", "--b", "1", f, "y", "z", f"{f}=w"], f) == ["--a", "--b", "1", f, "x", "y", "z", "w"]
    assert m(["--a", "1"], f) == ["--a", "1"]
    assert m([f], f) == [f]  # argparse then says it needs a value
