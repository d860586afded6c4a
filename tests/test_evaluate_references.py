"""--reference versions: hand-made answers whose accuracies per sub-score were worked out by hand from
each version's rules (lmms-eval v0.5 / v0.6 / v0.7 / v0.7.2 / main, VLMEvalKit 18fc37a / main), and
rescoring a finished run under another version without loading the model (CPU).

The expected numbers below were worked out from the rules quoted beside each case; the same answers
through the references' own functions give the same numbers (the scratch check of issue 23).
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict

import pytest

from launch import evaluate
from launch.benchmarks import allangles, blink, references, scoring, vsibench

# ---------------------------------------------------------------------------------------- VSI-Bench
# object_counting, ground truth "4": MRA 1.0 at 4, 0.6 at 3 or 5 (error 25%), 0.1 at 2 (error 50%).
# Columns: v0.5 (float(first space-separated word), raw answer), v0.7 (<think>/<analysis> blocks cut and
# the answer stripped first), main (v0.7's stripping, then extract_number on the whole answer).
COUNTING = [  # (answer, v0.5, v0.7, main)
    ("4", 1.0, 1.0, 1.0),
    (" 4", 0.0, 1.0, 1.0),                          # v0.5: split(" ")[0] is "" -> unparsable
    ("4.\n", 1.0, 1.0, 1.0),                        # "4.\n" -> strip -> "4." -> float 4.0
    ("<think>count them</think>4", 0.0, 1.0, 1.0),  # v0.5: "<think>count" unparsable
    ("About 5", 0.0, 0.0, 0.6),                     # extract_number: 5 (error 25%)
    ("3m", 0.0, 0.0, 0.6),                          # float("3m") fails; extract_number: 3
    ("four", 0.0, 0.0, 1.0),                        # number word
    ("<answer>4</answer>", 0.0, 0.0, 1.0),          # v0.5 Qwen2.5-VL wrapper: 1.0 (parse_reasoning_model_answer)
    ("2 chairs", 0.1, 0.1, 0.1),
    ("There are 4 chairs", 0.0, 0.0, 1.0),          # "There" unparsable; extract_number: 4
]
# route_planning, ground truth "B": fuzzy_matching then case-insensitive equality (every version).
ROUTE = [  # (answer, v0.5, v0.7 = main)
    ("B", 1.0, 1.0),
    ("B.\n", 0.0, 1.0),                   # v0.5: "B.\n" -> rstrip(".") keeps the dot -> "B."
    (" B", 0.0, 1.0),
    ("b", 1.0, 1.0),
    ("The answer is B", 0.0, 0.0),        # first word "The"
    ("<think>hmm</think>B", 0.0, 1.0),
    ("A", 0.0, 0.0),
    ("B. Turn right", 1.0, 1.0),          # "B." -> "B"
]
REL_DISTANCE = [("A", 1.0), ("B", 0.0), ("C", 0.0)]  # ground truth "A": 1/3 (rounds to 0.333333 from v0.7.2)
REL_DIRECTION = [("object_rel_direction_easy", "A", 1.0, 1.0), ("object_rel_direction_medium", "B", 0.0, 0.0),
                 ("object_rel_direction_hard", " A", 0.0, 1.0)]  # ground truth "A"; (type, answer, v0.5, v0.7)


def vsi_rows() -> list[dict]:
    rows = [{"question_type": "object_counting", "ground_truth": "4", "prediction": a} for a, *_ in COUNTING]
    rows += [{"question_type": "route_planning", "ground_truth": "B", "prediction": a} for a, *_ in ROUTE]
    rows += [{"question_type": "object_rel_distance", "ground_truth": "A", "prediction": a} for a, _ in REL_DISTANCE]
    rows += [{"question_type": t, "ground_truth": "A", "prediction": a} for t, a, *_ in REL_DIRECTION]
    return rows


# hand-worked per-type means and overall (the plain mean of the four type scores)
_C05, _C05q, _C07, _Cmain = 2.1 / 10, 3.1 / 10, 4.1 / 10, 8.3 / 10
_R05, _R07 = 3 / 8, 6 / 8
_RD05, _RD07 = 1 / 3, 2 / 3
VSI_EXPECTED = {  # (version, family) -> {key: value}
    ("lmms-eval-v0.5", "qwen2_vl"): {"object_counting_MRA:.5:.95:.05": _C05, "route_planning_accuracy": _R05,
                                     "object_rel_distance_accuracy": 1 / 3, "object_rel_direction_accuracy": _RD05},
    ("lmms-eval-v0.5", "qwen2_5_vl"): {"object_counting_MRA:.5:.95:.05": _C05q, "route_planning_accuracy": _R05,
                                       "object_rel_distance_accuracy": 1 / 3,
                                       "object_rel_direction_accuracy": _RD05},
    ("lmms-eval-v0.7", "qwen2_5_vl"): {"object_counting_MRA:.5:.95:.05": _C07, "route_planning_accuracy": _R07,
                                       "object_rel_distance_accuracy": 1 / 3,
                                       "object_rel_direction_accuracy": _RD07},
    ("lmms-eval-v0.7.2", "qwen2_vl"): {"object_counting_MRA:.5:.95:.05": 0.41, "route_planning_accuracy": 0.75,
                                       "object_rel_distance_accuracy": 0.333333,
                                       "object_rel_direction_accuracy": 0.666667},
    ("lmms-eval-main", "qwen2_vl"): {"object_counting_MRA:.5:.95:.05": 0.83, "route_planning_accuracy": 0.75,
                                     "object_rel_distance_accuracy": 0.333333,
                                     "object_rel_direction_accuracy": 0.666667},
}
VSI_OVERALL = {  # overall from the unrounded type scores, then rounded (v0.7.2, main)
    ("lmms-eval-v0.5", "qwen2_vl"): (_C05 + _R05 + 1 / 3 + _RD05) / 4,
    ("lmms-eval-v0.5", "qwen2_5_vl"): (_C05q + _R05 + 1 / 3 + _RD05) / 4,
    ("lmms-eval-v0.7", "qwen2_5_vl"): (_C07 + _R07 + 1 / 3 + _RD07) / 4,
    ("lmms-eval-v0.7.2", "qwen2_vl"): round((_C07 + _R07 + 1 / 3 + _RD07) / 4, 6),
    ("lmms-eval-main", "qwen2_vl"): round((_Cmain + _R07 + 1 / 3 + _RD07) / 4, 6),
}


def test_hand_worked_columns_match_the_per_question_rules():
    """Each case's column, through this tool's per-question scoring under that version."""
    v05, v07, main = (references.REFERENCES[n] for n in ("lmms-eval-v0.5", "lmms-eval-v0.7", "lmms-eval-main"))
    rec = {"question_type": "object_counting", "ground_truth": "4"}
    for answer, e05, e07, emain in COUNTING:
        got = [vsibench.score(rec, answer, ref, "qwen2_vl")["score"] for ref in (v05, v07, main)]
        assert got == [e05, e07, emain], answer
    assert vsibench.score(rec, "<answer>4</answer>", v05, "qwen2_5_vl")["score"] == 1.0
    rec = {"question_type": "route_planning", "ground_truth": "B"}
    for answer, e05, e07 in ROUTE:
        assert [vsibench.score(rec, answer, ref, None)["score"] for ref in (v05, v07, main)] == [e05, e07, e07], answer


@pytest.mark.parametrize("version,family", list(VSI_EXPECTED))
def test_vsi_sub_scores_per_version_are_the_hand_worked_ones(version, family):
    agg = vsibench.aggregate(vsi_rows(), references.REFERENCES[version], family)
    want = VSI_EXPECTED[(version, family)]
    scores = agg["scores"]
    assert list(scores) == ["object_counting_MRA:.5:.95:.05", "object_rel_distance_accuracy",
                            "route_planning_accuracy", "object_rel_direction_accuracy", "overall"]
    for key, value in want.items():
        assert scores[key] == pytest.approx(value, abs=1e-15), key
    assert scores["overall"] == pytest.approx(VSI_OVERALL[(version, family)], abs=1e-15)
    if references.REFERENCES[version].vsi_round:
        assert all(v == round(v, 6) for v in scores.values())
        assert scores["object_rel_distance_accuracy"] == 0.333333  # exactly, not approximately


def test_the_default_is_todays_scoring():
    """--reference default for VSI-Bench is lmms-eval v0.5: the per-question rule this tool always had."""
    ref = references.resolve("vsi-bench")
    assert ref.name == "lmms-eval-v0.5"
    for answer, e05, *_ in COUNTING:
        assert scoring.score_vsi("object_counting", answer, "4") == e05 == vsibench.score(
            {"question_type": "object_counting", "ground_truth": "4"}, answer)["score"]


@pytest.mark.parametrize("text,value", [
    ("3", 3.0), ("About 10", 10.0), ("3m", 3.0), ("three", 3.0), ("Three boxes.", 3.0), ("twenty-one", 21.0),
    ("three hundred and twenty-one", 321.0), ("one apple, room 2", 1.0), ("room 2, one apple", 2.0),
    ("-2.5 m", -2.5), ("1e3", 1.0), ("+3", 3.0), ("two thousand", 2000.0), ("", None), ("none", None),
    ("zero", 0.0), ("a hundred", 100.0),
])
def test_extract_number_as_lmms_eval_main(text, value):
    assert scoring.extract_number(text) == value


@pytest.mark.parametrize("text,out", [
    ("<think>a</think> 20 ", "20"), ("  B.\n", "B."), ("<analysis>x</analysis><think>y</think>C", "C"),
    ("</think>B<think>", "</think>B<think>"),   # the end tag before the start: nothing cut, then stripped
    ("<think>a</think>1<think>b</think>2", "12"), ("<think>unclosed 4", "<think>unclosed 4"),
])
def test_reasoning_tags_stripped_as_lmms_eval_v07(text, out):
    assert scoring.strip_reasoning_tags(text) == out


# ------------------------------------------------------------------------------------- All-Angles
AAB_CHOICES = OrderedDict([("A", "left"), ("B", "right"), ("C", "behind the camera")])  # 4 + 5 + 17 = 26 chars
LONG_B = "B is correct because the object moves to the left side of the frame"  # 67 chars > 2 x 26
LONG_LEFT = "Looking at both views carefully, the chair that was on the far side now appears closer, so it is left"
AAB_CASES = [  # (answer, gold, category, option under 18fc37a, option under main)
    ("B", "B", "camera_pose_estimation", "B", "B"),
    ("The answer is B.", "B", "camera_pose_estimation", "B", "B"),
    (LONG_B, "B", "camera_pose_estimation", "B", "Z"),       # main: B is not among the last 4 tokens; text too long
    ("I think the answer is C", "C", "camera_pose_estimation", "C", "C"),  # "I" is not an option
    ("The correct answer is **A**", "C", "camera_pose_estimation", "A", "A"),
    ("A or B", "A", "camera_pose_estimation", "Z", "Z"),    # two letters, no option text
    ("Both A and B look plausible, but the answer is B", "B", "relative_direction", "Z", "B"),  # main: "answer is B"
    ("left", "A", "relative_direction", "A", "A"),          # option text
    (LONG_LEFT, "A", "relative_direction", "A", "Z"),       # main refuses text matching on a long answer
    ("the answer is a", "A", "relative_direction", "Z", "A"),  # main's regex is case-insensitive
    ("the answer is behind the camera", "C", "relative_direction", "C", "B"),  # main: "answer is b(ehind)" -> B
]
# hits: 18fc37a camera_pose 4/6 (B, B, B, C right; A for C wrong; Z), relative_direction 3/5 (Z; A; A; Z; C)
#       main    camera_pose 3/6 (B, B, Z, C), relative_direction 3/5 (B; A; Z; A; B wrong)
AAB_EXPECTED = {"vlmevalkit-18fc37a": {"overall": 7 / 11, "camera_pose_estimation": 4 / 6, "relative_direction": 3 / 5},
                "vlmevalkit-main": {"overall": 6 / 11, "camera_pose_estimation": 3 / 6, "relative_direction": 3 / 5}}


def aab_rows() -> list[dict]:
    return [{"key": str(i), "category": cat, "pair_idx": None, "options": dict(AAB_CHOICES), "answer": gold,
             "prediction": answer} for i, (answer, gold, cat, _, _) in enumerate(AAB_CASES)]


@pytest.mark.parametrize("version", list(AAB_EXPECTED))
def test_all_angles_per_version_hand_worked(version):
    ref = references.REFERENCES[version]
    for answer, _, _, e18, emain in AAB_CASES:
        assert scoring.extract_choice(answer, AAB_CHOICES, ref.can_infer) == (e18 if ref.can_infer == "18fc37a"
                                                                               else emain), answer
    scores = allangles.aggregate(aab_rows(), ref)["scores"]
    assert dict(scores) == pytest.approx(AAB_EXPECTED[version], abs=1e-15)
    assert list(scores) == ["overall", "camera_pose_estimation", "relative_direction"]


# ------------------------------------------------------------------------------------------- BLINK
BLINK_CASES = [  # (answer, gold, hit v0.6 Qwen2-VL, hit v0.6 Qwen2.5-VL, hit v0.7 / main)
    ("B", "(B)", 1, 1, 1),
    ("(B)", "(B)", 1, 1, 1),
    (" (b) right", "(B)", 1, 1, 1),                        # stripped; '(' skipped; lower case accepted
    ("The answer is B", "(B)", 0, 0, 0),                   # the first letter of the first word: T
    ("**B**", "(B)", 0, 0, 0),                             # '*' is not skipped
    ("<think>the camera moves</think>B", "(B)", 0, 0, 1),  # v0.7 cuts the think block
    ("A", "(B)", 0, 0, 0),
    ("right", "(B)", 0, 0, 0),                             # R, not the option text
    ("Answer: A", "(A)", 1, 1, 1),                         # the fallback: "Answer" starts with A
    ("<answer>B</answer>", "(B)", 0, 1, 0),                # v0.6's Qwen2.5-VL wrapper parses <answer>
    ("\n\nB.", "(B)", 1, 1, 1),
    ("Bright", "(B)", 1, 1, 1),                            # B
]
BLINK_EXPECTED = {("lmms-eval-v0.6", "qwen2_vl"): 6 / 12, ("lmms-eval-v0.6", "qwen2_5_vl"): 7 / 12,
                  ("lmms-eval-v0.7", "qwen2_vl"): 7 / 12, ("lmms-eval-v0.7.2", "qwen2_5_vl"): 7 / 12,
                  ("lmms-eval-main", "llava_onevision"): 7 / 12}


def blink_rows() -> list[dict]:
    return [{"key": f"val_Multi-view_Reasoning_{i}", "sub_task": "Multi-view Reasoning", "answer": gold,
             "prediction": answer} for i, (answer, gold, *_) in enumerate(BLINK_CASES, 1)]


@pytest.mark.parametrize("version,family", list(BLINK_EXPECTED))
def test_blink_accuracy_per_version_hand_worked(version, family):
    ref = references.REFERENCES[version]
    col = 4 if ref.strip_tags else (3 if family == "qwen2_5_vl" else 2)
    for case in BLINK_CASES:
        assert blink.score({"answer": case[1]}, case[0], ref, family)["hit"] == case[col], case
    agg = blink.aggregate(blink_rows(), ref, family)
    assert agg["scores"] == {"blink_acc": BLINK_EXPECTED[(version, family)]}
    assert agg["counts"] == {"Multi-view Reasoning": 12}


@pytest.mark.parametrize("text,letter", [
    ("B", "B"), ("(b)", "B"), ("  (C) the left one", "C"), ("C. left", "C"), ("The answer is B", "T"),
    ("**B**", ""), ("<think>x</think>B", ""), ("", ""), ("((  A", "A"), ("1", ""), ("- A", ""),
])
def test_blink_letter_extraction(text, letter):
    assert scoring.blink_extract_letter(text) == letter


# ---------------------------------------------------------------------------- flags and rescoring

@pytest.mark.parametrize("bench,name,needle", [
    ("blink-multiview", "lmms-eval-v0.5", "starts at v0.6"),
    ("all-angles", "lmms-eval-main", "vlmevalkit-18fc37a, vlmevalkit-main"),
    ("vsi-bench", "vlmevalkit-main", "lmms-eval-v0.5"),
])
def test_a_version_that_does_not_score_the_benchmark_is_refused_in_one_line(capsys, bench, name, needle):
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--benchmark", bench, "--data", "D", "--preset", "tiny", "--reference", name])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_rescoring_a_finished_run_under_another_version_needs_no_model(tmp_path, monkeypatch):
    """A finished VSI-Bench run rescored under lmms-eval main: results-lmms-eval-main.json beside results.json,
    from the same predictions, without loading the model; the numbers are the versions' own."""
    from test_evaluate import make_vsi, read_results

    data, out = str(tmp_path / "vsi"), str(tmp_path / "out")
    make_vsi(data)
    args = ["--benchmark", "vsi-bench", "--data", data, "--preset", "tiny", "--num-frames", "2", "--batch-size", "5",
            "--max-new-tokens", "2", "--output", out, "--no-mlflow", "--quiet"]
    assert evaluate.main(args) == 0
    # replace the random model's answers by chosen ones (same keys), as if the model had said them
    path = os.path.join(out, "predictions.jsonl")
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    answers = {"object_counting": "<think>x</think>3", "object_abs_distance": "About 2.5",
               "object_size_estimation": "120cm", "room_size_estimation": " 20.5"}
    for r in rows:
        r["prediction"] = answers.get(r["question_type"], f" {r['ground_truth']}")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)

    import model.loading

    def no_model(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(model.loading, "build_model_and_processor", no_model)
    assert evaluate.main(args) == 0
    assert evaluate.main(args + ["--reference", "lmms-eval-main"]) == 0
    old = read_results(out)
    with open(os.path.join(out, "results-lmms-eval-main.json")) as f:
        new = json.load(f)
    assert old["reference_version"] == "lmms-eval-v0.5" and new["reference_version"] == "lmms-eval-main"
    # v0.5: every answer unparsable or space-led -> 0; main strips and extracts numbers -> every one right
    assert all(v == 0.0 for v in old["scores"].values())
    assert all(v == 1.0 for v in new["scores"].values())
