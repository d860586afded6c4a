"""All-Angles Bench (Yeh et al. 2025, "Seeing from Another Perspective"): layout, prompt, scoring hooks.

Data (the user's; nothing is downloaded): the Hugging Face dataset
`ch-chenyu/All-Angles-Bench` holds `data.json` (2132 questions: `index`, `folder`,
`category`, `pair_idx`, `sourced_dataset`, `image_path` (the ordered list of view
images, paths relative to the dataset root), `question`, `A`, `B`, `C`, `answer`) and
the EgoHumans views (`egohumans_scenes/`). The Ego-Exo4D views (most questions) are
not redistributed: with an Ego-Exo4D licence, download the takes and run
`data/process_egoexo4d.py` of github.com/Chenyu-Wang567/All-Angles-Bench (it reads
`data/folder_list.txt`) to write `ego_exo4d_scenes/`. `--data ROOT` is the folder:

    ROOT/data.json                 (or --annotations FILE)
    ROOT/egohumans_scenes/...      (every path of image_path, relative to ROOT)
    ROOT/ego_exo4d_scenes/...

Prompt: the authors evaluate with their VLMEvalKit fork (Chenyu-Wang567/All-Angles-Bench
VLMEvalkit/), which gives each family the prompt its VLMEvalKit model class asks for:

- Qwen2-VL (`use_custom_prompt` left on): `Qwen2VLPromptMixin._build_mcq_prompt`
  (vlmeval/vlm/qwen2_vl/prompt.py): the view images, then
  "Question: {question}\\nOptions:\\nA. {A}\\nB. {B}\\nC. {C}\\n"
  "Please select the correct answer from the options above." (the Chinese instruction when
  the text holds CJK characters; trailing whitespace stripped);
- Qwen2.5-VL (its config entries set `use_custom_prompt=False`) and LLaVA-OneVision
  (`LLaVA_OneVision_HF` has no custom prompt): the dataset's own
  `ImageMCQDataset.build_prompt` (vlmeval/dataset/image_mcq.py, hint lines commented out
  in the fork): the same text ending "...options above. \\n", NOT stripped.
- Qwen3-VL (the fork predates it): VLMEvalKit's own Qwen3-VL class, `Qwen3VLPromptMixin._build_mcq_prompt`
  (open-compass/VLMEvalKit vlmeval/vlm/qwen3_vl/prompt.py; `use_custom_prompt` is on by default): the
  Qwen2-VL text with "Answer with the option letter only." as its last line, stripped.

Scoring: `scoring.score_allangles` (VLMEvalKit `can_infer`, exact matching).
"""
from __future__ import annotations

import os
import re
from typing import Any

from launch.benchmarks import BenchmarkError, Question, given_annotations
from launch.benchmarks import references, scoring
from launch.benchmarks.references import Reference
from launch.benchmarks.tables import read_records, require_fields

NAME = "all-angles"
DEFAULT_MAX_NEW_TOKENS = 32
PROMPT_VERSION = 2
"""2: Qwen2.5-VL and LLaVA-OneVision get the dataset's own (unstripped) prompt, as the authors' fork."""
HEADLINE = "camera_pose_estimation"
"""The paper's headline sub-score of this benchmark (GASP: +18.2 camera pose)."""
LABEL = "All-Angles"
HF_URL = "https://huggingface.co/datasets/ch-chenyu/All-Angles-Bench"
REPO_URL = "https://github.com/Chenyu-Wang567/All-Angles-Bench"
REFERENCE = ("open-compass/VLMEvalKit vlmeval/vlm/qwen2_vl/prompt.py (MCQ prompt) + vlmeval/utils/matching_util.py "
             "(can_infer, exact matching); pair consistency: this project (CC/WW/IC of the All-Angles paper)")
FIELDS = ("index", "category", "image_path", "question", "A", "B", "C", "answer")
ALL_FIELDS = ("index", "folder", "category", "pair_idx", "sourced_dataset", "image_path", "question", "A", "B",
              "C", "answer")
MCQ_EN_PROMPT = "Please select the correct answer from the options above."
MCQ_CN_PROMPT = "请直接回答选项字母。"
WHERE = (f"{HF_URL} (data.json and egohumans_scenes/; the Ego-Exo4D views need the Ego-Exo4D licence and "
         f"data/process_egoexo4d.py of {REPO_URL} to write ego_exo4d_scenes/)")
EXPECTED = ("a JSON list of questions with " + ", ".join(ALL_FIELDS) + f" (data.json of {HF_URL}), "
            "image_path being the view images relative to the data folder")


DATASET_PROMPT_FAMILIES = ("qwen2_5_vl", "llava_onevision")
"""Families the fork prompts with the dataset's own `build_prompt` (no model-specific prompt)."""
QWEN3_PROMPT_FAMILIES = ("qwen3_vl", "qwen3_vl_moe")
"""Families VLMEvalKit prompts with its Qwen3-VL MCQ prompt (`QWEN3_MCQ_PROMPT` as the last line)."""
QWEN3_MCQ_PROMPT = "Answer with the option letter only."


def build_prompt(question: str, options: dict[str, str], hint: str | None = None, qwen3: bool = False) -> str:
    """The text of VLMEvalKit's Qwen2-VL multiple-choice prompt (`_build_mcq_prompt`); `qwen3`: its Qwen3-VL one
    (the same but for the last line, and no Chinese variant)."""
    prompt = ""
    if hint is not None:
        prompt += f"Hint: {hint}\n"
    prompt += f"Question: {question}\n"
    if options:
        prompt += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items())
        prompt += QWEN3_MCQ_PROMPT if qwen3 else MCQ_CN_PROMPT if re.search("[\u4e00-\u9fff]", prompt) else \
            MCQ_EN_PROMPT
    return prompt.rstrip()


def build_dataset_prompt(question: str, options: dict[str, str]) -> str:
    """The text of the fork's `ImageMCQDataset.build_prompt` (no hint, not stripped)."""
    prompt = f"Question: {question}\n"
    if options:
        prompt += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items())
        prompt += MCQ_EN_PROMPT + " \n"
    return prompt


def prompt_for(family: str | None, question: str, options: dict[str, str]) -> str:
    """The prompt the authors' fork gives `family`."""
    if family in DATASET_PROMPT_FAMILIES:
        return build_dataset_prompt(question, options)
    return build_prompt(question, options, qwen3=family in QWEN3_PROMPT_FAMILIES)


def find_annotations(data: str, annotations: str) -> tuple[str, str]:
    """(image root, data.json) for `--data` (a folder, or data.json itself)."""
    root, path = given_annotations(NAME, data, annotations, EXPECTED, WHERE)
    if path is not None:
        return root, path
    path = os.path.join(data, "data.json")
    if not os.path.isfile(path):
        raise BenchmarkError(f"{NAME}: no data.json in {data}; get it from {HF_URL} or pass --annotations FILE "
                             f"({EXPECTED})")
    return data, path


def _pair(value: Any) -> str | None:
    """pair_idx as a string key; None when the question has no twin."""
    if value is None or (isinstance(value, float) and value != value) or str(value).strip() in ("", "-1", "None"):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def load(data: str, annotations: str = "", family: str | None = None) -> tuple[str, str, list[Question]]:
    """(image root, annotation file, questions in file order) for `--data` / `--annotations`; the
    prompts are the ones the authors' fork gives `family` (`prompt_for`)."""
    root, path = find_annotations(data, annotations)
    records = read_records(path, NAME)
    require_fields(records, FIELDS, path, NAME, EXPECTED)
    questions: list[Question] = []
    seen: set[str] = set()
    for r in records:
        idx = r["index"]
        key = str(int(idx)) if isinstance(idx, float) and idx.is_integer() else str(idx)
        if key in seen:
            raise BenchmarkError(f"{NAME}: {path}: index {idx} occurs twice; indices must be unique")
        seen.add(key)
        images = r["image_path"]
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list) or not images or not all(isinstance(p, str) and p for p in images):
            raise BenchmarkError(f"{NAME}: {path}: index {idx} needs image_path as a non-empty list of paths "
                                 f"relative to the data folder, got {r['image_path']!r}")
        options = scoring.options_of(r)
        answer = str(r["answer"]).strip()
        if answer not in options:
            raise BenchmarkError(f"{NAME}: {path}: index {idx} has answer {r['answer']!r}, not one of its "
                                 f"options {', '.join(options) or '(none)'}")
        if not isinstance(r["question"], str) or not r["question"].strip():
            raise BenchmarkError(f"{NAME}: {path}: index {idx} has an empty question")
        media = [p if os.path.isabs(p) else os.path.join(root, p) for p in images]
        record = {"index": idx, "folder": r.get("folder"), "category": str(r["category"]),
                  "sourced_dataset": r.get("sourced_dataset"), "pair_idx": _pair(r.get("pair_idx")),
                  "image_path": images, "question": r["question"], "options": dict(options), "answer": answer}
        questions.append(Question(key=key, prompt=prompt_for(family, r["question"], options), media=media,
                                  record=record, group=str(r.get("folder") or os.path.dirname(images[0]))))
    return root, path, questions


def missing_media(questions: list[Question]) -> list[str]:
    """View images the questions need that are not files."""
    images = sorted({p for q in questions for p in q.media})
    return [p for p in images if not os.path.isfile(p)]


def missing_message(root: str, missing: list[str], total: int) -> str:
    return (f"{NAME}: {len(missing)} of {total} view images are missing under {root} (first: {missing[0]}); "
            f"get them from {WHERE}, or pass --skip-missing to score only the questions whose views are there")


def media_count(questions: list[Question]) -> int:
    return len({p for q in questions for p in q.media})


def visuals(question: Question, loader) -> list:
    """The question's view images in `image_path` order (`loader.image(path) -> PIL.Image`)."""
    return [loader.image(p) for p in question.media]


def scenes(questions: list[Question]) -> None:
    """All-Angles views come from EgoHumans and Ego-Exo4D, corpora this pipeline does not read: no scene
    of a training manifest can be one of them (the leakage check does not apply)."""
    return None


def score(record: dict[str, Any], prediction: str, reference: Reference | None = None,
          family: str | None = None) -> dict[str, Any]:
    """Per-question fields saved beside the prediction: the option VLMEvalKit infers and the hit."""
    ref = reference or references.resolve(NAME)
    extracted, hit = scoring.score_allangles(ref.postprocess(prediction, family), record["options"],
                                             record["answer"], ref.can_infer)
    return {"extracted": extracted, "hit": hit}


def aggregate(rows: list[dict[str, Any]], reference: Reference | None = None,
              family: str | None = None) -> dict[str, Any]:
    """Accuracy overall / per category and pair consistency, re-scored from each row's `prediction`."""
    scored = []
    for r in rows:
        hit = score(r, r["prediction"], reference, family)["hit"]
        scored.append({"index": r["key"], "category": r["category"], "pair_idx": r.get("pair_idx"), "hit": hit})
    return scoring.aggregate_allangles(scored)


def metrics(agg: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics: `overall`, `<category>`, `macro_category_mean`, `pair_consistency`, `pair_<CC|WW|IC>_rate`."""
    out = {k: float(v) for k, v in agg["scores"].items()}
    if agg.get("macro_category_mean") is not None:
        out["macro_category_mean"] = float(agg["macro_category_mean"])
    pairs = agg["pairs"]
    if pairs["n_pairs"]:
        out["pair_consistency"] = float(pairs["pair_consistency"])
        for k in ("CC", "WW", "IC"):
            out[f"pair_{k}_rate"] = float(pairs[f"{k}_rate"])
        for cat, p in pairs["per_category"].items():
            out[f"pair_consistency/{cat}"] = float(p["pair_consistency"])
    return out
