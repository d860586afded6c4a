"""Scoring of VSI-Bench, All-Angles Bench and BLINK multi-view, as their reference evaluation code scores.

Pure functions of the saved predictions (numpy only, no model, no I/O), so a
results.json can always be recomputed from predictions.jsonl. The version-dependent
pieces (lmms-eval main's `extract_number`, v0.7's `strip_reasoning_tags`, v0.5's
`parse_reasoning_model_answer`, VLMEvalKit main's `can_infer` rules) are here too; which
version uses which is `references.py`.

VSI-Bench follows lmms-eval's `vsibench` task (the code the VSI-Bench authors
released their numbers with); the rules below are v0.5 / v0.6's (the default):

- EvolvingLMMs-Lab/lmms-eval  lmms_eval/tasks/vsibench/utils.py   (scoring, aggregation)
- EvolvingLMMs-Lab/lmms-eval  lmms_eval/tasks/vsibench/vsibench.yaml (prompts, greedy, max_new_tokens 16)
- vision-x-nyu/thinking-in-space  lmms_eval/tasks/vsibench/utils.py (the same functions)

What that code does, and this module does the same way:

- answer extraction (`fuzzy_matching`): `pred.split(" ")[0].rstrip(".").strip()`: the
  text up to the first SPACE (not any whitespace), trailing dots removed, then stripped.
- multiple choice (`exact_match`): 1.0 when the extracted answer equals the ground
  truth letter case-insensitively (`str.lower`), else 0.0.
- numerical answers: Mean Relative Accuracy. `to_float` is Python's `float()` (so
  "3", "2.5", "1e3", "inf", "nan" parse; anything that raises gives None); the relative
  error is `abs(pred - gt) / gt` in Python floats; the thresholds are
  `np.linspace(.5, .95, int((.95 - .5) / .05 + 2))`, i.e. 10 points because the float
  quotient is 8.999999999999998; a threshold theta counts when
  `rel_err <= 1 - theta` (`<=`, with `1 - theta` computed in float64 on the linspace
  values, e.g. 1 - 0.95 = 0.050000000000000044 and 1 - 0.8 = 0.19999999999999996).
  The score is the mean of the 10 booleans. An unparsable prediction raises TypeError
  in the reference, which scores it 0 (`WORST_CASE_FOR_METRICS`); NaN and inf compare
  False everywhere and score 0 too.
- aggregation: per question type the mean score (pandas groupby order, i.e. sorted
  type names), keyed `<type>_accuracy` (multiple choice) or `<type>_MRA:.5:.95:.05`
  (numerical); `object_rel_direction_{easy,medium,hard}_accuracy` are replaced by their
  plain mean `object_rel_direction_accuracy` (appended last); `overall` is the plain
  mean of the remaining per-type values, summed in that order.

All-Angles Bench follows the evaluation its authors used, VLMEvalKit's multiple-choice
path with exact matching (no LLM judge):

- open-compass/VLMEvalKit  vlmeval/utils/matching_util.py  (`can_infer_option`,
  `can_infer_text`, `can_infer`; commit 18fc37a5337e31eec9c104887728ad14e82a6a85)
- open-compass/VLMEvalKit  vlmeval/vlm/qwen2_vl/prompt.py    (the Qwen2-VL MCQ prompt)

An answer that `can_infer` cannot map to an option becomes 'Z' (VLMEvalKit's
"Failed in Prefetch ... exact_matching" outcome), which never equals the answer.
Accuracy is the fraction of hits overall (VLMEvalKit `report_acc`: a mean over
questions) and per `category`. Pair consistency over `pair_idx` twins is this
project's definition (see `pair_consistency`), in the CC / WW / IC terms of the
All-Angles Bench paper.

BLINK multi-view follows lmms-eval's `blink` task (lmms_eval/tasks/blink/utils.py,
the same from v0.6 to main): `_extract_answer_letter` against `answer.strip("()")`,
accuracy over questions (`blink_extract_letter`, `score_blink`, `aggregate_blink`).
"""
from __future__ import annotations

import copy
import math
import re
import string
from collections import OrderedDict
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

# --------------------------------------------------------------------------- VSI-Bench

MCA_QUESTION_TYPES = (
    "object_rel_direction_easy",
    "object_rel_direction_medium",
    "object_rel_direction_hard",
    "object_rel_distance",
    "route_planning",
    "obj_appearance_order",
)
"""Multiple-choice question types (scored by exact match)."""

NA_QUESTION_TYPES = (
    "object_abs_distance",
    "object_counting",
    "object_size_estimation",
    "room_size_estimation",
)
"""Numerical-answer question types (scored by Mean Relative Accuracy)."""

REL_DIRECTION_LEVELS = ("object_rel_direction_easy", "object_rel_direction_medium", "object_rel_direction_hard")
MCA_METRIC = "accuracy"
NA_METRIC = "MRA:.5:.95:.05"
MRA_START, MRA_END, MRA_INTERVAL = .5, .95, .05


def fuzzy_matching(pred: str) -> str:
    """The reference's answer extraction: first space-separated word, trailing dots off, stripped."""
    return pred.split(" ")[0].rstrip(".").strip()


def exact_match(pred: str, target: str) -> float:
    """1.0 when `pred` equals `target` ignoring case (`str.lower`), else 0.0."""
    return 1.0 if pred.lower() == target.lower() else 0.0


def to_float(text: Any) -> float | None:
    """Python's float(text), or None when that raises (as the reference's `to_float`)."""
    try:
        return float(text)
    except BaseException:  # noqa: B036 - the reference catches everything too
        return None


def mra_thresholds(start: float = MRA_START, end: float = MRA_END, interval: float = MRA_INTERVAL) -> np.ndarray:
    """The confidence thresholds theta, built as the reference builds them (10 values for .5:.95:.05)."""
    num_pts = (end - start) / interval + 2
    return np.linspace(start, end, int(num_pts))


_THRESHOLDS = mra_thresholds()
_TOLERANCES = 1 - _THRESHOLDS  # (10,) float64, e.g. last = 0.050000000000000044


def mean_relative_accuracy(pred: float, target: float) -> float:
    """Fraction of thresholds theta with abs(pred - target) / target <= 1 - theta.

    Raises TypeError when either value is None (the caller scores that 0) and
    ZeroDivisionError when target is 0 (as the reference; loaders reject such rows).
    """
    rel = abs(pred - target) / target  # Python floats, as `abs_dist_norm`
    return float((rel <= _TOLERANCES).mean())


_NUMBER_WORDS = {w: float(v) for w, v in (
    ("zero", 0), ("one", 1), ("two", 2), ("three", 3), ("four", 4), ("five", 5), ("six", 6), ("seven", 7),
    ("eight", 8), ("nine", 9), ("ten", 10), ("eleven", 11), ("twelve", 12), ("thirteen", 13), ("fourteen", 14),
    ("fifteen", 15), ("sixteen", 16), ("seventeen", 17), ("eighteen", 18), ("nineteen", 19), ("twenty", 20),
    ("thirty", 30), ("forty", 40), ("fifty", 50), ("sixty", 60), ("seventy", 70), ("eighty", 80), ("ninety", 90),
    ("hundred", 100), ("thousand", 1000))}
_DIGITS = re.compile(r"-?\d+(?:\.\d+)?")
_WORD = re.compile(r"[a-z]+")


def extract_number(text: Any) -> float | None:
    """lmms-eval main's numeric parser (lmms_eval/tasks/vsibench/utils.py `extract_number`, commit 75571cfe).

    On the whole answer, lower-cased and stripped: the first number token wins, a run
    of digits (`-?\\d+(\\.\\d+)?`, so "3m" -> 3, "About 10" -> 10, "1e3" -> 1, "+3" -> 3) or a
    run of English number words (zero ... ninety, hundred, thousand; "and" inside a run
    is skipped, hyphens split words: "twenty-one" -> 21, "three hundred and twenty-one"
    -> 321). None when there is neither.
    """
    if text is None:
        return None
    s = str(text).strip().lower()
    if not s:
        return None
    digits = _DIGITS.search(s)
    run_start, run = None, []
    for m in _WORD.finditer(s):
        tok = m.group(0)
        if run_start is None:
            if tok in _NUMBER_WORDS:
                run_start, run = m.start(), [tok]
        elif tok in _NUMBER_WORDS:
            run.append(tok)
        elif tok != "and":
            break
    if digits is not None and (run_start is None or digits.start() < run_start):
        return float(digits.group(0))
    if run_start is None:
        return None
    total = current = 0.0
    for tok in run:
        value = _NUMBER_WORDS[tok]
        if value == 100:
            current = max(current, 1.0) * 100
        elif value == 1000:
            total += max(current, 1.0) * 1000
            current = 0.0
        else:
            current += value
    return total + current


def score_vsi(question_type: str, prediction: str, ground_truth: str, numeric: str = "float") -> float:
    """The per-question score of the reference's `vsibench_process_results`.

    numeric: how a numerical answer is read: "float" (`float(fuzzy_matching(answer))`, lmms-eval
    up to v0.7.2 and thinking-in-space) or "extract_number" (lmms-eval main).
    """
    if question_type in MCA_QUESTION_TYPES:
        return exact_match(fuzzy_matching(prediction), ground_truth)
    if question_type in NA_QUESTION_TYPES:
        value = extract_number(prediction) if numeric == "extract_number" else to_float(fuzzy_matching(prediction))
        try:
            return mean_relative_accuracy(value, to_float(ground_truth))
        except TypeError:
            return 0.0
    raise ValueError(f"unknown VSI-Bench question type {question_type!r}")


def vsi_metric_key(question_type: str) -> str:
    """`<type>_accuracy` or `<type>_MRA:.5:.95:.05` (the reference's output keys)."""
    if question_type in MCA_QUESTION_TYPES:
        return f"{question_type}_{MCA_METRIC}"
    if question_type in NA_QUESTION_TYPES:
        return f"{question_type}_{NA_METRIC}"
    raise ValueError(f"unknown VSI-Bench question type {question_type!r}")


def aggregate_vsi(rows: Iterable[Mapping[str, Any]], round_digits: int | None = None) -> dict[str, Any]:
    """Per-type scores and `overall` from rows with `question_type` and `score`.

    Returns {"scores": OrderedDict(reference keys -> value, `overall` last),
    "counts": {question_type: n}, "complete_levels": bool}. With all three
    `object_rel_direction` levels present (the full benchmark) this is the reference's
    `vsibench_aggregate_results` exactly. When a partial run (--limit) lacks some
    levels, `object_rel_direction_accuracy` is the mean of the levels present (absent
    when none is), where the references do otherwise: lmms-eval raises KeyError;
    thinking-in-space leaves relative direction out when the easy level is absent and
    raises KeyError when easy is present but medium or hard is missing.
    `complete_levels` is then False. `round_digits` (lmms-eval v0.7.2 and main: 6) rounds
    every reported value, `overall` being computed from the unrounded ones first.
    """
    by_type: dict[str, list[float]] = {}
    for r in rows:
        by_type.setdefault(r["question_type"], []).append(float(r["score"]))
    out: "OrderedDict[str, float]" = OrderedDict()
    for qtype in sorted(by_type):  # pandas groupby sorts the group keys
        vsi_metric_key(qtype)  # unknown types fail as in the reference
        out[vsi_metric_key(qtype)] = float(np.mean(np.asarray(by_type[qtype], dtype=np.float64)))
    levels = [out.pop(f"{lv}_{MCA_METRIC}") for lv in REL_DIRECTION_LEVELS if f"{lv}_{MCA_METRIC}" in out]
    if levels:
        out[f"object_rel_direction_{MCA_METRIC}"] = sum(levels) / float(len(levels))
    if out:
        out["overall"] = sum(v for v in out.values()) / len(out)
    if round_digits is not None:  # lmms-eval v0.7.2+: each reported value rounded, `overall` from unrounded ones
        out = OrderedDict((k, round(v, round_digits)) for k, v in out.items())
    return {"scores": out, "counts": {k: len(v) for k, v in sorted(by_type.items())},
            "complete_levels": len(levels) == len(REL_DIRECTION_LEVELS)}


# ---------------------------------------------------------------------- All-Angles Bench

FAIL_MSG = "Failed to obtain answer via API"
_REJECT_TO_ANSWER = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)


CAN_INFER_RULES = ("18fc37a", "main")
"""VLMEvalKit `can_infer` versions: commit 18fc37a (the All-Angles authors' fork) and main (e8e78f05)."""
_VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")
"""VLMEvalKit main's `_VERBOSE_ANSWER_RE` ("The answer is C", "correct answer is **B**"); case-insensitive,
so the letter may be lower case ("the answer is behind" reads B)."""


def can_infer_option(answer: str, choices: Mapping[str, Any], rules: str = "18fc37a") -> str | bool:
    """VLMEvalKit's option-letter extraction (VERBOSE unset, its default).

    Punctuation `.()[],:;!*#{}` becomes spaces, the text is split on whitespace, and
    when exactly one option letter occurs as a token that letter is the answer; a
    refusal phrase, or no letter but a lone 'Z' token, gives 'Z'; otherwise False.
    rules="main" (VLMEvalKit main): the one letter counts only when its first
    occurrence is among the last 4 tokens (`splits.index(ch) > len(splits) - 5`), and
    when no letter was taken, "answer is X" (`_VERBOSE_ANSWER`, X in A-D and an option)
    gives X.
    """
    if FAIL_MSG in answer:
        return False
    for err in _REJECT_TO_ANSWER:
        if err in answer:
            return "Z"
    answer_mod = answer
    for c in ".()[],:;!*#{}":
        answer_mod = answer_mod.replace(c, " ")
    splits = [x.strip() for x in answer_mod.split()]
    count = sum(1 for c in choices if c in splits)
    if count == 1:
        for ch in choices:
            if ch in splits and (rules != "main" or splits.index(ch) > len(splits) - 5):
                return ch
    elif count == 0 and sum(1 for c in ("Z", "") if c in splits) == 1:
        return "Z"
    if rules == "main":
        m = _VERBOSE_ANSWER.search(answer or "")
        if m and m.group(1).upper() in choices:
            return m.group(1).upper()
    return False


def can_infer_text(answer: str, choices: Mapping[str, Any], rules: str = "18fc37a") -> str | bool:
    """VLMEvalKit's option-text extraction: the one option whose lower-cased text occurs in the answer.

    rules="main": an answer longer than twice the options' total length matches no text.
    """
    answer = answer.lower()
    if rules == "main" and len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return False
    lowered = {k: str(v).lower() for k, v in choices.items()}
    cands = [k for k in lowered if lowered[k] in answer]
    return cands[0] if len(cands) == 1 else False


def can_infer(answer: Any, choices: Mapping[str, Any], rules: str = "18fc37a") -> str | bool:
    """VLMEvalKit's `can_infer`: option letter first, else option text."""
    if rules not in CAN_INFER_RULES:
        raise ValueError(f"unknown can_infer rules {rules!r}")
    answer = str(answer)
    copt = can_infer_option(answer, choices, rules)
    return copt if copt else can_infer_text(answer, copy.copy(dict(choices)), rules)


def options_of(item: Mapping[str, Any]) -> "OrderedDict[str, str]":
    """{letter: text} for every upper-case letter key with a value (VLMEvalKit's MCQ options)."""
    out: "OrderedDict[str, str]" = OrderedDict()
    for cand in string.ascii_uppercase:
        if cand in item and not _isna(item[cand]):
            out[cand] = str(item[cand])
    return out


def extract_choice(prediction: str, choices: Mapping[str, Any], rules: str = "18fc37a") -> str:
    """The option the prediction names ('Z' when none can be inferred: exact matching, no judge)."""
    opt = can_infer(prediction, choices, rules)
    return opt if opt else "Z"


def score_allangles(prediction: str, choices: Mapping[str, Any], answer: str,
                    rules: str = "18fc37a") -> tuple[str, float]:
    """(extracted option, hit) of one All-Angles question."""
    opt = extract_choice(prediction, choices, rules)
    return opt, 1.0 if opt == str(answer) else 0.0


def pair_consistency(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Consistency of paired questions: CC (both right), WW (both wrong), IC (one of two).

    A pair is the unordered set {index, pair_idx} of a row whose `pair_idx` names
    another answered row (each such set counted once; pointers need not be
    reciprocal). Returns counts and rates over pairs; `pair_consistency` = the CC rate
    (a pair counts only when BOTH questions are right), and the same per category
    (the category of the row with the smaller index).
    """
    by_key = {str(r["index"]): r for r in rows}
    seen: set[tuple[str, str]] = set()
    pairs: list[tuple[Mapping[str, Any], Mapping[str, Any]]] = []
    for r in rows:
        other = r.get("pair_idx")
        if other is None or str(other) == str(r["index"]) or str(other) not in by_key:
            continue
        key = tuple(sorted((str(r["index"]), str(other)), key=_index_order))
        if key in seen:
            continue
        seen.add(key)
        pairs.append((by_key[key[0]], by_key[key[1]]))

    def summarize(ps: list) -> dict[str, Any]:
        n = len(ps)
        cc = sum(1 for a, b in ps if a["hit"] and b["hit"])
        ww = sum(1 for a, b in ps if not a["hit"] and not b["hit"])
        ic = n - cc - ww
        rate = (lambda k: k / n) if n else (lambda k: None)
        return {"n_pairs": n, "CC": cc, "WW": ww, "IC": ic, "pair_consistency": rate(cc),
                "CC_rate": rate(cc), "WW_rate": rate(ww), "IC_rate": rate(ic)}

    out = summarize(pairs)
    per_cat: dict[str, list] = {}
    for a, b in pairs:
        per_cat.setdefault(str(a["category"]), []).append((a, b))
    out["per_category"] = {c: summarize(ps) for c, ps in sorted(per_cat.items())}
    return out


def aggregate_allangles(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Overall and per-category accuracy (VLMEvalKit `report_acc`) plus pair consistency.

    rows: dicts with `index`, `category`, `hit`, optionally `pair_idx`. Returns
    {"scores": {"overall": micro mean, "<category>": mean, ...}, "counts": {...},
    "macro_category_mean": mean of the category accuracies, "pairs": pair_consistency(...)}.
    """
    hits_by_cat: dict[str, list[float]] = {}
    for r in rows:
        hits_by_cat.setdefault(str(r["category"]), []).append(float(r["hit"]))
    scores: "OrderedDict[str, float]" = OrderedDict()
    if rows:
        scores["overall"] = float(np.mean(np.asarray([float(r["hit"]) for r in rows], dtype=np.float64)))
    for cat in sorted(hits_by_cat):
        scores[cat] = float(np.mean(np.asarray(hits_by_cat[cat], dtype=np.float64)))
    cat_means = [scores[c] for c in sorted(hits_by_cat)]
    return {"scores": scores, "counts": {c: len(v) for c, v in sorted(hits_by_cat.items())},
            "macro_category_mean": (sum(cat_means) / len(cat_means)) if cat_means else None,
            "pairs": pair_consistency(rows)}


# ------------------------------------------------------------------- BLINK multi-view

_BLINK_LETTER = re.compile(r"[(\s]*([A-Z])", re.IGNORECASE)
"""The match that decides lmms-eval's `_extract_answer_letter` (its trailing `[\\)\\.\\s]*` never changes
whether or what it matches)."""


def blink_extract_letter(text: str) -> str:
    """lmms-eval's BLINK answer extraction (lmms_eval/tasks/blink/utils.py `_extract_answer_letter`).

    The stripped answer must START with optional '(' / whitespace and then a letter; that
    letter, upper-cased, is the answer ("B", "(b)", "C. left" -> B, B, C). Anything else
    gives "": a leading word counts as its first letter ("The answer is B" -> "T"), and a
    leading '*' or '<' gives "" ("**B**", "<think>..." -> "").
    """
    m = _BLINK_LETTER.match(text.strip())
    return m.group(1).upper() if m else ""


def blink_answer_letter(answer: str) -> str:
    """The gold letter as lmms-eval's `blink_process_results` reads it: `answer.strip("()")` ("(A)" -> "A")."""
    return str(answer).strip("()")


def score_blink(prediction: str, answer: str) -> tuple[str, float]:
    """(extracted letter, hit) of one BLINK question (lmms-eval `blink_process_results`)."""
    letter = blink_extract_letter(prediction)
    return letter, 1.0 if letter == blink_answer_letter(answer) else 0.0


def aggregate_blink(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """lmms-eval's `blink_aggregate_results`: correct / total (0 when empty), keyed `blink_acc`.

    rows: dicts with `hit` and `sub_task`. Returns {"scores": {"blink_acc": ...}, "counts": {sub_task: n}}.
    """
    n = len(rows)
    correct = sum(1 for r in rows if r["hit"])
    counts: dict[str, int] = {}
    for r in rows:
        counts[str(r["sub_task"])] = counts.get(str(r["sub_task"]), 0) + 1
    return {"scores": OrderedDict([("blink_acc", correct / n if n > 0 else 0)]), "counts": dict(sorted(counts.items()))}


# ------------------------------------------------------- answer post-processing (versions)

LMMS_EVAL_REASONING_TAGS = (("<think>", "</think>"), ("<analysis>", "</analysis>"))
"""lmms-eval v0.7+'s default `--reasoning_tags` (lmms_eval/__main__.py)."""


def strip_reasoning_tags(text: str, tag_pairs: Sequence[Sequence[str]] = LMMS_EVAL_REASONING_TAGS) -> str:
    """lmms-eval v0.7+'s evaluator step before every task's scoring (lmms_eval/api/reasoning.py
    `strip_reasoning_tags`): each start...end block is cut out (per pair, leftmost first, while
    both tags occur and the end follows the start), then surrounding whitespace is stripped."""
    out = text
    for start_tag, end_tag in tag_pairs:
        while start_tag in out and end_tag in out:
            start = out.find(start_tag)
            end = out.find(end_tag, start)
            if end == -1:
                break
            out = out[:start] + out[end + len(end_tag):]
    return out.strip()


_ANSWER_TAG = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
_BOXED = re.compile(r"\\boxed\{\s*(.*?)\s*\}", re.DOTALL)


def parse_reasoning_model_answer(text: str) -> str:
    """lmms-eval v0.5 / v0.6's Qwen2.5-VL model wrappers (lmms_eval/models/model_utils/reasoning_model_utils.py
    `parse_reasoning_model_answer`, called by models/simple/qwen2_5_vl.py and models/chat/qwen2_5_vl.py on
    every answer): the content of the first `<answer>...</answer>`, else of the first `\\boxed{...}`
    (up to the first '}'), else the answer unchanged."""
    m = _ANSWER_TAG.search(text)
    if m:
        return m.group(1)
    m = _BOXED.search(text)
    return m.group(1) if m else text


# --------------------------------------------------------------------------- helpers

def _isna(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _index_order(k: str) -> tuple[int, Any]:
    """Sort key of question indices: numerically when they are integers."""
    return (0, int(k)) if re.fullmatch(r"-?\d+", k) else (1, k)
