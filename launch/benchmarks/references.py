"""Named versions of the reference evaluation code (`--reference`), so a score can be
reproduced under the version a paper used.

Every version is a pipeline from a saved raw answer to the reported numbers:

1. the model wrapper's post-processing (lmms-eval v0.5 / v0.6: the Qwen2.5-VL wrappers
   apply `parse_reasoning_model_answer` to every answer; the Qwen2-VL and LLaVA-OneVision
   wrappers do not; v0.7 removed it from the wrappers);
2. the evaluator's post-processing (lmms-eval v0.7+: `strip_reasoning_tags` with the default
   `--reasoning_tags` <think> / <analysis>, then `.strip()`, for every task);
3. the task's scoring (VSI-Bench: `float()` of the first space-separated word up to v0.7.2,
   `extract_number` on main; All-Angles: VLMEvalKit `can_infer` of commit 18fc37a or main);
4. the task's aggregation (lmms-eval v0.7.2+ rounds every VSI-Bench value to 6 decimals).

What each version holds was read in the tagged sources (EvolvingLMMs-Lab/lmms-eval tags
v0.5, v0.6, v0.7, v0.7.2 and main at 75571cfe; open-compass/VLMEvalKit 18fc37a and main at
e8e78f05); docs/evaluate.md has the table. Predictions are saved raw, so rescoring the same
predictions under another version needs no model (`--reference NAME` on a finished run).
"""
from __future__ import annotations

from dataclasses import dataclass

from launch.benchmarks import scoring


@dataclass(frozen=True)
class Reference:
    """One named version of a reference evaluation."""

    name: str
    code: str
    """The code it stands for (repository, tag or commit, files)."""
    benchmarks: tuple[str, ...]
    """The `--benchmark` names this version scores."""
    wrapper_parse_families: tuple[str, ...] = ()
    """Model families whose lmms-eval wrapper applies `parse_reasoning_model_answer` (v0.5, v0.6)."""
    strip_tags: tuple[tuple[str, str], ...] | None = None
    """The evaluator's reasoning-tag stripping (lmms-eval v0.7+), None when it has none."""
    vsi_numeric: str = "float"
    """How a VSI-Bench numerical answer is read: "float" or "extract_number"."""
    vsi_round: int | None = None
    """Decimals of every reported VSI-Bench value (None: unrounded)."""
    can_infer: str = "18fc37a"
    """VLMEvalKit `can_infer` rules for All-Angles: "18fc37a" or "main"."""

    def postprocess(self, answer: str, family: str | None) -> str:
        """The answer the task's scoring sees (steps 1 and 2 of the module docstring)."""
        if family in self.wrapper_parse_families:
            answer = scoring.parse_reasoning_model_answer(answer)
        if self.strip_tags is not None:
            answer = scoring.strip_reasoning_tags(answer, self.strip_tags)
        return answer


_LMMS = "EvolvingLMMs-Lab/lmms-eval"
_TASKS = "lmms_eval/tasks/vsibench/utils.py, lmms_eval/tasks/blink/utils.py"
REFERENCES: dict[str, Reference] = {r.name: r for r in (
    Reference("lmms-eval-v0.5", f"{_LMMS} v0.5 (lmms_eval/tasks/vsibench/utils.py; = vision-x-nyu/thinking-in-space "
                                "for full runs)", ("vsi-bench",), wrapper_parse_families=("qwen2_5_vl",)),
    Reference("lmms-eval-v0.6", f"{_LMMS} v0.6, v0.6.1 ({_TASKS}; BLINK's first version)",
              ("vsi-bench", "blink-multiview"), wrapper_parse_families=("qwen2_5_vl",)),
    Reference("lmms-eval-v0.7", f"{_LMMS} v0.7, v0.7.1 ({_TASKS}; lmms_eval/api/reasoning.py)",
              ("vsi-bench", "blink-multiview"), strip_tags=scoring.LMMS_EVAL_REASONING_TAGS),
    Reference("lmms-eval-v0.7.2", f"{_LMMS} v0.7.2 ({_TASKS}; lmms_eval/api/reasoning.py)",
              ("vsi-bench", "blink-multiview"), strip_tags=scoring.LMMS_EVAL_REASONING_TAGS, vsi_round=6),
    Reference("lmms-eval-main", f"{_LMMS} main at 75571cfe ({_TASKS}; lmms_eval/api/reasoning.py)",
              ("vsi-bench", "blink-multiview"), strip_tags=scoring.LMMS_EVAL_REASONING_TAGS, vsi_round=6,
              vsi_numeric="extract_number"),
    Reference("vlmevalkit-18fc37a", "open-compass/VLMEvalKit 18fc37a5337e31eec9c104887728ad14e82a6a85 "
                                    "(vlmeval/utils/matching_util.py; the All-Angles authors' fork)", ("all-angles",)),
    Reference("vlmevalkit-main", "open-compass/VLMEvalKit main at e8e78f05 (vlmeval/utils/matching_util.py)",
              ("all-angles",), can_infer="main"),
)}
"""`--reference` names, oldest first per code base."""

DEFAULTS = {"vsi-bench": "lmms-eval-v0.5", "blink-multiview": "lmms-eval-v0.6", "all-angles": "vlmevalkit-18fc37a"}
"""The version each benchmark is scored under when `--reference` is not given (this tool's behaviour before
versions were named; BLINK's is lmms-eval's first BLINK task)."""


LMMS_EVAL_QWEN3_SYSTEM = "You are a helpful assistant."
"""The system turn lmms-eval's Qwen3-VL wrapper sends (lmms_eval/models/simple/qwen3_vl.py, `system_prompt`):
Qwen3-VL's template has no default one, Qwen2-VL's and Qwen2.5-VL's write this same turn themselves."""


def lmms_eval_system(family: str | None) -> str | None:
    """The system turn of an lmms-eval benchmark's request for `family` (None: the template's own, if any)."""
    return LMMS_EVAL_QWEN3_SYSTEM if family in ("qwen3_vl", "qwen3_vl_moe") else None


def resolve(benchmark: str, name: str = "default") -> Reference:
    """The Reference named `name` for `benchmark` ("default": DEFAULTS); ValueError (one line) when it does
    not score that benchmark."""
    if name in ("", "default"):
        name = DEFAULTS[benchmark]
    if name not in REFERENCES:
        raise ValueError(f"--reference {name!r} is not one of {', '.join(REFERENCES)}")
    ref = REFERENCES[name]
    if benchmark not in ref.benchmarks:
        ok = [n for n, r in REFERENCES.items() if benchmark in r.benchmarks]
        why = " (lmms-eval's BLINK task starts at v0.6)" if benchmark == "blink-multiview" and name.startswith(
            "lmms-eval") else ""
        raise ValueError(f"--reference {name} does not score {benchmark}{why}; use one of {', '.join(ok)}")
    return ref
