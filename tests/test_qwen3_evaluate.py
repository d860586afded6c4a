"""VSI-Bench and All-Angles through Qwen3-VL: its video input with frame times (as lmms-eval's Qwen3-VL wrapper),
its system turn on the lmms-eval benchmarks, VLMEvalKit's Qwen3-VL prompt on All-Angles, and the scores."""
import json
import os

import pytest

from launch import evaluate
from launch.benchmarks import generation, scoring
from test_evaluate import make_allangles, make_vsi, read_predictions, read_results, run_main


def _spy(monkeypatch, name):
    seen = []
    real = getattr(generation, name)
    monkeypatch.setattr(generation, name, lambda *a, **k: seen.append((a, k, real(*a, **k))) or seen[-1][2])
    return seen


def test_vsi_bench_feeds_qwen3_a_video_with_frame_times(tmp_path, monkeypatch):
    """Each question's frames go in as ONE video input: per temporal patch `<t seconds>` and its own vision span,
    t from frame k at k S / n over the video's S seconds; a system turn first (Qwen3-VL's template has none)."""
    data, out = str(tmp_path / "vsi"), str(tmp_path / "out")
    rows = make_vsi(data)  # 8 frames at 4 fps: 2 s per video
    seen = _spy(monkeypatch, "encode_video")
    args = ["--benchmark", "vsi-bench", "--data", data, "--preset", "tiny-qwen3-vl", "--num-frames", "4",
            "--batch-size", "5", "--max-new-tokens", "4", "--no-mlflow", "--output", out]
    assert run_main(args) == 0
    assert len(seen) == 2  # 10 questions in batches of 5
    (processor, requests, *_), _, inputs = seen[0]
    assert all(r.system == "You are a helpful assistant." and r.video_seconds == pytest.approx(2.0) for r in requests)
    assert inputs["video_grid_thw"][:, 0].tolist() == [2] * 5  # 4 frames -> 2 temporal patches
    n = int(inputs["video_grid_thw"][0, 1:].prod()) // 4
    assert ((inputs["mm_token_type_ids"] == 2).sum(1) == 2 * n).all()
    text = processor.tokenizer.decode(inputs["input_ids"][0]).replace("<|endoftext|>", "")  # left padding
    # frames at 0, 0.5, 1.0, 1.5 s -> temporal patches at 0.25 and 1.25 s (printed with one decimal)
    assert text.count("<0.2 seconds><|vision_start|>") == 1 and text.count("<1.2 seconds><|vision_start|>") == 1
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                                   "<|im_start|>user\n<0.2 seconds>")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "pixel_values" not in inputs and "second_per_grid_ts" not in inputs

    preds = read_predictions(out)
    assert sorted(p["key"] for p in preds) == sorted(str(r["id"]) for r in rows)
    for p in preds:
        assert p["n_images"] == 4 and p["score"] == scoring.score_vsi(p["question_type"], p["prediction"],
                                                                     p["ground_truth"])
    res = read_results(out)
    assert res["family"] == "qwen3_vl" and res["frames_as"] == "video" and res["complete"]
    expected = scoring.aggregate_vsi([{"question_type": p["question_type"], "score": p["score"]} for p in preds])
    assert res["scores"] == dict(expected["scores"])
    with open(os.path.join(out, "run.json")) as f:
        assert json.load(f)["signature"]["frames_as"] == "video"


def test_vsi_bench_video_frames_are_capped_at_768_cells_of_32_px(tmp_path, monkeypatch):
    """qwen_vl_utils' per-frame cap of a video input is 768 tokens: 768 x 32 x 32 pixels for Qwen3-VL."""
    from model.loading import make_adapter

    caps = []
    real = make_adapter
    monkeypatch.setattr("model.loading.make_adapter",
                        lambda *a, **k: caps.append(k.get("max_pixels")) or real(*a, **k))
    data = str(tmp_path / "vsi")
    make_vsi(data)
    assert run_main(["--benchmark", "vsi-bench", "--data", data, "--preset", "tiny-qwen3-vl", "--num-frames", "2",
                     "--limit", "1", "--max-new-tokens", "2", "--no-mlflow", "--output", str(tmp_path / "o"),
                     "--max-pixels", str(2000 * 32 * 32)]) == 0
    assert caps[-1] == 768 * 32 * 32 == evaluate.VIDEO_MAX_TOKENS * 32 * 32


def test_all_angles_through_qwen3_with_vlmevalkits_qwen3_prompt(tmp_path, monkeypatch):
    """All-Angles: the views as images of one turn, no system turn (VLMEvalKit's Qwen3-VL class sends none), the
    MCQ prompt of VLMEvalKit's Qwen3VLPromptMixin; scored with can_infer as for every family."""
    data, out = str(tmp_path / "aab"), str(tmp_path / "out")
    recs = make_allangles(data)
    seen = _spy(monkeypatch, "encode")
    assert run_main(["--benchmark", "all-angles", "--data", data, "--preset", "tiny-qwen3-vl", "--batch-size", "3",
                     "--max-new-tokens", "8", "--output", out, "--no-mlflow"]) == 0
    processor = seen[0][0][0]
    preds = {p["key"]: p for p in read_predictions(out)}
    assert sorted(int(k) for k in preds) == [r["index"] for r in recs]
    for r in recs:
        p = preds[str(r["index"])]
        assert p["n_images"] == len(r["image_path"])
        assert p["prompt"] == (f"Question: {r['question']}\nOptions:\nA. left\nB. right\nC. behind\n"
                               "Answer with the option letter only.")
        assert p["extracted"] == scoring.extract_choice(p["prediction"], p["options"])
    requests = [r for (_, reqs, *_), _, _ in seen for r in reqs]
    assert all(r.system is None for r in requests)
    first = processor.tokenizer.decode(seen[0][2]["input_ids"][0]).replace("<|endoftext|>", "")  # left padding
    assert first.startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")
    res = read_results(out)
    assert res["family"] == "qwen3_vl" and res["counts"] == {c: 2 for c in
                                                             ("counting", "attribute_identification",
                                                              "relative_distance", "relative_direction")}
    expected = scoring.aggregate_allangles(
        [{"index": p["key"], "category": p["category"], "pair_idx": p["pair_idx"],
          "hit": scoring.score_allangles(p["prediction"], p["options"], p["answer"])[1]} for p in preds.values()])
    assert res["scores"] == dict(expected["scores"])
