"""What the shard job and the trainer cost at corpus scale, as behaviour: the scan reads an RGB's
header (and checks the file cheaply) instead of decoding and undistorting it; a rerun's write task
opens each scene it touches once (HTTP requests counted on a real moto S3 server); plan.json is
streamed to its file; the driver collects many tasks; validation reads the shard records once.
The figures themselves come from tests/benchmarks/bench_plan.py.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from conftest import S3Server, free_port, write_tiny_corpus

import corpus_writers as cw

LENS = (-0.12, 0.02, 0.0, 0.0, 0.001, -0.0015)  # a DL3DV-like OPENCV lens (k1 k2 k3 k4 p1 p2)


# ------------------------------------------------------------------ S3 with a request log

class CountingS3(S3Server):
    """`moto_server -H 127.0.0.1 -p PORT` whose request log is kept: `requests()` lists every HTTP
    request it served since `mark()` as (method, path with query), whatever process sent it."""

    LINE = re.compile(r'\] "(?:\x1b\[[\d;]*m)*([A-Z]+) (\S+) HTTP')

    def __init__(self, log_path: str):
        super().__init__(free_port())
        exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
        if not os.path.exists(exe):
            pytest.skip("moto_server is not installed (pip install 'moto[server]')")
        self.log_path = log_path
        self._log = open(log_path, "w")
        port = self.url.rsplit(":", 1)[1]
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", port], stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        import urllib.request

        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(self.url + "/", timeout=1).read()
                break
            except Exception:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto_server did not start on {self.url}")
                time.sleep(0.2)
        self._mark = 0

    def _lines(self) -> list[tuple[str, str]]:
        self._log.flush()
        with open(self.log_path, errors="replace") as f:
            return [(m.group(1), m.group(2)) for m in map(self.LINE.search, f) if m]

    def mark(self) -> None:
        self._mark = len(self._lines())

    def requests(self) -> list[tuple[str, str]]:
        return self._lines()[self._mark:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
def counting_s3(tmp_path, monkeypatch):
    server = CountingS3(str(tmp_path / "moto.log"))
    for k, v in server.env.items():
        monkeypatch.setenv(k, v)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield server
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


# ------------------------------------------------------------------------------- scan

@pytest.fixture
def lens_scene(tmp_path):
    cw.write_nerfstudio_scene(tmp_path, "dl3dv_scan", seed=5, n_frames=3, size=(160, 120), dist=LENS)
    return tmp_path / "dl3dv_scan"


def test_nerfstudio_scan_reads_the_rgb_header_not_the_image(lens_scene, monkeypatch):
    """load_depth (what the scan reads) gives load's depth without decoding or undistorting the RGB
    (0.32 s a 960x540 DL3DV frame), and refuses the same broken frames, with the same reasons."""
    from data.scenes import nerfstudio as ns
    from data.scenes.base import FrameError

    scene = ns.NerfstudioScene(str(lens_scene))
    assert all("dist" in f.extra for f in scene.frames)
    full = {f.name: scene.load(f)[1] for f in scene.frames}

    def forbidden(*a, **k):
        raise AssertionError("the scan must not decode or undistort the RGB")

    with monkeypatch.context() as m:
        m.setattr(ns, "decode_rgb", forbidden)
        m.setattr(ns.geometry, "undistort_rgb", forbidden)
        for f in scene.frames:
            np.testing.assert_array_equal(scene.load_depth(f), full[f.name])
    from data.scenes.base import decode_depth, read_bytes

    for f in scene.frames:  # the cached gather is geometry.undistort_depth exactly
        raw = decode_depth(read_bytes(f.extra["depth_url"]), f.extra["depth_url"], scene.depth_scale)
        want = ns.geometry.undistort_depth(raw, *ns.undistortion_map(f.K, f.extra["dist"], f.size))
        assert full[f.name].dtype == want.dtype and np.array_equal(full[f.name], want)

    png = lens_scene / scene.frames[0].extra["rgb"]
    data = png.read_bytes()
    broken = {"cut at 50%": data[: len(data) // 2], "cut at 97%": data[: int(len(data) * 0.97)]}
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # inside the compressed pixels: the chunk's CRC fails
    broken["a byte flipped"] = bytes(flipped)
    for what, bad in broken.items():
        png.write_bytes(bad)
        for read in (scene.load, scene.load_depth):
            with pytest.raises(FrameError, match="unreadable rgb"):
                read(scene.frames[0])
    png.write_bytes(data[:-12])  # cut after the last pixel data: a decode still succeeds, the scan refuses
    scene.load(scene.frames[0])
    with pytest.raises(FrameError, match="unreadable rgb"):
        scene.load_depth(scene.frames[0])
    from PIL import Image

    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(png)  # whole, but not the size the json says
    for read in (scene.load, scene.load_depth):
        with pytest.raises(FrameError, match="rgb is 80x60 but transforms.json says 160x120"):
            read(scene.frames[0])
    png.unlink()
    for read in (scene.load, scene.load_depth):
        with pytest.raises(FrameError, match="missing rgb file"):
            read(scene.frames[0])


def test_checked_image_size_reads_jpeg_and_png_and_refuses_a_cut_file(tmp_path):
    import io

    from PIL import Image

    from data.scenes.base import checked_image_size, decode_rgb

    rgb = (np.random.default_rng(0).random((45, 70, 3)) * 255).astype(np.uint8)
    for fmt in ("PNG", "JPEG", "BMP"):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, fmt)
        data = buf.getvalue()
        assert checked_image_size(data) == (70, 45)
        for cut in (len(data) // 2, int(len(data) * 0.9)):
            with pytest.raises(Exception) as full:
                decode_rgb(data[:cut])
            with pytest.raises(type(full.value)):  # the same kind of failure as a full decode
                checked_image_size(data[:cut])


# ------------------------------------------------------------------ rerun write requests

@pytest.mark.slow
def test_rerun_write_task_opens_each_scene_of_its_shard_once(counting_s3, tmp_path):
    """A rerun (plan.json reused, no scan shells) on s3://: a shard that mixes more scenes than a
    worker's scene cache holds opens each of them exactly once (HTTP requests counted at the server),
    reads each frame it uses once, and writes the same bytes as the first run's write through the
    scan's shells."""
    import s3fs

    from data.pairs import ClipConfig
    from data.scenes import list_scenes, open_scene
    from pipeline import stages

    root = write_tiny_corpus(str(tmp_path / "corpus"), n_scenes=stages.SCENE_CACHE_SIZE + 6, n_frames=6,
                             width=48, height=36)
    fs = counting_s3.fs()
    fs.mkdir("gasp-scale")
    fs.put(root + "/", "gasp-scale/corpus/", recursive=True)
    cfg = stages.JobConfig(input="s3://gasp-scale/corpus", format="synthetic", output="s3://gasp-scale/out",
                           clips=ClipConfig(clip_frames=3, clip_window=4, clips_per_scene=3),
                           samples_per_shard=60, max_side=48, val_fraction=0.0)
    local = dataclasses.replace(cfg, input=root)  # the same scenes and keys, scanned from disk (faster)
    scans = [stages.scan_scene(u, local) for u in list_scenes(root, cfg.format)]
    shells = {s["scene"]: s.pop("shell") for s in scans}
    plan = stages.make_plan(scans, cfg)
    entry = plan["shards"][0]
    scenes = collections.Counter(it["scene"] for it in entry["clips"])
    frames = {(it["scene"], i) for it in entry["clips"] for i in it["indices"]}
    assert len(scenes) > stages.SCENE_CACHE_SIZE and max(scenes.values()) > 1  # the case that reopened
    # frames shared by clips of the shard (each still read once)
    assert sum(len(it["indices"]) for it in entry["clips"]) > len(frames)

    def scene_of(path: str) -> str | None:
        m = re.search(r"corpus/(scene_\d+)(?:[/&]|$)", path.replace("%2F", "/"))
        return m.group(1) if m else None

    counting_s3.mark()  # what opening one scene costs (this reader: listings, cameras.json, a first image)
    assert open_scene(cfg.scene_url("scene_0000"), cfg.format).frames
    per_open = sum(scene_of(p) == "scene_0000" for _, p in counting_s3.requests())
    first = stages.write_shard(entry, cfg, {k: shells[k] for k in scenes})
    assert first["ok"] and first["scenes_opened"] == 0
    stages.clear_scene_cache()  # a fresh worker of the rerun
    s3fs.S3FileSystem.clear_instance_cache()
    counting_s3.mark()
    again = stages.write_shard(entry, cfg, None)
    reqs = counting_s3.requests()
    assert again["ok"] and again["sha256"] == first["sha256"] and again["scenes_opened"] == len(scenes)
    # per scene: one open, then the rgb and depth of each of its frames in the shard, once
    got = collections.Counter(scene_of(p) for _, p in reqs if scene_of(p))
    frames_of = collections.Counter(sc for sc, _ in frames)
    assert got == {sc: per_open + 2 * frames_of[sc] for sc in scenes}, (per_open, got, frames_of)
    puts = [p for m, p in reqs if m == "PUT"]
    assert puts == ["/gasp-scale/out/train-000000.tar", "/gasp-scale/out/train-000000.stats.json"]
    assert len(reqs) == sum(got.values()) + len(puts), collections.Counter(m for m, _ in reqs)


# ------------------------------------------------------------------------------- plan

@pytest.mark.slow
def test_plan_json_is_streamed_whole_or_not_at_all(counting_s3, tmp_path):
    """write_json streams JSON into a part file (a 10,000-scene plan.json no longer sits in memory as
    one string): the bytes of json.dumps(indent=1, sort_keys=True), locally and on s3:// in one PUT;
    an object that cannot be written leaves nothing, not even its part file."""
    import glob

    from pipeline import stages

    obj = {"shards": [{"clips": [{"scene": f"1K/{i:064x}", "indices": [i, i + 3, i + 7],
                                  "overlap": [[1.0, i / 7, 0.5], [0.25, 1.0, i / 9], [0.125, 0.375, 1.0]]}
                                 for i in range(50)], "name": f"train-{k:06d}.tar"} for k in range(20)],
           "plan_version": 4, "é": "ü"}
    want = json.dumps(obj, indent=1, sort_keys=True)
    stages.write_json(str(tmp_path / "plan.json"), obj)
    assert (tmp_path / "plan.json").read_text(encoding="utf-8") == want
    counting_s3.fs().mkdir("gasp-json")
    counting_s3.mark()
    stages.write_json("s3://gasp-json/out/plan.json", obj)
    assert [m for m, _ in counting_s3.requests() if m in ("PUT", "POST")] == ["PUT"]
    assert counting_s3.fs().cat("gasp-json/out/plan.json").decode("utf-8") == want
    for url in (str(tmp_path / "bad.json"), "s3://gasp-json/out/bad.json"):
        with pytest.raises(TypeError):
            stages.write_json(url, {"a": [1, 2], "b": object()})
    assert not os.path.exists(tmp_path / "bad.json") and not counting_s3.fs().exists("gasp-json/out/bad.json")
    assert not glob.glob(str(tmp_path / ".*.part")) and not glob.glob(os.path.join(tempfile.gettempdir(),
                                                                                    ".bad.json.*.part"))


# ----------------------------------------------------------------------------- driver

def test_run_tasks_collects_many_tasks_and_retries_the_failed(ray_local, tmp_path, capsys):
    from data.progress import Progress
    from pipeline import ray_tasks

    def flaky(i: int, marker_dir: str) -> dict:  # nested: shipped to the workers by value
        """Fails the first time for every 7th item (a marker file remembers), else succeeds."""
        marker = os.path.join(marker_dir, str(i))
        if i % 7 == 0 and not os.path.exists(marker):
            open(marker, "w").close()
            return {"ok": False, "name": str(i), "error": "first try fails"}
        return {"ok": True, "name": str(i), "value": i * i}

    n = 400
    prog = Progress("flaky", n, "tasks", quiet=True)
    out = ray_tasks.run_tasks(flaky, list(range(n)), lambda i: (i, str(tmp_path)), prog, retries=1,
                              label=str, name="flaky")
    assert sorted(it for it, _, _ in out) == list(range(n))
    assert all(res["ok"] and res["value"] == it * it for it, res, _ in out)
    assert prog.done == n
    retried = re.findall(r"\[retry\] (\d+): first try fails", capsys.readouterr().out)
    assert sorted(map(int, retried)) == list(range(0, n, 7))


# ------------------------------------------------------------------------- validation

def test_validation_reads_the_shard_records_once(tiny_shards, tiny_instruct_shards, tmp_path):
    """The trainer sorts its validation sets by kind (clips, instruction) from their records at the first
    validation only: a 10,000-scene job's records are tens of MB, read once per run, not per validation."""
    import shutil

    from launch.trainer import Trainer

    shards = str(tmp_path / "shards")
    shutil.copytree(tiny_shards, shards)
    trainer = Trainer.__new__(Trainer)  # only the attribute validate() reads
    trainer.val_sources = [shards, tiny_instruct_shards]
    assert trainer._val_sources() == ([shards], [tiny_instruct_shards])
    shutil.rmtree(shards)  # gone: a second read would drop it
    assert trainer._val_sources() == ([shards], [tiny_instruct_shards])  # not read again
