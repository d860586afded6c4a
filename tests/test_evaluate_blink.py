"""BLINK multi-view through launch/evaluate.py: a tiny BLINK-format file end to end (embedded parquet and
JSON + image files), the prompt and images as lmms-eval's task builds them, and one-line failures (CPU)."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

from launch import evaluate
from launch.benchmarks import generation, scoring

from test_evaluate import read_predictions, read_results, run_main

QUESTION = ("The images are frames from a video. The video is shooting a static scene. The camera is either moving "
            "clockwise (left) or counter-clockwise (right) around the object. The first image is from the beginning "
            "of the video and the second image is from the end. Is the camera moving left or right when shooting the "
            "video? Select from the following options.")
N = 5


def _png(value: int, size=(64, 48)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def blink_records(n: int = N) -> list[dict]:
    """Records of the Hugging Face BLINK Multi-view_Reasoning val split (images embedded as {bytes, path})."""
    recs = []
    for i in range(1, n + 1):
        recs.append({"idx": f"val_Multi-view_Reasoning_{i}", "question": QUESTION, "sub_task": "Multi-view Reasoning",
                     "image_1": {"bytes": _png(10 * i), "path": f"{i}_1.png"},
                     "image_2": {"bytes": _png(250 - 10 * i), "path": f"{i}_2.png"},
                     "image_3": None, "image_4": None, "choices": ["left", "right"],
                     "answer": "(A)" if i % 2 else "(B)",
                     "prompt": QUESTION + "\n(A) left\n(B) right", "explanation": ""})
    return recs


def write_parquet(root: str, recs: list[dict], split: str = "val") -> str:
    import pandas as pd

    sub = os.path.join(root, "Multi-view_Reasoning")
    os.makedirs(sub, exist_ok=True)
    path = os.path.join(sub, f"{split}-00000-of-00001.parquet")
    pd.DataFrame(recs).to_parquet(path)
    return path


def write_json(root: str, recs: list[dict]) -> str:
    """The same records as JSON, each image a file next to it (as the BLINK authors' test_benchmark.py saves them)."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    out = []
    for r in recs:
        r = dict(r)
        for k in ("image_1", "image_2", "image_3", "image_4"):
            if r[k] is not None:
                rel = f"images/{r['idx']}_{k[-1]}.png"
                with open(os.path.join(root, rel), "wb") as f:
                    f.write(r[k]["bytes"])
                r[k] = rel
        out.append(r)
    path = os.path.join(root, "val.json")
    with open(path, "w") as f:
        json.dump(out, f)
    return path


@pytest.fixture()
def seen_images(monkeypatch):
    """Wrap generate_batch: record the mean grey value of every image of every request, in order."""
    real = generation.generate_batch
    seen: list[list[float]] = []

    def wrapped(model, processor, requests, **kw):
        seen.extend([float(np.asarray(im).mean()) for im in r.images] for r in requests)
        return real(model, processor, requests, **kw)

    monkeypatch.setattr(generation, "generate_batch", wrapped)
    return seen


def test_blink_end_to_end_on_a_tiny_parquet_and_json(tmp_path, seen_images):
    recs = blink_records()
    pq_root, js_root = str(tmp_path / "BLINK"), str(tmp_path / "blink-json")
    write_parquet(pq_root, recs)
    write_json(js_root, recs)
    runs = {}
    for name, data in (("parquet", pq_root), ("json", js_root)):
        out = str(tmp_path / f"out-{name}")
        assert run_main(["--benchmark", "blink-multiview", "--data", data, "--preset", "tiny", "--batch-size", "3",
                         "--max-new-tokens", "5", "--output", out, "--no-mlflow"]) == 0
        runs[name] = (read_predictions(out), read_results(out))
    preds, res = runs["parquet"]
    assert [p["key"] for p in preds] == [r["idx"] for r in recs]
    assert len(seen_images) == 2 * N  # both runs asked every question once, in file order
    for p, r, grey in zip(preds, recs, seen_images):
        # lmms-eval blink_doc_to_text: the pre_prompt with the choice letters, then the dataset's prompt
        assert p["prompt"] == ("Note: You only need to respond with A, B without providing any additional "
                               "information.\n" + r["prompt"])
        assert p["n_images"] == 2 and p["answer"] == r["answer"] and p["images"] == ["embedded:image_1",
                                                                                   "embedded:image_2"]
        assert p["extracted"] == scoring.blink_extract_letter(p["prediction"])
        assert p["hit"] == float(p["extracted"] == r["answer"].strip("()"))
        i = int(r["idx"].rsplit("_", 1)[1])
        assert grey == pytest.approx([10 * i, 250 - 10 * i], abs=1.0)  # image_1 then image_2, RGB
    hits = [p["hit"] for p in preds]
    assert res["scores"] == {"blink_acc": sum(hits) / len(hits)}
    assert res["counts"] == {"Multi-view Reasoning": N} and res["n_questions"] == N and res["complete"]
    assert res["reference_version"] == "lmms-eval-v0.6" and res["headline"] == {"blink_acc": res["scores"]["blink_acc"]}
    assert res["frames_as"] == "clip" and res["family"] == "qwen2_vl"
    assert res["training_leakage"]["checked"] is False
    # the JSON copy with image files is the same benchmark: same prompts, same answers
    jpreds, jres = runs["json"]
    assert [(p["prompt"], p["prediction"]) for p in jpreds] == [(p["prompt"], p["prediction"]) for p in preds]
    assert jres["scores"] == res["scores"]
    assert all(p["images"][0].endswith(f"images/{p['key']}_1.png") for p in jpreds)


def test_blink_file_of_all_subtasks_is_filtered_to_multiview(tmp_path):
    recs = blink_records(3)
    other = dict(recs[0], idx="val_Counting_1", sub_task="Counting", choices=["1", "2", "3", "4"], answer="(C)")
    data = str(tmp_path / "all")
    os.makedirs(data)
    import pandas as pd

    path = os.path.join(data, "blink_val.parquet")
    pd.DataFrame([other] + recs).to_parquet(path)
    out = str(tmp_path / "out")
    assert run_main(["--benchmark", "blink-multiview", "--data", path, "--preset", "tiny", "--max-new-tokens", "2",
                     "--output", out, "--no-mlflow"]) == 0
    assert [p["key"] for p in read_predictions(out)] == [r["idx"] for r in recs]
    assert read_results(out)["n_in_file"] == 3


@pytest.fixture()
def no_model(monkeypatch):
    import model.loading

    def boom(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(model.loading, "build_model_and_processor", boom)


def _break(kind: str, root: str) -> tuple[str, str]:
    recs = blink_records(3)
    if kind == "missing field":
        recs = [{k: v for k, v in r.items() if k != "choices"} for r in recs]
        return write_parquet(root, recs), "lacks choices"
    if kind == "bad answer":
        recs[1]["answer"] = "(C)"
        return write_parquet(root, recs), "answer '(C)'"
    if kind == "hidden answer":
        recs[0]["answer"] = "hidden"
        return write_parquet(root, recs), "test split"
    if kind == "choices not a list":
        recs[2]["choices"] = "left, right"
        return write_json(root, recs), "needs choices as a list"
    if kind == "no image":
        recs[0]["image_1"] = recs[0]["image_2"] = None
        return write_parquet(root, recs), "no image"
    if kind == "bad image":
        path = write_json(root, recs)
        with open(path) as f:
            js = json.load(f)
        js[1]["image_2"] = 7
        with open(path, "w") as f:
            json.dump(js, f)
        return path, "invalid image_2"
    if kind == "duplicate idx":
        recs[2]["idx"] = recs[0]["idx"]
        return write_parquet(root, recs), "occurs twice"
    if kind == "empty prompt":
        recs[0]["prompt"] = ""
        return write_parquet(root, recs), "prompt"
    if kind == "other subtask":
        for r in recs:
            r.update(sub_task="Counting", idx=r["idx"].replace("Multi-view_Reasoning", "Counting"))
        return write_parquet(root, recs), "no Multi-view Reasoning question"
    if kind == "test split only":
        write_parquet(root, recs, split="test")
        return root, "test split"
    if kind == "no file":
        os.makedirs(root, exist_ok=True)
        return root, "Multi-view_Reasoning/val-00000-of-00001.parquet"
    if kind == "missing image file":
        path = write_json(root, recs)
        os.remove(os.path.join(root, "images", f"{recs[1]['idx']}_2.png"))
        return path, "--skip-missing"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing field", "bad answer", "hidden answer", "choices not a list", "no image",
                                  "bad image", "duplicate idx", "empty prompt", "other subtask", "test split only",
                                  "no file", "missing image file"])
def test_malformed_blink_files_fail_in_one_line_naming_the_field(tmp_path, capsys, no_model, kind):
    data, needle = _break(kind, str(tmp_path / "blink"))
    rc = run_main(["--benchmark", "blink-multiview", "--data", data, "--preset", "tiny", "--output",
                   str(tmp_path / "out"), "--no-mlflow"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("launch/evaluate.py: error: blink-multiview") and needle in err, err


def test_blink_frames_as_video_is_refused_and_clip_is_its_protocol(tmp_path, capsys, no_model):
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--benchmark", "blink-multiview", "--data", str(tmp_path), "--preset", "tiny",
                       "--frames-as", "video"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "--frames-as video" in err, err
    args = evaluate.EvalArgs(benchmark="blink-multiview", data="D", preset="tiny")
    assert evaluate.frames_as(args) == "clip"
    for fa in ("clip", "images"):
        assert evaluate.frames_as(evaluate.EvalArgs(benchmark="vsi-bench", data="D", preset="tiny",
                                                    frames_as=fa)) == "clip"
    assert evaluate.frames_as(evaluate.EvalArgs(benchmark="vsi-bench", data="D", preset="tiny")) == "video"
    assert evaluate.frames_as(evaluate.EvalArgs(benchmark="vsi-bench", data="D", preset="tiny-llava-ov")) == "clip"
