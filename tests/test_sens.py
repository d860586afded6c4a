"""ScanNet `.sens` read directly by `--format scannet` (data/scenes/scannet.py).

The `.sens` files are written by tests/corpus_writers.py from ScanNet's published SensorData
layout with struct (independently of the reader); the same seed written as the SensReader
export holds the same numbers, so both must give identical shards through the shard stages.
"""
from __future__ import annotations

import os
import pickle
import shutil
import struct

import numpy as np
import pytest

import corpus_writers as cw
from conftest import one_line
from data import geometry
from data.pairs import ClipConfig
from data.scenes import SceneError, list_scenes, open_scene
from data.scenes.scannet import SENS_FRAME_HEADER, TRUNCATED, ScanNetScene, list_scannet_scenes
from pipeline import stages

D2C = np.eye(4)
D2C[:3, :3] = geometry.axis_angle_to_matrix([0.0, np.deg2rad(1.5), np.deg2rad(0.4)])
D2C[:3, 3] = [-0.04, 0.01, 0.0]
SCENES = {"scene0000_00": dict(seed=21, inf_pose_frames=(3, 9)),  # -inf poses: skipped and counted
          "scene0001_00": dict(seed=22, depth_to_color=D2C)}  # differing extrinsics: alignment through depth


def write_corpus(root, layout: str, n_frames: int = 16, **kw) -> dict[str, cw.Truth]:
    return {name: cw.write_scannet_sens_scene(root, name, layout=layout, n_frames=n_frames, **opts, **kw)
            for name, opts in SCENES.items()}


CLIPS_PER_SCENE = 3


def job(root: str, out: str) -> stages.JobConfig:
    """Clips of up to 4 frames in windows of 13 (dt <= 12, as the pair version's --max-gap 12)."""
    return stages.JobConfig(input=root, format="scannet", output=out, max_side=160, samples_per_shard=2,
                            val_fraction=0.5, clips=ClipConfig(clip_frames=4, clip_window=13,
                                                               clips_per_scene=CLIPS_PER_SCENE))


def scan_all(cfg: stages.JobConfig) -> tuple[list[dict], dict]:
    """The shard job's scan of every scene; the shells round-trip through pickle as through Ray's store."""
    scans = [stages.scan_scene(u, cfg) for u in list_scenes(cfg.input, "scannet")]
    shells = {s["scene"]: pickle.loads(pickle.dumps(s.pop("shell"))) for s in scans if s.get("shell")}
    return scans, shells


def write_all(cfg: stages.JobConfig, plan: dict, shells: dict | None) -> dict[str, bytes]:
    """{shard name: tar bytes} of every planned shard, written by the shard job's write stage."""
    os.makedirs(cfg.output, exist_ok=True)
    out = {}
    for entry in plan["shards"]:
        st = stages.write_shard(entry, cfg, shells)
        assert st["ok"], st
        if shells is not None:
            assert st["scenes_opened"] == 0  # every frame came through its scene shell
        with open(os.path.join(cfg.output, entry["name"]), "rb") as f:
            out[entry["name"]] = f.read()
    return out


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The same two scenes as `.sens` and as the export, each at the SAME corpus path (the shards name
    their source), built through scan -> plan -> write: (plans, shards, scans, truths) per layout."""
    base = tmp_path_factory.mktemp("sens")
    root = str(base / "scans")
    res = {}
    for layout in ("sens", "export"):
        if os.path.exists(root):
            shutil.rmtree(root)
        truths = write_corpus(root, layout)
        cfg = job(root, str(base / f"out_{layout}"))
        scans, shells = scan_all(cfg)
        plan = stages.make_plan(scans, cfg)
        res[layout] = dict(plan=plan, shards=write_all(cfg, plan, shells), scans=scans, truths=truths)
    return res


def tar_samples(data: bytes) -> list[dict]:
    """The samples of a shard's tar bytes, as webdataset hands them over (raw bytes by member)."""
    import io
    import tarfile

    samples: dict[str, dict] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(m).read()
    return list(samples.values())


def strip_frame_seconds(plan: dict) -> dict:
    """The plan without the scan summaries' frame step (what only the .sens's timestamps give)."""
    return {**plan, "scan": {k: {f: v for f, v in s.items() if f != "frame_seconds"} for k, s in plan["scan"].items()}}


def test_sens_and_export_give_identical_shards(both, shard_checks):
    import io

    sens, export = both["sens"], both["export"]
    # the .sens stores timestamps (30 fps), the export none: the frame step is all that may differ
    for key in SCENES:
        assert abs(sens["plan"]["scan"][key]["frame_seconds"] - 0.033333) < 1e-9
        assert export["plan"]["scan"][key]["frame_seconds"] is None
    assert strip_frame_seconds(sens["plan"]) == strip_frame_seconds(export["plan"])  # same frames, skips, clips, split
    assert sens["shards"].keys() == export["shards"].keys() and len(sens["shards"]) >= 3
    for name, data in sens["shards"].items():
        assert data == export["shards"][name], f"{name} differs"
    scan = {s["scene"]: s for s in sens["scans"]}
    assert scan["scene0000_00"]["skipped"] == {"pose is not finite": 2}  # the -inf poses, counted
    assert scan["scene0000_00"]["usable"] == 14 and scan["scene0001_00"]["usable"] == 16
    planned = [it for e in sens["plan"]["shards"] for it in e["clips"]]
    assert len(planned) == len(SCENES) * CLIPS_PER_SCENE  # every stratum of every scene gave a clip
    n = n_pairs = 0
    for data in sens["shards"].values():
        shard_checks.tar(io.BytesIO(data))
        for raw in tar_samples(data):
            s = shard_checks.sample(raw)  # every pair i < j: members, dtypes, visibility in the STORED data
            truth = sens["truths"][s.meta["scene"]]
            assert 3 <= s.n_frames <= 4  # a clip, not a pair
            for k in range(s.n_frames):
                i = truth.names.index(s.meta["frames"][k])
                assert s.index(k) == i  # a .sens frame's index is its position in the file
                np.testing.assert_array_equal(s.T_w(k), truth.cam2world[i])  # float32 poses, exactly
            if s.meta["scene"] == "scene0000_00":
                assert not {3, 9} & set(s.meta["indices"])  # no clip uses a frame with a -inf pose
            n += 1
            n_pairs += len(s.meta["pairs"])
    assert n == len(planned)  # every planned clip written, with every pair i < j of its frames
    assert n_pairs == sum(len(it["indices"]) * (len(it["indices"]) - 1) // 2 for it in planned) >= 3 * n


def test_sens_reads_back_generator_truth(tmp_path):
    truth = cw.write_scannet_sens_scene(tmp_path, "scene0007_00", seed=5, n_frames=6, inf_pose_frames=(2,),
                                        color_size=(648, 484), depth_size=(320, 240))
    scene = open_scene(str(tmp_path / "scene0007_00"), "scannet")
    assert isinstance(scene, ScanNetScene) and scene.sens is not None
    assert scene.sens.version == 4 and scene.sens.sensor_name == "StructureSensor"
    assert scene.sens.color_codec == "jpeg" and scene.sens.depth_codec == "zlib_ushort"
    assert scene.skipped == [("2", "pose is not finite")]
    assert [f.name for f in scene.frames] == ["0", "1", "3", "4", "5"]
    assert [f.index for f in scene.frames] == [0, 1, 3, 4, 5]  # the -inf frame keeps its slot
    assert scene.depth_to_color is None and scene.metric_depth and scene.depth_scale == 1000.0
    np.testing.assert_array_equal(scene.K_color, truth.extra["K_color"])
    for f in scene.frames:
        i = int(f.name)
        assert f.size == (320, 240) and abs(f.timestamp - (1.0 + 0.033333 * i)) < 1e-9
        np.testing.assert_array_equal(f.K, truth.K)
        np.testing.assert_array_equal(f.cam2world, truth.cam2world[i])
        rgb, depth = scene.load(f)
        np.testing.assert_array_equal(depth, truth.depth[i])  # uint16 mm / depth_shift, exactly
        assert np.abs(rgb.astype(float) - truth.rgb[i]).mean() < 2.0  # colour aligned onto the depth grid
        np.testing.assert_array_equal(scene.load_depth(f), depth)


def test_shell_carries_the_index_so_write_tasks_read_only_their_frames(tmp_path):
    """After the scan, garble the `.sens` header and every frame no shell holds: write tasks that got
    the shells still write the same bytes (they neither rescan nor read other frames); a task that has
    to open the scene itself cannot."""
    root = str(tmp_path / "scans")
    write_corpus(root, "sens")
    cfg = job(root, str(tmp_path / "ref"))
    scans, shells = scan_all(cfg)
    plan = stages.make_plan(scans, cfg)
    ref = write_all(cfg, plan, shells)
    for key, shell in shells.items():
        path = os.path.join(root, key, f"{key}.sens")
        data = bytearray(open(path, "rb").read())
        used = {f.extra["sens"][0] for f in shell.frames}
        full = ScanNetScene(os.path.join(root, key))
        assert len(shell.frames) < len(full.frames)
        rng = np.random.default_rng(0)
        data[:64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()  # header: version and sizes garbage
        for f in full.frames:
            offset, n_c, n_d = f.extra["sens"]
            if offset not in used:  # frame header and data of a frame no task needs
                start = offset - SENS_FRAME_HEADER.size
                data[start:offset + n_c + n_d] = rng.integers(0, 256, offset + n_c + n_d - start,
                                                              dtype=np.uint8).tobytes()
        open(path, "wb").write(bytes(data))
    cfg2 = job(root, str(tmp_path / "after"))
    assert write_all(cfg2, plan, shells) == ref
    stages.clear_scene_cache()
    os.makedirs(tmp_path / "noshell")
    st = stages.write_shard(plan["shards"][0], job(root, str(tmp_path / "noshell")))
    assert not st["ok"] and "SensorData version" in st["error"]


@pytest.fixture()
def sens_scene(tmp_path):
    cw.write_scannet_sens_scene(tmp_path, "scene0002_00", seed=5, n_frames=8)
    path = tmp_path / "scene0002_00" / "scene0002_00.sens"
    return path, ScanNetScene(str(path.parent))


def test_truncated_sens_keeps_whole_frames_and_counts_the_rest(sens_scene, tmp_path):
    path, full = sens_scene
    data = path.read_bytes()
    f5 = full.frames[5]
    offset, n_c, n_d = f5.extra["sens"]
    for cut in (offset + n_c // 2, offset - SENS_FRAME_HEADER.size + 40, offset + n_c + n_d - 1):
        path.write_bytes(data[:cut])
        scene = ScanNetScene(str(path.parent))
        assert [f.name for f in scene.frames] == ["0", "1", "2", "3", "4"]
        assert scene.skipped == [(str(k), TRUNCATED) for k in (5, 6, 7)]
        for f in scene.frames:
            np.testing.assert_array_equal(scene.load(f)[1], full.load(full.frames[f.index])[1])
    path.write_bytes(data[:cut])
    cfg = stages.JobConfig(input=str(tmp_path), format="scannet", output=str(tmp_path / "o"))
    scan = stages.scan_scene(str(path.parent), cfg)
    assert scan["ok"] and scan["skipped"] == {TRUNCATED: 3} and scan["frames"] == 8 and scan["usable"] == 5
    first = full.frames[0].extra["sens"][0]
    for cut, expect in ((100, "ends inside its header"), (first + 10, "before its first whole frame"),
                        (0, "ends inside its header")):
        path.write_bytes(data[:cut])
        with pytest.raises(SceneError) as e:
            ScanNetScene(str(path.parent))
        msg = one_line(e.value)
        assert expect in msg and "scene0002_00.sens" in msg and "fetch" in msg
    assert not stages.scan_scene(str(path.parent), cfg)["ok"]  # the job reports it, one line, no traceback


def test_wrong_version_and_unsupported_codecs_are_one_line(sens_scene):
    path, _ = sens_scene
    data = path.read_bytes()
    for version in (3, 1234567):
        path.write_bytes(struct.pack("<I", version) + data[4:])
        with pytest.raises(SceneError) as e:
            ScanNetScene(str(path.parent))
        msg = one_line(e.value)
        assert f"version {version}" in msg and "version 4" in msg and "scene0002_00" in msg
    name_len = struct.unpack("<Q", data[4:12])[0]
    codecs = 12 + name_len + 256  # after the four 4x4 float32 matrices
    path.write_bytes(data[:codecs + 4] + struct.pack("<i", 2) + data[codecs + 8:])
    with pytest.raises(SceneError) as e:
        ScanNetScene(str(path.parent))
    assert "occi_ushort" in one_line(e.value)
    path.write_bytes(data[:codecs] + struct.pack("<i", 7) + data[codecs + 4:])
    with pytest.raises(SceneError) as e:
        ScanNetScene(str(path.parent))
    assert "colour codec 7" in one_line(e.value)


def test_raw_codecs_read_the_same_images(tmp_path):
    """Colour codec 0 (raw RGB) and depth codec 0 (raw uint16), which the layout allows too. (The JPEG colour
    is warped from the decoder's PIL image, the raw one from its array: the same bytes.)"""
    truth = cw.write_scannet_sens_scene(tmp_path / "a", "scene0003_00", seed=8, n_frames=3)
    ref = ScanNetScene(str(tmp_path / "a" / "scene0003_00"))
    frames = []
    for k, f in enumerate(ref.frames):
        rgb = ref._decode_color(ref._color_bytes(f))
        frames.append((truth.cam2world[k], 0, 0, rgb.tobytes(), truth.extra["depth_mm"][k].astype("<u2").tobytes()))
    K_c4, K_d4 = np.eye(4), np.eye(4)
    K_c4[:3, :3], K_d4[:3, :3] = ref.K_color, ref.K_depth
    (tmp_path / "b" / "scene0003_00").mkdir(parents=True)
    (tmp_path / "b" / "scene0003_00" / "scene0003_00.sens").write_bytes(cw.sens_file_bytes(
        K_c4, np.eye(4), K_d4, np.eye(4), (324, 242), (160, 120), frames, color_codec=0, depth_codec=0))
    raw = ScanNetScene(str(tmp_path / "b" / "scene0003_00"))
    assert raw.sens.color_codec == "raw" and raw.sens.depth_codec == "raw_ushort"
    for fa, fb in zip(ref.frames, raw.frames):
        for a, b in zip(ref.load(fa), raw.load(fb)):
            np.testing.assert_array_equal(a, b)


def test_listing_finds_sens_folders_and_prefers_the_sens(tmp_path):
    cw.write_scannet_sens_scene(tmp_path, "scene0004_00", seed=3, n_frames=3)
    cw.write_scannet_scene(tmp_path, "scene0005_00", seed=4, n_frames=3, color_size=(324, 242),
                           depth_size=(160, 120))
    (tmp_path / "scene0006_00").mkdir()
    (tmp_path / "scene0006_00" / "other.sens").write_bytes(b"x")
    assert list_scannet_scenes(str(tmp_path)) == [str(tmp_path / "scene0004_00"), str(tmp_path / "scene0005_00")]
    # an export written next to the .sens (SensReader output in the scan folder): the .sens is read
    cw.write_scannet_scene(tmp_path, "scene0004_00", seed=99, n_frames=2, color_size=(324, 242),
                           depth_size=(160, 120))
    scene = ScanNetScene(str(tmp_path / "scene0004_00"))
    assert scene.sens is not None and len(scene.frames) == 3


@pytest.mark.slow
def test_sens_from_s3_by_range_reads(s3_server, sens_scene, monkeypatch):
    """The same scene from moto's S3 over HTTP: same frames and bytes; after the one-pass index, a
    scattered frame costs one ranged GET, frames in file order ride one read-ahead stream."""
    path, local = sens_scene
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3_server.fs()
    fs.mkdir("sens-corpus")
    fs.put(str(path.parent), "sens-corpus/scans/", recursive=True)
    assert list_scenes("s3://sens-corpus/scans", "scannet") == ["s3://sens-corpus/scans/scene0002_00"]
    remote = ScanNetScene("s3://sens-corpus/scans/scene0002_00")
    assert [f.name for f in remote.frames] == [f.name for f in local.frames]
    assert [f.extra["sens"] for f in remote.frames] == [f.extra["sens"] for f in local.frames]
    rf = remote.sens_file
    assert rf.requests == 0
    for a, b in zip(remote.load(remote.frames[5]), local.load(local.frames[5])):
        np.testing.assert_array_equal(a, b)
    assert rf.requests == 1  # one ranged GET for colour and depth together
    remote.load(remote.frames[6])
    remote.load(remote.frames[7])
    assert rf.requests == 1  # the next frames in file order: the read-ahead stream
    shell = pickle.loads(pickle.dumps(stages.scene_shell(remote, {1, 3})))
    assert [f.index for f in shell.frames] == [1, 3] and shell.sens_file.requests == 0
    for a, b in zip(shell.load(shell.frames[1]), local.load(local.frames[3])):
        np.testing.assert_array_equal(a, b)
    assert shell.sens_file.requests == 1
    s3fs.S3FileSystem.clear_instance_cache()
