"""Instruction data through the Ray job (issue 17): LLaVA records with images and videos -> shards.

One in-process reference run (conftest `ray_local`) on the synthetic instruction set plus
hand-made cases (a counter video whose frame i has grey level 6 i, a broken video, a missing
image, a PNG image, malformed records); the kill test runs the job as a subprocess in its own
session and kills exactly that session; the S3 test reads and writes through moto_server.
"""
from __future__ import annotations

import glob
import json
import os
import signal

import numpy as np
import pytest
from PIL import Image

from test_shard_job import kill_session, run_main, session_procs, sha256, shard_hashes, start_job, wait_for

JOB = ["--format", "llava-json", "--frames", "8", "--samples-per-shard", "3", "--val-fraction", "0.3"]
COUNTER_FPS, COUNTER_FRAMES = 10, 40
EXTRA = [  # the hand-made records (extra.json, a JSON list; the synthetic set is annotations.jsonl)
    {"id": "counter_a", "video": "media/counter.mp4",
     "conversations": [{"from": "human", "value": "<video>\nIs it getting brighter?"}, {"from": "gpt", "value": "Yes."}]},
    {"id": "counter_b", "video": "./media//counter.mp4", "extra_field": 1,  # the same video, spelt differently
     "conversations": [{"from": "system", "value": "Be brief."},
                       {"from": "human", "value": "<image>\nHow many frames?"}, {"from": "gpt", "value": "Forty."},
                       {"from": "human", "value": "And the last one?"}, {"from": "gpt", "value": "Bright ✓."}]},
    {"id": "broken_video", "video": "media/broken.mp4",
     "conversations": [{"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "Nothing."}]},
    {"id": "missing_image", "image": "media/nope.jpg",
     "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A ghost."}]},
    {"id": "png_image", "image": "media/grid.png",
     "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A grid."}]},
    {"id": "no_conv", "image": "media/grid.png", "conversations": []},
    {"id": "no_gpt", "conversations": [{"from": "human", "value": "Hello?"}]},
    {"id": "bad_placeholder", "image": "media/grid.png",
     "conversations": [{"from": "human", "value": "<image><image>\nTwo?"}, {"from": "gpt", "value": "One."}]},
]
MALFORMED = {"no_conv": "no conversations", "no_gpt": "no assistant turn",
             "bad_placeholder": "placeholder count does not match media"}


def counter_frame(i: int) -> np.ndarray:
    return np.full((48, 64, 3), 6 * i, np.uint8)


@pytest.fixture(scope="module")
def instruct_set(tmp_path_factory) -> dict:
    """The synthetic set (2 rooms) plus EXTRA: {"root", "input" (the folder of both annotation files), "records"}."""
    from data import synthetic_instruct
    from data.video import write_video

    root = str(tmp_path_factory.mktemp("instruct"))
    info = synthetic_instruct.write_dataset(os.path.join(root, "data"), rooms=2, video_frames=16)
    media = os.path.join(root, "data", "media")
    write_video(os.path.join(media, "counter.mp4"), [counter_frame(i) for i in range(COUNTER_FRAMES)],
                fps=COUNTER_FPS, codec="libx264", qp=0)  # lossless: grey 6 i decodes to 6 i +- 1
    with open(os.path.join(media, "counter.mp4"), "rb") as f:
        data = f.read()
    with open(os.path.join(media, "broken.mp4"), "wb") as f:
        f.write(data[: len(data) // 3])  # a truncated upload: the index at the end is gone
    grid = np.zeros((40, 60, 3), np.uint8)
    grid[::4] = 255
    Image.fromarray(grid).save(os.path.join(media, "grid.png"))
    with open(os.path.join(root, "data", "extra.json"), "w") as f:
        json.dump(EXTRA, f, ensure_ascii=False)
    with open(info["annotations"]) as f:
        records = [json.loads(line) for line in f] + EXTRA
    return {"root": os.path.join(root, "data"), "input": os.path.join(root, "data"), "records": records,
            "videos": info["videos"]}


def job_args(s: dict, out: str, *extra: str) -> list[str]:
    return ["--input", s["input"], "--media-root", s["root"], "--output", out, *JOB, *extra]


def read_all(out: str) -> list[dict]:
    import webdataset as wds

    tars = sorted(glob.glob(os.path.join(out, "*.tar")))
    return list(wds.WebDataset(tars, shardshuffle=False, empty_check=False))


@pytest.fixture(scope="module")
def reference(ray_local, instruct_set, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("instruct_out"))
    rc, _, _ = run_main(job_args(instruct_set, out, "--quiet"))
    assert rc == 0
    return out, shard_hashes(out)


# ----------------------------------------------------------------------- the job

def test_instruction_shards_end_to_end(reference, instruct_set, capsys, shard_checks):
    from data.instruct import decode_instruction

    out, hashes = reference
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    c = m["counts"]
    assert m["kind"] == "instruction" and m["complete"] and c["shards"] == len(hashes) == c["shards_planned"]
    # broken and missing media: skipped, counted by reason, named; malformed records counted with their ids
    assert m["skipped_by_reason"] == {"missing image": 1, "unreadable video": 1}
    assert {it["file"]: it["ids"] for it in m["skipped_media"]} == {"media/nope.jpg": ["missing_image"],
                                                                    "media/broken.mp4": ["broken_video"]}
    assert m["malformed_by_reason"] == {r: 1 for r in MALFORMED.values()}
    assert {r["id"]: r["reason"] for r in m["malformed_records"]} == MALFORMED
    for t in hashes:
        with open(os.path.join(out, t), "rb") as f:
            shard_checks.tar(f)
        assert sha256(os.path.join(out, t)) == {s["name"]: s["sha256"] for s in m["shards"]}[t]

    inputs = {r["id"]: r for r in instruct_set["records"]}
    samples = [decode_instruction(raw) for raw in read_all(out)]
    split_of = {s["name"]: s["split"] for s in m["shards"]}
    splits_by_file: dict[str, set] = {}
    written = set()
    for raw, s in zip(read_all(out), samples):
        for f in s.meta["files"]:
            splits_by_file.setdefault(f, set()).add(split_of[os.path.basename(raw["__url__"])])
        for rid, conv in zip(s.ids, s.conversations):
            assert conv == inputs[rid]["conversations"], rid  # conversations unchanged, turn for turn
            written.add(rid)
        assert s.media in ("image", "video", "none") and len(s.frames) == s.meta["n_frames"]
    assert written == set(inputs) - set(MALFORMED) - {"broken_video", "missing_image"}  # nothing else lost
    assert c["samples"] == len(samples) and c["conversations"] == len(written)
    assert all(len(sp) == 1 for sp in splits_by_file.values()), splits_by_file  # no media in both splits
    assert c["samples_val"] > 0 and c["samples_train"] > 0

    by_file = {tuple(s.meta["files"]): s for s in samples}
    assert sum(1 for s in samples if "media/counter.mp4" in s.meta["files"]) == 1  # a shared video is stored once
    counter = by_file[("media/counter.mp4",)]
    assert counter.ids == ["counter_a", "counter_b"] and counter.media == "video"
    idx = np.linspace(0, COUNTER_FRAMES - 1, 8, dtype=int)
    means = np.array([f.mean() for f in counter.frames])
    assert np.rint(means / 6).astype(int).tolist() == idx.tolist()  # the uniformly sampled frames, in time order
    np.testing.assert_allclose(counter.timestamps, idx / COUNTER_FPS, atol=1e-6)  # 0.0 ... 3.9 s: the whole video
    for path, n in instruct_set["videos"].items():  # walk videos: 16 frames -> 8, increasing times
        s = by_file[(path,)]
        assert len(s.frames) == 8 and np.all(np.diff(s.timestamps) > 0) and len(s.ids) >= 2
    with open(os.path.join(instruct_set["root"], "media/room_0000/view_0.jpg"), "rb") as f:
        jpg = f.read()
    raw = next(r for r in read_all(out) if json.loads(r["json"])["files"] == ["media/room_0000/view_0.jpg"])
    assert raw["f00.jpg"] == jpg  # a JPEG image is stored as given, byte for byte
    png = by_file[("media/grid.png",)].frames[0]
    assert png.shape == (40, 60, 3) and png[::4].min() > 200 and png[1::4].max() < 60  # re-encoded as JPEG
    assert sum(1 for s in samples if s.media == "none") == 2  # text-only records kept

    # the summary names the reasons and the ids
    rc, so, _ = run_main(job_args(instruct_set, out), capsys)
    assert rc == 0 and "writing 0" in so
    for rid, reason in MALFORMED.items():
        assert f"malformed: {reason}" in so and rid in so
    assert "1 (media/nope.jpg)" in so and "skipped: unreadable video" in so and "1 (media/broken.mp4)" in so


def test_rerun_byte_identical_and_stale_plan_refused(reference, instruct_set, tmp_path, capsys):
    out0, hashes = reference
    out = str(tmp_path / "fresh")
    rc, _, _ = run_main(job_args(instruct_set, out, "--quiet"), capsys)
    assert rc == 0 and shard_hashes(out) == hashes  # a second job from scratch: the same bytes

    rc, so, se = run_main(job_args(instruct_set, out, "--frames", "4"), capsys)
    assert rc == 2 and len(se.strip().splitlines()) == 1 and "--overwrite" in se and "[ray]" not in so
    extra = os.path.join(instruct_set["input"], "extra.json")
    with open(extra) as f:
        text = f.read()
    try:  # other annotation content under the same names: refused too
        with open(extra, "w") as f:
            f.write(text.replace("Forty.", "Forty!"))
        rc, _, se = run_main(job_args(instruct_set, out), capsys)
        assert rc == 2 and "plan.json differs" in se
    finally:
        with open(extra, "w") as f:
            f.write(text)
    rc, so, _ = run_main(job_args(instruct_set, out, "--frames", "4", "--overwrite", "--quiet"), capsys)
    assert rc == 0 and "[overwrite]" in so
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f)["config"]["frames"] == 4
    videos = [json.loads(r["json"]) for r in read_all(out) if json.loads(r["json"])["media"] == "video"]
    assert videos and all(v["n_frames"] == 4 for v in videos) and shard_hashes(out) != hashes


@pytest.mark.slow
def test_killed_job_resumed_writes_only_the_missing_shards(reference, instruct_set, tmp_path, capsys):
    _, hashes = reference
    out, log = str(tmp_path / "out"), str(tmp_path / "job.log")
    proc = start_job(job_args(instruct_set, out, "--num-cpus", "2"), {"GASP_TEST_WRITE_DELAY": "0.4"}, log)
    try:
        wait_for(lambda: len(glob.glob(os.path.join(out, "*.stats.json"))) >= 2, 120, "two finished shards", proc, log)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        kill_session(proc.pid)
    proc.wait(10)
    assert not session_procs(proc.pid)
    done = {os.path.basename(p)[: -len(".stats.json")] + ".tar" for p in glob.glob(os.path.join(out, "*.stats.json"))}
    assert 2 <= len(done) < len(hashes) and not os.path.exists(os.path.join(out, "manifest.json"))
    before = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in done}
    rc, so, _ = run_main(job_args(instruct_set, out), capsys)
    assert rc == 0
    assert f"{len(done)} of {len(hashes)} shards already done; writing {len(hashes) - len(done)}" in so
    assert {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in done} == before
    assert shard_hashes(out) == hashes and not glob.glob(os.path.join(out, ".*.part"))


@pytest.mark.slow
def test_s3_annotations_media_and_output(s3_server, reference, instruct_set, tmp_path):
    """Annotations and media on s3://, shards to s3://: the same bytes as the local run, no credential written."""
    import subprocess
    import sys

    from test_shard_job import SHARD

    _, hashes = reference
    fs = s3_server.fs()
    fs.mkdir("instruct-test")
    fs.put(instruct_set["root"].rstrip("/") + "/", "instruct-test/set/", recursive=True)
    env = {**os.environ, **s3_server.env}
    argv = ["--input", "s3://instruct-test/set", "--media-root", "s3://instruct-test/set",
            "--output", "s3://instruct-test/out", *JOB, "--num-cpus", "2", "--quiet"]
    p = subprocess.run([sys.executable, SHARD, *argv], env=env, capture_output=True, text=True, timeout=300,
                       start_new_session=True)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    fs.invalidate_cache()
    import hashlib

    got = {n.rsplit("/", 1)[1]: hashlib.sha256(fs.cat(n)).hexdigest() for n in fs.glob("instruct-test/out/*.tar")}
    assert got == hashes
    manifest = fs.cat("instruct-test/out/manifest.json").decode()
    assert json.loads(manifest)["skipped_by_reason"] == {"missing image": 1, "unreadable video": 1}
    for secret in (s3_server.KEY_ID, s3_server.SECRET):
        assert secret not in manifest + fs.cat("instruct-test/out/plan.json").decode() + p.stdout + p.stderr


# ----------------------------------------------------------------------- arguments and the data/ module

@pytest.mark.parametrize("case", ["no-media-root", "media-root-missing", "media-root-for-scenes", "not-json"])
def test_bad_arguments_fail_in_one_line_before_ray(case, instruct_set, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"id": 1,')
    argv = {"no-media-root": ["--format", "llava-json", "--input", instruct_set["input"]],
            "media-root-missing": ["--format", "llava-json", "--input", instruct_set["input"],
                                   "--media-root", str(tmp_path / "nope")],
            "media-root-for-scenes": ["--format", "synthetic", "--media-root", instruct_set["root"]],
            "not-json": ["--format", "llava-json", "--input", str(bad), "--media-root", instruct_set["root"]]}[case]
    from pipeline import shard

    capsys.readouterr()
    try:
        rc = shard.main(argv + ["--output", str(tmp_path / "o")])
    except SystemExit as e:
        rc = e.code
    so, se = capsys.readouterr()
    lines = se.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("pipeline/shard.py: error: "), se
    assert {"no-media-root": "--media-root is required", "media-root-missing": "no such folder",
            "media-root-for-scenes": "--media-root is only for --format llava-json",
            "not-json": "bad.json: not valid JSON"}[case] in lines[0]
    assert "[ray]" not in so and not (tmp_path / "o" / "plan.json").exists()


def test_records_are_validated_with_reasons_and_ids():
    from data.instruct import RecordError, parse_annotations, parse_record

    turns = [{"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "No."}]
    r = parse_record({"id": "two", "image": ["a/x.jpg", "b//y.jpg"], "conversations": turns})
    assert (r.media, r.files, r.conversations) == ("image", ("a/x.jpg", "b/y.jpg"), turns)
    v = parse_record({"id": 7, "video": "v.mp4", "conversations": [{"from": "human", "value": "<image> what?"},
                                                                    {"from": "gpt", "value": "x"}]})
    assert (v.id, v.media, v.media_key) == ("7", "video", "video:v.mp4")  # LLaVA-Video writes <image> for videos
    cases = {"both image and video": {"image": "a.jpg", "video": "v.mp4", "conversations": turns},
             "bad media path": {"image": ["../x.jpg", "y.jpg"], "conversations": turns},
             "bad turn": {"conversations": [{"from": "user", "value": "hi"}, {"from": "gpt", "value": "x"}]},
             "placeholder count does not match media": {"video": "v.mp4", "conversations": turns}}
    for reason, rec in cases.items():
        with pytest.raises(RecordError) as e:
            parse_record({"id": "r", **rec})
        assert e.value.reason == reason and e.value.record_id == "r"
    records, errors = parse_annotations(b'{"id": "ok", "conversations": [{"from": "gpt", "value": "hi"}]}\n'
                                        b'{not json\n\n[1]\n', "x.jsonl")
    assert [r.id for r in records] == ["ok"] and records[0].media == "none"
    assert [(e.record_id, e.reason) for e in errors] == [("x.jsonl#1", "unparseable JSON line"),
                                                         ("x.jsonl#3", "not a JSON object")]


def test_decode_refuses_unknown_versions_and_draws_conversations_seeded():
    from data.instruct import (FormatError, decode_instruction, draw_conversation, encode_sample,
                               make_meta)
    from data.shardformat import encode_jpeg

    convs = [[{"from": "human", "value": f"<image>\nq{i}"}, {"from": "gpt", "value": f"a{i}"}] for i in range(4)]
    yy, xx = np.mgrid[0:16, 0:24]
    frame = np.stack([xx * 10, yy * 15, 255 - xx * 10], -1).astype(np.uint8)  # smooth: survives JPEG
    meta = make_meta([f"id{i}" for i in range(4)], ["x.json"] * 4, convs, "image", ["f.jpg"], 1)
    raw = encode_sample("000000_00000", meta, [encode_jpeg(frame)])
    s = decode_instruction(raw)
    assert s.conversations == convs and s.frames[0].shape == (16, 24, 3) and s.frames[0].dtype == np.uint8
    assert np.abs(s.frames[0].astype(int) - frame).mean() < 4
    bad = dict(raw, json=raw["json"].replace(b'"version":1', b'"version":2'))
    with pytest.raises(FormatError, match="instruction format version 2 is not supported") as e:
        decode_instruction(bad)
    assert "\n" not in str(e.value) and "000000_00000" in str(e.value)
    with pytest.raises(FormatError, match="frame members"):
        decode_instruction({k: v for k, v in raw.items() if k != "f00.jpg"})
    draws = [draw_conversation(s, np.random.default_rng([5, k]))[1]["value"] for k in range(40)]
    assert draws == [draw_conversation(s, np.random.default_rng([5, k]))[1]["value"] for k in range(40)]
    assert set(draws) == {"a0", "a1", "a2", "a3"}  # every conversation gets drawn
    d = draw_conversation(s, np.random.default_rng(1))
    d[0]["value"] = "edited"
    assert "edited" not in json.dumps(s.conversations)  # a copy
