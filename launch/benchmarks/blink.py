"""BLINK (Fu et al. 2024), its Multi-view Reasoning subtask: layout, prompt, scoring hooks.

Data (the user's; nothing is downloaded): the Hugging Face dataset
`BLINK-Benchmark/BLINK`, config `Multi-view_Reasoning`, split `val` (133 questions; the
`test` split's answers are hidden): `Multi-view_Reasoning/val-00000-of-00001.parquet`,
records `idx`, `question`, `sub_task`, `image_1` ... `image_4` (images embedded as
{bytes, path}; null when absent), `choices`, `answer` ("(A)"), `prompt` (the question with
its lettered choices), `explanation`. `--data ROOT` is the dataset folder (or the
subtask folder, or the file itself):

    ROOT/Multi-view_Reasoning/val-00000-of-00001.parquet     (or --annotations FILE)

or the same records as JSON / JSONL whose `image_N` are image paths relative to the
file's folder (what the BLINK authors' `test_benchmark.py` writes when it saves the images).
A file holding other BLINK subtasks too is filtered to Multi-view Reasoning by `sub_task`.

Prompt, images and scoring follow lmms-eval's BLINK task (EvolvingLMMs-Lab/lmms-eval
lmms_eval/tasks/blink/utils.py `blink_doc_to_text`, `blink_doc_to_visual`,
`blink_process_results`, `blink_aggregate_results`; _default_template_yaml: split val,
`pre_prompt` below, `max_new_tokens` 1024; blink_multi_view_reasoning.yaml):

    "Note: You only need to respond with {A, B} without providing any additional information.\\n" + prompt

with the images `image_1`, `image_2`, ... (the non-null ones, in order, RGB) before the
text, one `{"type": "image"}` each. A question is right when `_extract_answer_letter` of
the answer equals `answer.strip("()")` (`scoring.score_blink`); the score is the fraction
right, `blink_acc`.
"""
from __future__ import annotations

import glob
import os
import re
from typing import Any

from launch.benchmarks import BenchmarkError, Question, given_annotations
from launch.benchmarks import references, scoring
from launch.benchmarks.references import Reference
from launch.benchmarks.tables import read_records, require_fields

NAME = "blink-multiview"
system_prompt = references.lmms_eval_system  # the system turn lmms-eval's wrapper sends
SUBTASK = "Multi-view_Reasoning"
DEFAULT_MAX_NEW_TOKENS = 1024
"""lmms-eval blink/_default_template_yaml `generation_kwargs.max_new_tokens` (greedy answers stop at the
end-of-turn token long before it when the model follows the prompt)."""
PROMPT_VERSION = 1
HEADLINE = "blink_acc"
"""The paper's headline sub-score of this benchmark (GASP: +15.0 BLINK multi-view)."""
LABEL = "BLINK multi-view"
HF_URL = "https://huggingface.co/datasets/BLINK-Benchmark/BLINK"
REFERENCE = ("EvolvingLMMs-Lab/lmms-eval lmms_eval/tasks/blink/utils.py (blink_doc_to_text, blink_doc_to_visual, "
             "_extract_answer_letter, blink_process_results, blink_aggregate_results) + _default_template_yaml")
PRE_PROMPT = "Note: You only need to respond with {} without providing any additional information.\n"
"""lmms-eval's `lmms_eval_specific_kwargs.default.pre_prompt` (formatted with the choice letters)."""
FIELDS = ("idx", "prompt", "choices", "answer", "image_1")
WHERE = (f"{HF_URL} (config {SUBTASK}, split val: {SUBTASK}/val-00000-of-00001.parquet; or the same records as "
         "JSON with image_N paths)")
EXPECTED = ("parquet, JSON or JSONL records with idx, prompt, choices, answer (\"(A)\") and image_1 ... image_4 "
            f"(embedded images or paths), the val split of {HF_URL} config {SUBTASK}")
ANNOTATION_NAMES = tuple(os.path.join(sub, name) for sub in (SUBTASK, "") for name in (
    "val-00000-of-00001.parquet", "val.parquet", "val.jsonl", "val.json"))
_IMAGE_KEY = re.compile(r"^image_(\d+)$")


def build_prompt(prompt: str, n_choices: int) -> str:
    """The text of lmms-eval's `blink_doc_to_text` (default kwargs)."""
    letters = ", ".join(chr(65 + i) for i in range(n_choices))
    return PRE_PROMPT.format(letters) + prompt


def find_annotations(data: str, annotations: str) -> tuple[str, str]:
    """(image root, annotation file) for `--data` (the dataset folder, the subtask folder or the file)."""
    root, path = given_annotations(NAME, data, annotations, EXPECTED, WHERE)
    if path is not None:
        return (root if annotations and os.path.isdir(data) else os.path.dirname(os.path.abspath(path))), path
    for name in ANNOTATION_NAMES:
        cand = os.path.join(data, name)
        if os.path.isfile(cand):
            return os.path.dirname(os.path.abspath(cand)), cand
    shards = sorted(glob.glob(os.path.join(data, SUBTASK, "val-*.parquet"))) or sorted(
        glob.glob(os.path.join(data, "val-*.parquet")))
    if shards:
        return os.path.dirname(os.path.abspath(shards[0])), shards[0]
    if glob.glob(os.path.join(data, SUBTASK, "test-*.parquet")) or glob.glob(os.path.join(data, "test-*.parquet")):
        raise BenchmarkError(f"{NAME}: {data} holds only the test split, whose answers are hidden; get the val split "
                             f"({SUBTASK}/val-00000-of-00001.parquet) from {HF_URL}, the split lmms-eval scores")
    raise BenchmarkError(f"{NAME}: no annotation file in {data} (looked for {SUBTASK}/val-00000-of-00001.parquet, "
                         f"val-00000-of-00001.parquet, val.json, val.jsonl); get it from {HF_URL} or pass "
                         f"--annotations FILE ({EXPECTED})")


def _is_multiview(record: dict[str, Any]) -> bool:
    """Is this record of the Multi-view Reasoning subtask? By `sub_task` when it has one, else by `idx`
    ("val_Multi-view_Reasoning_12"); a record naming neither is taken as one (a file of this subtask)."""
    sub = record.get("sub_task")
    if isinstance(sub, str) and sub.strip():
        return re.sub(r"[\s_-]+", "_", sub.strip().lower()) == "multi_view_reasoning"
    idx = str(record.get("idx", ""))
    other = re.match(r"^(val|test)_(.+)_\d+$", idx)
    return other is None or other.group(2) == SUBTASK


def _images(record: dict[str, Any], root: str, path: str, rec_id: Any) -> list[tuple[str, Any]]:
    """The record's images in `image_N` order: ("bytes", data, name) or ("path", file, name) each."""
    keys = sorted((int(m.group(1)), k) for k in record if (m := _IMAGE_KEY.match(k)))
    out = []
    for _, key in keys:
        value = record[key]
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if isinstance(value, dict):
            data = value.get("bytes")
            if isinstance(data, (bytes, bytearray)) and data:
                out.append(("bytes", bytes(data), key))
                continue
            value = value.get("path")
        if not isinstance(value, str) or not value:
            raise BenchmarkError(f"{NAME}: {path}: idx {rec_id} has an invalid {key} ({type(value).__name__}); "
                                 f"expected an embedded image {{bytes, path}} or an image path")
        out.append(("path", value if os.path.isabs(value) else os.path.join(root, value), key))
    if not out:
        raise BenchmarkError(f"{NAME}: {path}: idx {rec_id} has no image (image_1 ... image_4 are all empty)")
    return out


def load(data: str, annotations: str = "", family: str | None = None) -> tuple[str, str, list[Question]]:
    """(image root, annotation file, questions in file order) for `--data` / `--annotations`."""
    root, path = find_annotations(data, annotations)
    records = read_records(path, NAME)
    require_fields(records, FIELDS, path, NAME, EXPECTED)
    mine = [r for r in records if _is_multiview(r)]
    if not mine:
        subs = sorted({str(r.get("sub_task")) for r in records})
        raise BenchmarkError(f"{NAME}: {path} holds no Multi-view Reasoning question (sub_task: {', '.join(subs)}); "
                             f"pass the {SUBTASK} config of {HF_URL}")
    questions: list[Question] = []
    seen: set[str] = set()
    for r in mine:
        rec_id = r["idx"]
        key = str(rec_id)
        if key in seen:
            raise BenchmarkError(f"{NAME}: {path}: idx {rec_id} occurs twice; idx must be unique")
        seen.add(key)
        if not isinstance(r["prompt"], str) or not r["prompt"].strip():
            raise BenchmarkError(f"{NAME}: {path}: idx {rec_id} has an empty or invalid prompt: {r['prompt']!r}")
        choices = r["choices"]
        if (not isinstance(choices, list) or not 2 <= len(choices) <= 26
                or not all(isinstance(c, (str, int, float)) for c in choices)):
            raise BenchmarkError(f"{NAME}: {path}: idx {rec_id} needs choices as a list of 2 to 26 options, "
                                 f"got {choices!r}")
        answer = r["answer"]
        if isinstance(answer, str) and answer.strip().lower() == "hidden":
            raise BenchmarkError(f"{NAME}: {path}: idx {rec_id} has answer 'hidden' (the test split); score the val "
                                 f"split, the one lmms-eval scores")
        letters = [chr(65 + i) for i in range(len(choices))]
        if not isinstance(answer, str) or scoring.blink_answer_letter(answer) not in letters:
            raise BenchmarkError(f"{NAME}: {path}: idx {rec_id} has answer {answer!r}, not one of "
                                 f"{', '.join(f'({c})' for c in letters)}")
        images = _images(r, root, path, rec_id)
        media = [p if kind == "path" else f"{path}#{rec_id}/{name}" for kind, p, name in images]
        record = {"idx": rec_id, "sub_task": str(r.get("sub_task") or SUBTASK.replace("_", " ")),
                  "question": r.get("question"), "choices": [str(c) for c in choices], "answer": answer,
                  "images": [p if kind == "path" else f"embedded:{name}" for kind, p, name in images]}
        for k in ("dataset", "scene_name"):
            if isinstance(r.get(k), str) and r[k].strip():
                record[k] = r[k].strip()
        questions.append(Question(key=key, prompt=build_prompt(r["prompt"], len(choices)), media=media,
                                  record=record, group=key, payload={"images": images}))
    return root, path, questions


def missing_media(questions: list[Question]) -> list[str]:
    """Image files the questions need that are not there (embedded images are never missing)."""
    files = sorted({p for q in questions for kind, p, _ in q.payload["images"] if kind == "path"})
    return [p for p in files if not os.path.isfile(p)]


def missing_message(root: str, missing: list[str], total: int) -> str:
    return (f"{NAME}: {len(missing)} of {total} images are missing under {root} (first: {missing[0]}); "
            f"get them from {WHERE}, or pass --skip-missing to score only the questions whose images are there")


def media_count(questions: list[Question]) -> int:
    return len({p for q in questions for p in q.media})


def visuals(question: Question, loader) -> list:
    """The question's images in `image_N` order (`loader.image(path)` / `loader.image_bytes(data, name)`)."""
    return [loader.image(p) if kind == "path" else loader.image_bytes(p, f"{question.key}/{name}")
            for kind, p, name in question.payload["images"]]


def scenes(questions: list[Question]) -> set[tuple[str, str]] | None:
    """(dataset, scene_name) of the questions that name their source (optional fields of a record; the BLINK
    release names none, so there the leakage check has nothing to match)."""
    named = {(q.record["dataset"], q.record["scene_name"]) for q in questions
             if "dataset" in q.record and "scene_name" in q.record}
    return named or None


def score(record: dict[str, Any], prediction: str, reference: Reference | None = None,
          family: str | None = None) -> dict[str, Any]:
    """Per-question fields saved beside the prediction: the letter lmms-eval extracts and the hit."""
    ref = reference or references.resolve(NAME)
    letter, hit = scoring.score_blink(ref.postprocess(prediction, family), record["answer"])
    return {"extracted": letter, "hit": hit}


def aggregate(rows: list[dict[str, Any]], reference: Reference | None = None,
              family: str | None = None) -> dict[str, Any]:
    """`blink_acc` (lmms-eval `blink_aggregate_results`), re-scored from each row's `prediction`."""
    scored = [{"sub_task": r.get("sub_task", SUBTASK), "hit": score(r, r["prediction"], reference, family)["hit"]}
              for r in rows]
    return scoring.aggregate_blink(scored)


def metrics(agg: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics: `blink_acc`."""
    return {k: float(v) for k, v in agg["scores"].items()}

