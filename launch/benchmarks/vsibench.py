"""VSI-Bench (Yang et al. 2024, "Thinking in Space"): data layout, prompts, scoring hooks.

Data (the user's; nothing is downloaded): the Hugging Face dataset
`nyu-visionx/VSI-Bench` ships `test-00000-of-00001.parquet` (5130 questions: `id`,
`dataset`, `scene_name`, `question_type`, `question`, `options`, `ground_truth`) and
`arkitscenes.zip`, `scannet.zip`, `scannetpp.zip`, which unzip to one folder per
source dataset holding `<scene_name>.mp4`. `--data ROOT` is that folder:

    ROOT/test-00000-of-00001.parquet     (or test.parquet / test.jsonl / test.json, or --annotations FILE)
    ROOT/arkitscenes/<scene_name>.mp4
    ROOT/scannet/<scene_name>.mp4
    ROOT/scannetpp/<scene_name>.mp4

i.e. a question's video is `ROOT/<dataset>/<scene_name>.mp4`, as in lmms-eval's
`vsibench_doc_to_visual` (EvolvingLMMs-Lab/lmms-eval lmms_eval/tasks/vsibench/utils.py).

Prompts are that task's `vsibench_doc_to_text` with its default kwargs
(lmms_eval/tasks/vsibench/vsibench.yaml: pre_prompt "" -> "These are frames of a video."):

    numerical:        "These are frames of a video.\\n{question}\\n"
                      "Please answer the question using a single word or phrase."
    multiple choice:  "These are frames of a video.\\n{question}\\nOptions:\\n{options joined by \\n}\\n"
                      "Answer with the option's letter from the given choices directly."

The sampled frames reach Qwen models as one video input (lmms-eval's protocol), or as
images (one `{"type": "image"}` each, before the text: `--frames-as clip`, the way GASP
trains, and LLaVA-OneVision's only path here). Scoring: `scoring.score_vsi`,
`scoring.aggregate_vsi`, under the `--reference` version (references.py).
"""
from __future__ import annotations

import glob
import math
import os
from typing import Any

from launch.benchmarks import BenchmarkError, Question, given_annotations
from launch.benchmarks import references, scoring
from launch.benchmarks.references import Reference
from launch.benchmarks.tables import read_records, require_fields

NAME = "vsi-bench"
IS_VIDEO = True
system_prompt = references.lmms_eval_system  # the system turn lmms-eval's wrapper sends
"""Questions are about one video each (Qwen models can take it as a video input)."""
DEFAULT_MAX_NEW_TOKENS = 16
"""lmms-eval vsibench.yaml `generation_kwargs.max_new_tokens`."""
HEADLINE = f"object_counting_{scoring.NA_METRIC}"
"""The paper's headline sub-score of this benchmark (GASP: +29.0 object counting)."""
LABEL = "VSI-Bench"
DEFAULT_NUM_FRAMES = 32
"""Frames per video: lmms-eval's default video budget (`max_num_frames` / `max_frames_num` 32)."""
HF_URL = "https://huggingface.co/datasets/nyu-visionx/VSI-Bench"
REFERENCE = ("EvolvingLMMs-Lab/lmms-eval lmms_eval/tasks/vsibench/utils.py + vsibench.yaml "
             "(= vision-x-nyu/thinking-in-space lmms_eval/tasks/vsibench/utils.py)")
DATASETS = ("arkitscenes", "scannet", "scannetpp")
FIELDS = ("id", "dataset", "scene_name", "question_type", "question", "options", "ground_truth")
ANNOTATION_NAMES = ("test-00000-of-00001.parquet", "test.parquet", "test.jsonl", "test.json",
                    os.path.join("data", "test-00000-of-00001.parquet"))
PRE_PROMPT = "These are frames of a video."
NA_POST_PROMPT = "Please answer the question using a single word or phrase."
MCA_POST_PROMPT = "Answer with the option's letter from the given choices directly."
WHERE = (f"{HF_URL} (test-00000-of-00001.parquet, and arkitscenes.zip, scannet.zip, scannetpp.zip unzipped "
         "so that each video is ROOT/<dataset>/<scene_name>.mp4)")
EXPECTED = ("parquet, JSON or JSONL records with " + ", ".join(FIELDS) + f" (the test split of {HF_URL})")


def build_prompt(question_type: str, question: str, options: list[str] | None) -> str:
    """The text of lmms-eval's `vsibench_doc_to_text` (default kwargs)."""
    if question_type in scoring.NA_QUESTION_TYPES:
        return PRE_PROMPT + "\n" + question + "\n" + NA_POST_PROMPT
    if question_type in scoring.MCA_QUESTION_TYPES:
        opts = "Options:\n" + "\n".join(options or [])
        return "\n".join([PRE_PROMPT, question, opts, MCA_POST_PROMPT])
    raise ValueError(f"unknown question type {question_type!r}")


def find_annotations(data: str, annotations: str) -> tuple[str, str]:
    """(video root, annotation file) for `--data` (a folder, or the annotation file itself)."""
    root, path = given_annotations(NAME, data, annotations, EXPECTED, WHERE)
    if path is not None:
        return root, path
    for name in ANNOTATION_NAMES:
        if os.path.isfile(os.path.join(data, name)):
            return data, os.path.join(data, name)
    shards = sorted(glob.glob(os.path.join(data, "test-*.parquet"))) or sorted(
        glob.glob(os.path.join(data, "data", "test-*.parquet")))
    if shards:
        return data, shards[0]
    raise BenchmarkError(f"{NAME}: no annotation file in {data} (looked for {', '.join(ANNOTATION_NAMES[:4])}); "
                         f"get test-00000-of-00001.parquet from {HF_URL} or pass --annotations FILE "
                         f"({EXPECTED})")


def _options(value: Any, qtype: str, rec_id: Any, path: str) -> list[str] | None:
    if qtype in scoring.NA_QUESTION_TYPES:
        return None if value is None else [str(o) for o in value] if isinstance(value, list) else None
    if not isinstance(value, list) or not value:
        raise BenchmarkError(f"{NAME}: {path}: question id {rec_id} ({qtype}) needs a non-empty options list "
                             f"(e.g. [\"A. chair\", \"B. table\"]), got {value!r}")
    return [str(o) for o in value]


def load(data: str, annotations: str = "", family: str | None = None) -> tuple[str, str, list[Question]]:
    """(video root, annotation file, questions in file order) for `--data` / `--annotations`."""
    root, path = find_annotations(data, annotations)
    records = read_records(path, NAME)
    require_fields(records, FIELDS, path, NAME, EXPECTED)
    known = set(scoring.MCA_QUESTION_TYPES) | set(scoring.NA_QUESTION_TYPES)
    questions: list[Question] = []
    seen: set[str] = set()
    for r in records:
        rec_id, qtype = r["id"], r["question_type"]
        if qtype not in known:
            raise BenchmarkError(f"{NAME}: {path}: question id {rec_id} has unknown question_type {qtype!r}; "
                                 f"expected one of {', '.join(sorted(known))}")
        for k in ("dataset", "scene_name", "question", "ground_truth"):
            if not isinstance(r[k], (str, int, float)) or str(r[k]).strip() == "":
                raise BenchmarkError(f"{NAME}: {path}: question id {rec_id} has an empty or invalid {k}: {r[k]!r}")
        gt = str(r["ground_truth"])
        if qtype in scoring.NA_QUESTION_TYPES:
            value = scoring.to_float(gt)
            if value is None or value == 0 or not math.isfinite(value):
                raise BenchmarkError(f"{NAME}: {path}: question id {rec_id} ({qtype}) needs a non-zero numerical "
                                     f"ground_truth, got {gt!r} (MRA divides by it)")
        options = _options(r["options"], qtype, rec_id, path)
        key = str(rec_id)
        if key in seen:
            raise BenchmarkError(f"{NAME}: {path}: question id {rec_id} occurs twice; ids must be unique")
        seen.add(key)
        video = os.path.join(root, str(r["dataset"]), f"{r['scene_name']}.mp4")
        record = {"id": rec_id, "dataset": str(r["dataset"]), "scene_name": str(r["scene_name"]),
                  "question_type": qtype, "question": str(r["question"]), "options": options,
                  "ground_truth": gt}
        questions.append(Question(key=key, prompt=build_prompt(qtype, str(r["question"]), options), media=[video],
                                  record=record, group=video))
    return root, path, questions


def missing_media(questions: list[Question]) -> list[str]:
    """Scene videos the questions need that are not files."""
    videos = sorted({q.media[0] for q in questions})
    return [v for v in videos if not os.path.isfile(v)]


def missing_message(root: str, missing: list[str], total: int) -> str:
    return (f"{NAME}: {len(missing)} of {total} scene videos are missing under {root} (first: {missing[0]}); "
            f"get them from {WHERE}, or pass --skip-missing to score only the questions whose video is there")


def media_count(questions: list[Question]) -> int:
    return len({q.media[0] for q in questions})


def visuals(question: Question, loader) -> list:
    """The sampled frames of the question's video (`loader.frames(path) -> list[PIL.Image]`)."""
    return loader.frames(question.media[0])


def scenes(questions: list[Question]) -> set[tuple[str, str]]:
    """(dataset, scene_name) of every question: the ScanNet, ScanNet++ and ARKitScenes scenes it is built on."""
    return {(q.record["dataset"], q.record["scene_name"]) for q in questions}


def score(record: dict[str, Any], prediction: str, reference: Reference | None = None,
          family: str | None = None) -> dict[str, Any]:
    """Per-question fields saved beside the prediction: the extracted answer and its score."""
    ref = reference or references.resolve(NAME)
    answer = ref.postprocess(prediction, family)
    qtype = record["question_type"]
    if qtype in scoring.NA_QUESTION_TYPES and ref.vsi_numeric == "extract_number":
        extracted = scoring.extract_number(answer)
    else:
        extracted = scoring.fuzzy_matching(answer)
    return {"extracted": extracted,
            "score": scoring.score_vsi(qtype, answer, record["ground_truth"], numeric=ref.vsi_numeric)}


def aggregate(rows: list[dict[str, Any]], reference: Reference | None = None,
              family: str | None = None) -> dict[str, Any]:
    """Reference scores from saved rows (re-scored from their `prediction`)."""
    ref = reference or references.resolve(NAME)
    scored = [{"question_type": r["question_type"], "score": score(r, r["prediction"], ref, family)["score"]}
              for r in rows]
    agg = scoring.aggregate_vsi(scored, round_digits=ref.vsi_round)
    agg["metric"] = {qt: (scoring.MCA_METRIC if qt in scoring.MCA_QUESTION_TYPES else scoring.NA_METRIC)
                     for qt in agg["counts"]}
    return agg


def metrics(agg: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics: the reference keys (`<type>_accuracy`, `<type>_MRA:.5:.95:.05`, `overall`)."""
    return {k: float(v) for k, v in agg["scores"].items()}
