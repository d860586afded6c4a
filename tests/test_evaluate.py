"""launch/evaluate.py: reference scoring, miniature benchmarks end to end, resume, one-line errors, MLflow (CPU)."""
from __future__ import annotations

import json
import os
from collections import OrderedDict

import numpy as np
import pytest

from launch import evaluate
from launch.benchmarks import generation, scoring
from launch.benchmarks.video import frame_indices, sample_frames

# ============================================================ scoring: VSI-Bench (lmms-eval vsibench)


def test_mra_thresholds_are_the_references_linspace():
    th = scoring.mra_thresholds()
    # (.95 - .5) / .05 + 2 = 10.999999999999998 in floats -> int 10 points (11 with exact arithmetic)
    assert len(th) == 10
    assert th.tolist() == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.8999999999999999, 0.95]
    tol = (1 - th).tolist()
    assert tol[-1] == 0.050000000000000044  # 1 - 0.95 in float64
    assert tol[6] == 0.19999999999999996    # 1 - 0.8: below 0.2, so a 20% error misses theta = 0.8
    assert tol[8] == 0.10000000000000009    # 1 - 0.8999999999999999: above 0.1
    assert tol[1] == 0.44999999999999996    # 1 - 0.55: below 0.45


# Ground truth 10; relative error exactly k * 5% (k = 1..10), above and below the truth.
# Reference rule: theta counts when err <= 1 - theta (float64), thresholds .5 .55 ... .95.
#   err .05 -> all 10 (0.05 <= 0.050000000000000044)              1.0
#   err .10 -> theta <= .9 (0.1 <= 0.10000000000000009)           0.9
#   err .15 -> theta <= .85 (0.15 <= 0.15000000000000002)         0.8
#   err .20 -> theta <= .75 (0.2 > 0.19999999999999996 at .8)     0.6   (exact maths: 0.7)
#   err .25 -> theta <= .75                                       0.6
#   err .30 -> theta <= .7 (0.3 <= 0.30000000000000004)           0.5
#   err .35 -> theta <= .65                                       0.4
#   err .40 -> theta <= .6                                        0.3
#   err .45 -> theta = .5 only (0.45 > 0.44999999999999996)       0.1   (exact maths: 0.2)
#   err .50 -> theta = .5 (0.5 <= 0.5)                            0.1
AT = [1.0, 0.9, 0.8, 0.6, 0.6, 0.5, 0.4, 0.3, 0.1, 0.1]
JUST_BELOW = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]  # err = k*5% - 1e-7: every boundary passes
JUST_ABOVE = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]  # err = k*5% + 1e-7: the boundary fails
PAPER = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]       # paper: 1(err < 1 - theta), exact maths


@pytest.mark.parametrize("k", range(1, 11))
def test_mra_at_and_around_every_threshold(k):
    over = [10.5, 11.0, 11.5, 12.0, 12.5, 13.0, 13.5, 14.0, 14.5, 15.0][k - 1]
    under = [9.5, 9.0, 8.5, 8.0, 7.5, 7.0, 6.5, 6.0, 5.5, 5.0][k - 1]
    assert scoring.mean_relative_accuracy(over, 10.0) == AT[k - 1]
    assert scoring.mean_relative_accuracy(under, 10.0) == AT[k - 1]
    assert scoring.mean_relative_accuracy(over - 1e-6, 10.0) == JUST_BELOW[k - 1]
    assert scoring.mean_relative_accuracy(over + 1e-6, 10.0) == JUST_ABOVE[k - 1]
    assert scoring.mean_relative_accuracy(under + 1e-6, 10.0) == JUST_BELOW[k - 1]
    assert scoring.mean_relative_accuracy(under - 1e-6, 10.0) == JUST_ABOVE[k - 1]
    # through the full per-question path (string prediction and ground truth)
    assert scoring.score_vsi("object_counting", f"{over} chairs", "10") == AT[k - 1]


def test_mra_totals_and_float_behaviour():
    assert sum(AT) == pytest.approx(5.3) and sum(PAPER) == pytest.approx(4.5)
    # the relative error itself is computed in floats: |1.1 - 1| / 1 = 0.10000000000000009 still passes
    # theta = .9 (tolerance 0.10000000000000009), |1.05 - 1| = 0.050000000000000044 passes theta = .95
    assert scoring.mean_relative_accuracy(1.1, 1.0) == 0.9
    assert scoring.mean_relative_accuracy(1.05, 1.0) == 1.0
    assert scoring.mean_relative_accuracy(3.0, 3.0) == 1.0
    assert scoring.mean_relative_accuracy(4.999, 10.0) == 0.0  # error 50.01%
    assert scoring.mean_relative_accuracy(-10.0, 10.0) == 0.0


@pytest.mark.parametrize("pred,expected", [
    ("3", 1.0), ("3.", 1.0), ("3.0", 1.0), ("3 chairs", 1.0), ("3\n", 1.0), ("3...", 1.0), ("+3", 1.0),
    ("30e-1", 1.0),
    ("3.15", 1.0),  # |3.15 - 3| / 3 = 0.04999999999999997: every threshold
    ("3.3", 0.9),   # 0.09999999999999994 <= 0.10000000000000009 (theta .9), > 0.050000000000000044 (.95)
    ("2.7", 0.9),   # the same error below the truth
    ("4", 0.4),     # 1/3 <= 0.35 (theta .65) but > 0.30000000000000004 (theta .7): .5 .55 .6 .65
])
def test_numerical_answer_extraction(pred, expected):
    assert scoring.score_vsi("object_counting", pred, "3") == expected


@pytest.mark.parametrize("pred", ["", " 3", "three", "about 3", "3,5", "nan", "inf", "-inf", "NaN meters",
                                  "(3)", "3m", "\n"])
def test_unparsable_or_non_finite_numerical_answers_score_zero(pred):
    # " 3": the reference splits on a SPACE, so the first word is "" and the answer is unparsable
    assert scoring.score_vsi("room_size_estimation", pred, "3") == 0.0


@pytest.mark.parametrize("pred,gt,expected", [
    ("A", "A", 1.0), ("a", "A", 1.0), ("A.", "A", 1.0), ("A..", "A", 1.0), ("A. left", "A", 1.0),
    ("A\n", "A", 1.0),       # "A\n" -> rstrip('.') -> strip() -> "A"
    ("A.\n", "A", 0.0),      # the dot is not trailing before strip(): "A." stays
    ("(A)", "A", 0.0), (" A", "A", 0.0), ("A\nB", "A", 0.0), ("B", "A", 0.0), ("", "A", 0.0),
    ("The answer is A", "A", 0.0),
])
def test_multiple_choice_exact_match_with_the_references_normalisation(pred, gt, expected):
    assert scoring.score_vsi("route_planning", pred, gt) == expected


def _reference_transcription(rows):
    """lmms-eval's vsibench_aggregate_results, restated with pandas for a parity check."""
    import pandas as pd

    df = pd.DataFrame(rows)
    out = {}
    for qtype, idx in df.groupby("question_type").groups.items():
        sub = df.loc[idx]
        key = scoring.vsi_metric_key(qtype)
        out[key] = sub["score"].mean()
    out["object_rel_direction_accuracy"] = sum([out.pop(f"{lv}_accuracy") for lv in scoring.REL_DIRECTION_LEVELS]) / 3.
    out["overall"] = sum([v for v in out.values()]) / len(out)
    return out


def test_vsi_aggregation_per_type_levels_and_overall():
    rows = ([{"question_type": "object_counting", "score": s} for s in (1.0, 0.5)]
            + [{"question_type": "object_abs_distance", "score": 0.3}]
            + [{"question_type": "object_rel_direction_easy", "score": s} for s in (1.0, 0.0)]
            + [{"question_type": "object_rel_direction_medium", "score": 1.0}]
            + [{"question_type": "object_rel_direction_hard", "score": s} for s in (0.0, 0.0, 1.0)]
            + [{"question_type": "route_planning", "score": s} for s in (1.0, 0.0, 0.0, 0.0)])
    agg = scoring.aggregate_vsi(rows)
    scores = agg["scores"]
    assert list(scores) == ["object_abs_distance_MRA:.5:.95:.05", "object_counting_MRA:.5:.95:.05",
                            "route_planning_accuracy", "object_rel_direction_accuracy", "overall"]
    assert scores["object_counting_MRA:.5:.95:.05"] == 0.75
    assert scores["route_planning_accuracy"] == 0.25
    rel = (0.5 + 1.0 + 1 / 3) / 3  # the three levels' accuracies, plain mean
    assert scores["object_rel_direction_accuracy"] == rel
    assert scores["overall"] == (0.3 + 0.75 + 0.25 + rel) / 4
    assert scores["overall"] == pytest.approx(0.47777777777777775)
    assert agg["counts"]["object_rel_direction_hard"] == 3 and agg["complete_levels"]
    assert dict(scores) == _reference_transcription(rows)


def test_vsi_aggregation_matches_the_reference_transcription_on_random_scores():
    rng = np.random.default_rng(0)
    types = scoring.MCA_QUESTION_TYPES + scoring.NA_QUESTION_TYPES
    rows = []
    for i in range(400):
        qt = types[i % len(types)]
        s = float(rng.integers(0, 2)) if qt in scoring.MCA_QUESTION_TYPES else float(rng.integers(0, 11)) / 10
        rows.append({"question_type": qt, "score": s})
    got = scoring.aggregate_vsi(rows)["scores"]
    ref = _reference_transcription(rows)
    assert list(got) == list(ref) and all(got[k] == ref[k] for k in ref)  # bit-identical


def test_vsi_aggregation_of_a_partial_run_averages_the_levels_present():
    rows = [{"question_type": "object_rel_direction_easy", "score": 1.0},
            {"question_type": "object_rel_direction_hard", "score": 0.0},
            {"question_type": "object_counting", "score": 0.4}]
    agg = scoring.aggregate_vsi(rows)
    assert agg["scores"]["object_rel_direction_accuracy"] == 0.5 and not agg["complete_levels"]
    assert agg["scores"]["overall"] == (0.4 + 0.5) / 2


# ============================================================ scoring: All-Angles (VLMEvalKit can_infer)

CHOICES = OrderedDict([("A", "Left"), ("B", "Right"), ("C", "Behind the camera")])


@pytest.mark.parametrize("pred,expected", [
    ("B", "B"), ("B.", "B"), ("(C)", "C"), ("C. Behind the camera", "C"), ("The answer is A.", "A"),
    ("Answer: C", "C"), ("**B**", "B"),
    ("A or B", "Z"),               # two letters: option matching fails; no option text occurs -> Z
    ("left", "A"),                 # option text, case-insensitive
    ("left or right", "Z"),        # two option texts
    ("b", "Z"),                    # letters must be upper case tokens
    ("Z", "Z"), ("", "Z"),
    ("I'm sorry, but without the image provided I cannot tell", "Z"),
])
def test_all_angles_answer_extraction(pred, expected):
    assert scoring.extract_choice(pred, CHOICES) == expected
    assert scoring.score_allangles(pred, CHOICES, "B")[1] == (1.0 if expected == "B" else 0.0)


def test_pair_consistency_and_accuracy_hand_computed():
    rows = [
        {"index": 0, "category": "counting", "pair_idx": "1", "hit": 1.0},
        {"index": 1, "category": "counting", "pair_idx": "0", "hit": 1.0},            # CC
        {"index": 2, "category": "relative_distance", "pair_idx": "3", "hit": 1.0},
        {"index": 3, "category": "relative_distance", "pair_idx": "2", "hit": 0.0},   # IC
        {"index": 4, "category": "relative_distance", "pair_idx": "5", "hit": 0.0},
        {"index": 5, "category": "relative_distance", "pair_idx": "4", "hit": 0.0},   # WW
        {"index": 6, "category": "manipulation", "pair_idx": None, "hit": 1.0},        # unpaired
        {"index": 7, "category": "manipulation", "pair_idx": "99", "hit": 0.0},        # twin not in the set
    ]
    agg = scoring.aggregate_allangles(rows)
    assert agg["scores"]["overall"] == 4 / 8
    assert agg["scores"]["counting"] == 1.0 and agg["scores"]["relative_distance"] == 0.25
    assert agg["scores"]["manipulation"] == 0.5
    assert agg["macro_category_mean"] == (1.0 + 0.5 + 0.25) / 3
    p = agg["pairs"]
    assert (p["n_pairs"], p["CC"], p["WW"], p["IC"]) == (3, 1, 1, 1)
    assert p["pair_consistency"] == 1 / 3
    assert p["per_category"]["counting"]["pair_consistency"] == 1.0
    assert p["per_category"]["relative_distance"]["n_pairs"] == 2
    assert p["per_category"]["relative_distance"]["IC"] == 1


# ============================================================ video sampling (PyAV)

def write_video(path: str, frames: list[np.ndarray], fps: int = 4) -> None:
    import av

    os.makedirs(os.path.dirname(path), exist_ok=True)
    H, W = frames[0].shape[:2]
    with av.open(path, "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        for a in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_frames_are_sampled_uniformly(tmp_path):
    gray = [np.full((48, 64, 3), 20 * i, np.uint8) for i in range(10)]
    path = str(tmp_path / "v.mp4")
    write_video(path, gray)
    assert frame_indices(10, 4).tolist() == [0, 3, 6, 9]
    means = [float(f.mean()) for f in sample_frames(path, 4)]
    assert np.allclose(means, [0, 60, 120, 180], atol=6)
    more = sample_frames(path, 16)  # more frames than the video: linspace repeats indices
    assert len(more) == 16 and np.allclose([f.mean() for f in more],
                                           [20 * i for i in frame_indices(10, 16)], atol=6)


# ============================================================ miniature benchmarks

VSI_TYPES = [
    ("object_counting", "3", None), ("object_abs_distance", "2.5", None), ("object_size_estimation", "120", None),
    ("room_size_estimation", "20.5", None),
    ("object_rel_direction_easy", "A", ["A. left", "B. right"]),
    ("object_rel_direction_medium", "B", ["A. left", "B. right", "C. back"]),
    ("object_rel_direction_hard", "C", ["A. front-left", "B. front-right", "C. back-left", "D. back-right"]),
    ("object_rel_distance", "A", ["A. chair", "B. table", "C. bed", "D. sofa"]),
    ("route_planning", "D", ["A. Turn left", "B. Turn right", "C. Go forward", "D. Turn back"]),
    ("obj_appearance_order", "A", ["A. chair, table", "B. table, chair", "C. bed, sofa", "D. sofa, bed"]),
]
SCENES = [("arkitscenes", "41069025"), ("scannet", "scene0000_00"), ("scannetpp", "0a5c013435")]


def make_vsi(root, fmt: str = "parquet") -> list[dict]:
    """A VSI-Bench in the official layout: ROOT/<dataset>/<scene>.mp4 + the test split's records."""
    rng = np.random.default_rng(0)
    for ds, scene in SCENES:
        write_video(os.path.join(root, ds, f"{scene}.mp4"),
                    [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(8)])
    rows = []
    for i, (qt, gt, opts) in enumerate(VSI_TYPES):
        ds, scene = SCENES[i % len(SCENES)]
        rows.append({"id": 100 + i, "dataset": ds, "scene_name": scene, "question_type": qt,
                     "question": f"How about the {qt.replace('_', ' ')} here?", "options": opts, "ground_truth": gt})
    write_table(rows, root, fmt)
    return rows


def write_table(rows, root, fmt):
    if fmt == "parquet":
        import pandas as pd

        pd.DataFrame(rows).to_parquet(os.path.join(root, "test-00000-of-00001.parquet"))
    elif fmt == "jsonl":
        with open(os.path.join(root, "test.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    else:
        with open(os.path.join(root, "test.json"), "w") as f:
            json.dump(rows, f)


AAB_CATEGORIES = ["counting", "attribute_identification", "relative_distance", "relative_direction",
                  "manipulation", "camera_pose_estimation"]


def make_allangles(root) -> list[dict]:
    """An All-Angles Bench in the official layout: ROOT/data.json + view images under ROOT."""
    from PIL import Image

    rng = np.random.default_rng(1)
    recs = []
    for i in range(8):
        folder = f"{'egohumans_scenes' if i < 4 else 'ego_exo4d_scenes'}/scene{i // 2}"
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        paths = []
        for v in range(2 + i % 3):
            p = f"{folder}/cam{v + 1:02d}.jpg"
            if not os.path.exists(os.path.join(root, p)):
                Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(os.path.join(root, p))
            paths.append(p)
        twin = i + 1 if i % 2 == 0 else i - 1
        recs.append({"index": i, "folder": folder, "category": AAB_CATEGORIES[(i // 2) % 6],
                     "pair_idx": str(twin) if i < 6 else "", "sourced_dataset": "EgoHumans" if i < 4 else "Ego-Exo4D",
                     "image_path": paths, "question": f"From View 1, which way is object {i}?",
                     "A": "left", "B": "right", "C": "behind", "answer": "ABC"[i % 3]})
    with open(os.path.join(root, "data.json"), "w") as f:
        json.dump(recs, f)
    return recs


def read_predictions(out) -> list[dict]:
    with open(os.path.join(out, "predictions.jsonl")) as f:
        return [json.loads(line) for line in f]


def read_results(out) -> dict:
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def run_main(args: list[str]) -> int:
    return evaluate.main(args + ["--quiet"])


@pytest.fixture()
def count_generate(monkeypatch):
    """Wrap generate_batch: record every question text generated; optionally crash after n batches."""
    real = generation.generate_batch
    state = {"texts": [], "batches": 0, "crash_after": None}

    def wrapped(model, processor, requests, **kw):
        if state["crash_after"] is not None and state["batches"] >= state["crash_after"]:
            raise RuntimeError("injected crash")
        state["batches"] += 1
        state["texts"] += [r.text for r in requests]
        return real(model, processor, requests, **kw)

    monkeypatch.setattr(generation, "generate_batch", wrapped)
    return state


def test_vsi_bench_end_to_end_limit_then_resume(tmp_path, count_generate):
    data, out = str(tmp_path / "vsi"), str(tmp_path / "out")
    rows = make_vsi(data)
    base = ["--benchmark", "vsi-bench", "--data", data, "--preset", "tiny", "--num-frames", "4",
            "--batch-size", "4", "--max-new-tokens", "6", "--output", out, "--no-mlflow"]
    assert run_main(base + ["--limit", "3"]) == 0
    assert len(read_predictions(out)) == 3 and not read_results(out)["complete"]
    assert count_generate["batches"] == 1

    assert run_main(base) == 0
    preds = read_predictions(out)
    assert len(count_generate["texts"]) == len(rows)  # the 3 answered first were not asked again
    assert sorted(p["key"] for p in preds) == sorted(str(r["id"]) for r in rows)
    for p in preds:
        assert p["n_images"] == 4 and isinstance(p["prediction"], str)
        assert p["score"] == scoring.score_vsi(p["question_type"], p["prediction"], p["ground_truth"])
        assert p["prompt"].startswith("These are frames of a video.\n")
        if p["options"]:
            assert p["prompt"].endswith("Options:\n" + "\n".join(p["options"]) + "\n"
                                        "Answer with the option's letter from the given choices directly.")
        else:
            assert p["prompt"].endswith("\nPlease answer the question using a single word or phrase.")
    res = read_results(out)
    expected = scoring.aggregate_vsi([{"question_type": p["question_type"], "score": p["score"]} for p in preds])
    assert res["scores"] == dict(expected["scores"]) and res["complete"]
    assert set(res["scores"]) == {scoring.vsi_metric_key(t) for t, _, _ in VSI_TYPES
                                  if not t.startswith("object_rel_direction")} | {
        "object_rel_direction_accuracy", "overall"}
    assert res["n_questions"] == res["n_answered"] == len(rows)
    assert res["counts"] == {t: 1 for t, _, _ in VSI_TYPES}

    # everything answered: a rerun recomputes the results without loading the model or generating
    n = len(count_generate["texts"])
    assert run_main(base) == 0 and len(count_generate["texts"]) == n


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2.5"])
def test_vsi_bench_feeds_qwen_a_video_input(tmp_path, monkeypatch, preset):
    """Qwen models get each question's frames as ONE video input (temporal patches of frame pairs; for
    Qwen2.5-VL the time per temporal patch), as lmms-eval does; --frames-as images keeps one image each."""
    data = str(tmp_path / "vsi")
    make_vsi(data)  # 8 frames at 4 fps: 2 s per video
    seen = []
    real = generation.encode_video
    monkeypatch.setattr(generation, "encode_video", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    args = ["--benchmark", "vsi-bench", "--data", data, "--preset", preset, "--num-frames", "4", "--limit", "2",
            "--batch-size", "2", "--max-new-tokens", "4", "--no-mlflow"]
    assert run_main(args + ["--output", str(tmp_path / "video")]) == 0
    assert len(seen) == 1
    inputs = seen[0]
    assert "pixel_values" not in inputs and inputs["video_grid_thw"][:, 0].tolist() == [2, 2]  # 4 frames -> 2
    n_tokens = int(inputs["video_grid_thw"][0].prod()) // 4
    assert ((inputs["mm_token_type_ids"] == 2).sum(1) == n_tokens).all()
    if preset == "tiny-qwen2.5":
        assert inputs["second_per_grid_ts"].tolist() == [1.0, 1.0]  # 2 x (2 s / 4 frames)
    else:
        assert "second_per_grid_ts" not in inputs
    assert read_results(str(tmp_path / "video"))["config"]["frames_as"] == "auto"
    with open(os.path.join(str(tmp_path / "video"), "run.json")) as f:
        assert json.load(f)["signature"]["frames_as"] == "video"
    seen.clear()
    assert run_main(args + ["--output", str(tmp_path / "images"), "--frames-as", "images"]) == 0
    assert seen == [] and [p["n_images"] for p in read_predictions(str(tmp_path / "images"))] == [4, 4]


def test_frames_as_video_is_refused_for_llava(tmp_path, capsys, no_model):
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--benchmark", "vsi-bench", "--data", str(tmp_path), "--preset", "tiny-llava-ov",
                       "--frames-as", "video"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "--frames-as video" in err[0], err


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_vsi_bench_reads_json_and_jsonl_annotations(tmp_path, fmt):
    data, out = str(tmp_path / "vsi"), str(tmp_path / "out")
    make_vsi(data, fmt=fmt)
    assert run_main(["--benchmark", "vsi-bench", "--data", data, "--preset", "tiny", "--num-frames", "2",
                     "--limit", "2", "--max-new-tokens", "4", "--output", out, "--no-mlflow"]) == 0
    assert [p["key"] for p in read_predictions(out)] == ["100", "101"]


def test_all_angles_end_to_end(tmp_path):
    data, out = str(tmp_path / "aab"), str(tmp_path / "out")
    recs = make_allangles(data)
    assert run_main(["--benchmark", "all-angles", "--data", data, "--preset", "tiny-qwen2.5", "--batch-size", "3",
                     "--max-new-tokens", "8", "--output", out, "--no-mlflow"]) == 0
    preds = read_predictions(out)
    assert sorted(int(p["key"]) for p in preds) == [r["index"] for r in recs]
    by_key = {p["key"]: p for p in preds}
    for r in recs:
        p = by_key[str(r["index"])]
        assert p["n_images"] == len(r["image_path"]) and p["answer"] == r["answer"]
        # Qwen2.5-VL: the dataset's own prompt, unstripped, as the authors' VLMEvalKit fork passes it
        # (its Qwen2.5-VL configs set use_custom_prompt=False; issue 23)
        assert p["prompt"] == (f"Question: {r['question']}\nOptions:\nA. left\nB. right\nC. behind\n"
                               "Please select the correct answer from the options above. \n")
        assert p["extracted"] == scoring.extract_choice(p["prediction"], p["options"])
    res = read_results(out)
    expected = scoring.aggregate_allangles(
        [{"index": p["key"], "category": p["category"], "pair_idx": p["pair_idx"],
          "hit": scoring.score_allangles(p["prediction"], p["options"], p["answer"])[1]} for p in preds])
    assert res["scores"] == dict(expected["scores"])
    assert res["pairs"]["n_pairs"] == 3 and res["pairs"] == json.loads(json.dumps(expected["pairs"]))
    assert res["counts"] == {c: 2 for c in AAB_CATEGORIES[:4]}


def test_llava_onevision_end_to_end(tmp_path):
    """The second family: LLaVA-OneVision answers both benchmarks through its own chat template and
    multi-image path; a batch answers as one by one."""
    data, out = str(tmp_path / "aab"), str(tmp_path / "out")
    recs = make_allangles(data)
    runs = {}
    for bs in ("1", "3"):
        o = f"{out}-{bs}"
        assert run_main(["--benchmark", "all-angles", "--data", data, "--preset", "tiny-llava-ov", "--batch-size", bs,
                         "--max-new-tokens", "6", "--output", o, "--no-mlflow"]) == 0
        runs[bs] = {p["key"]: p for p in read_predictions(o)}
    assert sorted(int(k) for k in runs["1"]) == [r["index"] for r in recs]
    assert {k: p["prediction"] for k, p in runs["1"].items()} == {k: p["prediction"] for k, p in runs["3"].items()}
    assert all(p["n_images"] == len(r["image_path"]) for r, p in zip(recs, (runs["1"][str(r["index"])] for r in recs)))
    assert read_results(f"{out}-3")["model"] == "tiny-llava-ov"
    vdata, vout = str(tmp_path / "vsi"), str(tmp_path / "vout")
    make_vsi(vdata)
    assert run_main(["--benchmark", "vsi-bench", "--data", vdata, "--preset", "tiny-llava-ov", "--num-frames", "3",
                     "--limit", "3", "--batch-size", "2", "--max-new-tokens", "6", "--output", vout, "--no-mlflow"]) == 0
    assert [p["n_images"] for p in read_predictions(vout)] == [3, 3, 3]


def test_batched_generation_equals_one_by_one(tmp_path):
    data = str(tmp_path / "aab")
    make_allangles(data)
    outs = []
    for bs in ("1", "4"):
        out = str(tmp_path / f"out{bs}")
        assert run_main(["--benchmark", "all-angles", "--data", data, "--preset", "tiny", "--batch-size", bs,
                         "--max-new-tokens", "6", "--output", out, "--no-mlflow"]) == 0
        outs.append({p["key"]: p["prediction"] for p in read_predictions(out)})
    assert outs[0] == outs[1]  # left padding leaves every answer unchanged


def test_max_pixels_bounds_every_view(tmp_path, monkeypatch):
    data = str(tmp_path / "aab")
    make_allangles(data)
    seen = {}

    def fake(model, processor, requests, **kw):  # no model run: record what it would see
        for r in requests:
            seen.setdefault(kw["max_new_tokens"], []).extend(im.size for im in r.images)
        return ["B"] * len(requests)

    monkeypatch.setattr(generation, "generate_batch", fake)
    for mp, out in (("0", "a"), ("3136", "b")):
        assert run_main(["--benchmark", "all-angles", "--data", data, "--preset", "tiny", "--max-pixels", mp,
                         "--max-new-tokens", "1" if mp == "0" else "2", "--output", str(tmp_path / out),
                         "--no-mlflow"]) == 0
    assert set(seen[1]) == {(84, 56)}  # 80 x 60 views, smart_resize to 28-pixel cells
    assert all(w * h <= 3136 and w % 28 == 0 and h % 28 == 0 for w, h in seen[2])
    res = read_results(str(tmp_path / "b"))
    assert res["scores"]["overall"] == 3 / 8  # "B" is right for indices 1, 4, 7


def test_crash_mid_benchmark_keeps_answers_and_resumes(tmp_path, count_generate):
    data, out = str(tmp_path / "vsi"), str(tmp_path / "out")
    rows = make_vsi(data)
    args = ["--benchmark", "vsi-bench", "--data", data, "--preset", "tiny", "--num-frames", "2",
            "--batch-size", "2", "--max-new-tokens", "4", "--output", out, "--no-mlflow"]
    count_generate["crash_after"] = 2
    with pytest.raises(RuntimeError, match="injected crash"):
        run_main(args)
    first = read_predictions(out)
    assert len(first) == 4 and not os.path.exists(os.path.join(out, "results.json"))
    asked_first = list(count_generate["texts"])
    # a kill during a write leaves a torn line: it is dropped and that question asked again
    with open(os.path.join(out, "predictions.jsonl"), "a") as f:
        f.write('{"key": "102", "prediction": "tor')
    count_generate.update(crash_after=None, texts=[])
    assert run_main(args) == 0
    assert not set(count_generate["texts"]) & set(asked_first)  # answered ones are not recomputed
    assert len(count_generate["texts"]) == len(rows) - 4
    final = read_predictions(out)
    assert sorted(p["key"] for p in final) == sorted(str(r["id"]) for r in rows)  # each question once
    assert final[:4] == first
    assert read_results(out)["n_answered"] == len(rows)


def test_other_settings_in_the_same_output_are_refused(tmp_path, capsys):
    data, out = str(tmp_path / "vsi"), str(tmp_path / "out")
    make_vsi(data)
    base = ["--benchmark", "vsi-bench", "--data", data, "--preset", "tiny", "--num-frames", "2", "--limit", "2",
            "--output", out, "--no-mlflow"]
    assert run_main(base) == 0
    capsys.readouterr()
    assert run_main(base + ["--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "max_new_tokens" in err and "--overwrite" in err
    assert run_main(base + ["--max-new-tokens", "4", "--overwrite"]) == 0
    assert len(read_predictions(out)) == 2


def test_skip_missing_scores_the_questions_that_have_media(tmp_path):
    data, out = str(tmp_path / "vsi"), str(tmp_path / "out")
    make_vsi(data)
    os.remove(os.path.join(data, "scannetpp", "0a5c013435.mp4"))
    assert run_main(["--benchmark", "vsi-bench", "--data", data, "--preset", "tiny", "--num-frames", "2",
                     "--skip-missing", "--batch-size", "4", "--max-new-tokens", "4", "--output", out,
                     "--no-mlflow"]) == 0
    res = read_results(out)
    assert res["n_skipped_missing_media"] == 3 and res["n_answered"] == 7 and not res["complete"]
    assert all(p["dataset"] != "scannetpp" for p in read_predictions(out))


# ============================================================ one-line failures, before any model load

@pytest.fixture()
def no_model(monkeypatch):
    import model.loading

    def boom(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(model.loading, "build_model_and_processor", boom)


def _break_vsi(kind, root):
    rows = make_vsi(root)
    pq = os.path.join(root, "test-00000-of-00001.parquet")
    if kind == "no folder":
        return os.path.join(root, "nope"), "no such folder"
    if kind == "no annotations":
        os.remove(pq)
        return root, "test-00000-of-00001.parquet"
    if kind == "missing column":
        write_table([{k: v for k, v in r.items() if k != "ground_truth"} for r in rows], root, "parquet")
        return root, "lacks ground_truth"
    if kind == "not parquet":
        with open(pq, "wb") as f:
            f.write(b"this is not parquet")
        return root, "cannot read"
    if kind == "unknown type":
        rows[0]["question_type"] = "object_colour"
        write_table(rows, root, "parquet")
        return root, "unknown question_type"
    if kind == "no options":
        rows[5]["options"] = None
        write_table(rows, root, "parquet")
        return root, "options"
    if kind == "bad number":
        rows[0]["ground_truth"] = "three"
        write_table(rows, root, "parquet")
        return root, "numerical ground_truth"
    if kind == "no videos":
        os.remove(os.path.join(root, "arkitscenes", "41069025.mp4"))
        return root, "scannetpp.zip"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["no folder", "no annotations", "missing column", "not parquet", "unknown type",
                                  "no options", "bad number", "no videos"])
def test_vsi_bench_missing_or_malformed_files_fail_in_one_line(tmp_path, capsys, no_model, kind):
    data, needle = _break_vsi(kind, str(tmp_path / "vsi"))
    rc = run_main(["--benchmark", "vsi-bench", "--data", data, "--preset", "tiny", "--output",
                   str(tmp_path / "out"), "--no-mlflow"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("launch/evaluate.py: error: vsi-bench") and needle in err
    if kind in ("no folder", "no annotations", "no videos"):
        assert "huggingface.co/datasets/nyu-visionx/VSI-Bench" in err


def _break_aab(kind, root):
    recs = make_allangles(root)
    path = os.path.join(root, "data.json")
    if kind == "no data.json":
        os.remove(path)
        return "data.json"
    if kind == "not json":
        with open(path, "w") as f:
            f.write("{not json")
        return "cannot read"
    if kind == "missing field":
        del recs[3]["image_path"]
    elif kind == "bad answer":
        recs[2]["answer"] = "D"
    elif kind == "no images":
        os.remove(os.path.join(root, recs[5]["image_path"][0]))
        with open(path, "w") as f:
            json.dump(recs, f)
        return "process_egoexo4d.py"
    with open(path, "w") as f:
        json.dump(recs, f)
    return {"missing field": "lacks image_path", "bad answer": "answer 'D'"}[kind]


@pytest.mark.parametrize("kind", ["no data.json", "not json", "missing field", "bad answer", "no images"])
def test_all_angles_missing_or_malformed_files_fail_in_one_line(tmp_path, capsys, no_model, kind):
    data = str(tmp_path / "aab")
    needle = _break_aab(kind, data)
    rc = run_main(["--benchmark", "all-angles", "--data", data, "--preset", "tiny", "--output",
                   str(tmp_path / "out"), "--no-mlflow"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("launch/evaluate.py: error: all-angles") and needle in err
    if kind in ("no data.json", "no images"):
        assert "huggingface.co/datasets/ch-chenyu/All-Angles-Bench" in err


@pytest.mark.parametrize("argv,needle", [
    ([], "--benchmark is required"),
    (["--benchmark", "vsi-bench"], "--data is required"),
    (["--benchmark", "vsi-bench", "--data", "D"], "--model PATH"),
    (["--benchmark", "vsi-bench", "--data", "D", "--preset", "tiny", "--model", "M"], "not both"),
    (["--benchmark", "vsi-bench", "--data", "D", "--preset", "huge"], "not one of"),
    (["--benchmark", "vsi-bench", "--data", "D", "--model", "/nonexistent"], "no config.json"),
    (["--benchmark", "vsi-bench", "--data", "D", "--preset", "tiny", "--num-frames", "0"], "--num-frames"),
    (["--benchmark", "vsi-bench", "--data", "D", "--preset", "tiny", "--batch-size", "0"], "--batch-size"),
    (["--benchmark", "vsi-bench", "--data", "D", "--preset", "tiny", "--device", "gpu"], "--device"),
    (["--benchmark", "vsi-bench", "--data", "D", "--preset", "tiny", "--max-pixels", "1000"], "--max-pixels"),
    (["--benchmark", "blink", "--data", "D", "--preset", "tiny"], "invalid choice"),
])
def test_bad_arguments_fail_in_one_line(capsys, no_model, argv, needle):
    with pytest.raises(SystemExit) as exc:
        evaluate.main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_non_qwen_families_are_refused_in_one_line(tmp_path, capsys, no_model):
    from model.presets import PRESETS, get_preset

    other = [name for name in PRESETS if get_preset(name).family not in evaluate.FAMILIES]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llava_next_video"}))
    assert {get_preset(n).family for n in other} == {"llava_next_video"}  # LLaVA-OneVision is evaluated
    for flags in [["--model", str(ckpt)]] + [["--preset", name] for name in other[:1]]:
        with pytest.raises(SystemExit) as exc:
            evaluate.main(["--benchmark", "vsi-bench", "--data", str(tmp_path)] + flags)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and len(err.splitlines()) == 1 and "qwen2_vl / qwen2_5_vl" in err, err
        assert "llava_next_video: its images go through any-resolution crops" in err, err


def test_cuda_device_without_cuda_fails_in_one_line(tmp_path, capsys, no_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    rc = run_main(["--benchmark", "vsi-bench", "--data", str(tmp_path), "--preset", "tiny", "--device", "cuda"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "CUDA is not available" in err


# ============================================================ MLflow

def test_mlflow_run_holds_params_metrics_and_artifacts(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    data, out = str(tmp_path / "vsi"), str(tmp_path / "out")
    make_vsi(data)
    assert run_main(["--benchmark", "vsi-bench", "--data", data, "--preset", "tiny", "--num-frames", "2",
                     "--batch-size", "5", "--max-new-tokens", "4", "--output", out, "--experiment", "eval-test"]) == 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("eval-test")
    (run,) = client.search_runs([exp.experiment_id])
    res = read_results(out)
    assert run.info.status == "FINISHED"
    assert run.data.params["benchmark"] == "vsi-bench" and run.data.params["preset"] == "tiny"
    assert run.data.tags["kind"] == "eval"
    for key, value in res["scores"].items():
        assert run.data.metrics[key] == pytest.approx(value)
    assert "object_counting_MRA:.5:.95:.05" in run.data.metrics and "overall" in run.data.metrics
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"predictions.jsonl", "results.json"} <= names


# ============================================================ issue 23: prompts per family, --frames-as clip

def test_all_angles_prompt_per_family_as_the_authors_fork(tmp_path, monkeypatch):
    """Qwen2-VL gets VLMEvalKit's Qwen2-VL MCQ prompt (stripped); Qwen2.5-VL and LLaVA-OneVision the dataset's
    own build_prompt, unstripped, as the authors' fork passes it."""
    data = str(tmp_path / "aab")
    recs = make_allangles(data)
    seen = {}

    def fake(model, processor, requests, **kw):
        seen.setdefault(model.config.model_type, []).extend(r.text for r in requests)
        return ["B"] * len(requests)

    monkeypatch.setattr(generation, "generate_batch", fake)
    for preset in ("tiny", "tiny-qwen2.5", "tiny-llava-ov"):
        assert run_main(["--benchmark", "all-angles", "--data", data, "--preset", preset, "--limit", "2",
                         "--output", str(tmp_path / preset), "--no-mlflow"]) == 0
    q = recs[0]["question"]
    body = f"Question: {q}\nOptions:\nA. left\nB. right\nC. behind\n"
    assert seen["qwen2_vl"][0] == body + "Please select the correct answer from the options above."
    assert seen["qwen2_5_vl"][0] == seen["llava_onevision"][0] == (
        body + "Please select the correct answer from the options above. \n")


def test_frames_as_clip_is_images_and_resumes_an_images_run(tmp_path, count_generate):
    """--frames-as clip is the documented name of images: the same input, and a run made as `images` (its run.json
    says so) resumes under `clip` without asking anything again."""
    data, out = str(tmp_path / "vsi"), str(tmp_path / "out")
    make_vsi(data)
    base = ["--benchmark", "vsi-bench", "--data", data, "--preset", "tiny", "--num-frames", "3", "--limit", "2",
            "--max-new-tokens", "2", "--output", out, "--no-mlflow"]
    assert run_main(base + ["--frames-as", "clip"]) == 0
    assert [p["n_images"] for p in read_predictions(out)] == [3, 3] and read_results(out)["frames_as"] == "clip"
    run_json = os.path.join(out, "run.json")
    with open(run_json) as f:
        run = json.load(f)
    assert run["signature"]["frames_as"] == "clip"
    run["signature"]["frames_as"] = "images"  # what the tool wrote before `clip` was the name
    with open(run_json, "w") as f:
        json.dump(run, f)
    n = len(count_generate["texts"])
    assert run_main(base + ["--frames-as", "clip"]) == 0 and run_main(base + ["--frames-as", "images"]) == 0
    assert len(count_generate["texts"]) == n == 2
    assert run_main(base) == 2  # auto is video for Qwen: other predictions, refused
