"""ScanNet++ iPhone stream, `--format scannetpp` (data/scenes/scannetpp.py), and frames from video
files (data/scenes/video_frames.py).

Scenes are written by tests/corpus_writers.py in ScanNet++'s layout from the synthetic renderer
(exact depth and poses): RGB encoded as a real H.264 video with PyAV (keyframe every 6 frames,
B-frames), depth.bin in each encoding the toolkit reads. Correspondences in the shards are checked
against ray-cast truth; conventions a reader could get wrong are shown to be flagged by the shard
job's self-check.
"""
from __future__ import annotations

import glob
import json
import os
import pickle

import numpy as np
import pytest

import corpus_writers as cw
from conftest import one_line
from data import geometry, synthetic
from data.pairs import ClipConfig
from data.scenes import SceneError, list_scenes, open_scene
from data.scenes import scannetpp as spp
from data.scenes.video_frames import VideoFrames, VideoIndex
from pipeline import stages

RGB_SIZE = (640, 480)  # the reader takes any 4:3 size; 1920x1440 in the release, smaller renders here
ENCODINGS = ("lz4", "deflate", "stream")
N_FRAMES = 12
# Clips of up to 4 frames in windows of 11 (dt <= 10, as the pair version's --max-gap 10): in a 12-frame scene
# a window fits at 2 starts, so every scene gives 2 clips (6 pairs each when full).
CLIPS = dict(clip_frames=4, clip_window=11, clips_per_scene=2)


# ----------------------------------------------------------------------------- video frames

@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """40 frames, each a different flat grey with its index written in blocks, H.264, GOP 8, B-frames."""
    path = tmp_path_factory.mktemp("video") / "v.mkv"
    frames = []
    for k in range(40):
        a = np.full((96, 128, 3), 40 + 4 * k, np.uint8)
        a[8:40, 8 + 3 * (k % 32):16 + 3 * (k % 32)] = 250
        frames.append(a)
    cw.encode_video(path, frames, fps=60, gop=8)
    return str(path), frames


def nearest_source(img: np.ndarray, frames: list[np.ndarray]) -> int:
    return int(np.argmin([np.abs(img.astype(float) - f).mean() for f in frames]))


def test_video_index_and_seeking_decode_exactly_the_asked_frames(video):
    path, frames = video
    index = VideoIndex.build(path)
    assert len(index) == 40 and index.size == (128, 96) and index.codec == "h264" and index.fps == 60
    assert np.flatnonzero(index.keyframe).tolist() == [0, 8, 16, 24, 32]
    assert np.all(np.diff(index.pts) > 0) and abs(index.seconds(30) - 0.5) < 0.002
    index = pickle.loads(pickle.dumps(index))  # travels with a scene shell
    vf = VideoFrames(index)
    order = [13, 2, 39, 14, 15, 31, 0, 22]  # scattered, backwards, within one group of pictures
    for k in order:
        assert nearest_source(vf.get(k), frames) == k
    assert vf.stats["returned"] == len(order)
    # 13: seek to keyframe 8, decode 8..13; 2: seek to 0, 0..2; 39: seek, 32..39; 14: seek, 8..14;
    # 15: continue, 1; 31: seek, 24..31; 0: seek, 1; 22: seek, 16..22
    assert vf.stats["seeks"] == 7 and vf.stats["decoded"] == 6 + 3 + 8 + 7 + 1 + 8 + 1 + 7
    assert vf.cost_per_frame() == pytest.approx(41 / 8)
    seq = VideoFrames(index)
    for k in range(40):
        assert nearest_source(seq.get(k), frames) == k
    assert seq.stats["decoded"] == 40 and seq.stats["seeks"] == 1 and seq.cost_per_frame() == 1.0
    kept = VideoFrames(index, keep={17, 19, 21})  # frames the caller will want are kept on the way
    assert nearest_source(kept.get(21), frames) == 21 and kept.stats["decoded"] == 6
    for k in (17, 19):
        assert nearest_source(kept.get(k), frames) == k
    assert kept.stats["decoded"] == 6 and kept.cost_per_frame() == 2.0
    with pytest.raises(IndexError):
        vf.get(40)


# ----------------------------------------------------------------------------- reader

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three scenes, one per depth.bin encoding (the first with renders made in the stored view's camera)."""
    root = tmp_path_factory.mktemp("scannetpp")
    truths = {f"{enc}_scene": cw.write_scannetpp_scene(root, f"{enc}_scene", seed=30 + i, n_frames=N_FRAMES,
                                                       rgb_size=RGB_SIZE, encoding=enc, view_renders=i == 0)
              for i, enc in enumerate(ENCODINGS)}
    return str(root), truths


@pytest.mark.parametrize("enc", ENCODINGS)
def test_scannetpp_reads_back_generator_truth(corpus, enc):
    root, truths = corpus
    truth = truths[f"{enc}_scene"]
    scene = open_scene(os.path.join(root, f"{enc}_scene"), "scannetpp")
    assert isinstance(scene, spp.ScanNetPPScene) and scene.metric_depth and scene.skipped == []
    assert scene.depth.encoding == (spp.DEFLATE_STREAM if enc == "stream" else spp.PER_FRAME)
    assert scene.rgb_size == RGB_SIZE and scene.view_size == (512, 384) and scene.fps == 60
    assert [f.name for f in scene.frames] == truth.names and [f.index for f in scene.frames] == list(range(N_FRAMES))
    # K of the depth map is the RGB K resized by the §3 rule; the view's K is that resized again
    K_d = geometry.resize_intrinsics(truth.extra["K_rgb"], RGB_SIZE, (256, 192))
    np.testing.assert_allclose(geometry.resize_intrinsics(K_d, (256, 192), (512, 384)), truth.K, atol=1e-12)
    for f, T, z, rgb_true in zip(scene.frames, truth.cam2world, truth.depth, truth.rgb):
        np.testing.assert_allclose(f.K, truth.K, atol=1e-12)
        np.testing.assert_array_equal(f.cam2world, T)  # aligned_pose, not the raw ARKit pose
        rgb, depth = scene.load(f)
        assert rgb.shape == (384, 512, 3) and depth.shape == (384, 512)
        np.testing.assert_array_equal(depth, z)  # nearest: every 2x2 block is one stored depth sample
        assert (depth[0::2, 0::2] == depth[1::2, 1::2]).all()
        err = np.abs(rgb.astype(float) - rgb_true).mean()
        assert err < 4.0, err  # video compression + resampling; a pixel off would be ~10
        np.testing.assert_array_equal(scene.load_depth(f), depth)


def test_scannetpp_frames_are_the_video_frames_in_order(corpus):
    """Frame k of the scene is frame k of the video (frame_%06d from 0), not a neighbour."""
    root, truths = corpus
    truth = truths["lz4_scene"]
    scene = open_scene(os.path.join(root, "lz4_scene"), "scannetpp")
    for k in (9, 3, 4, 11, 0):
        rgb, _ = scene.load(scene.frames[k])
        errs = [np.abs(rgb.astype(float) - t).mean() for t in truth.rgb]
        assert int(np.argmin(errs)) == k, errs


def shard_job(root: str, out: str, **kw) -> tuple[dict, list[dict], dict]:
    """scan -> plan -> write in this process, shells pickled as through Ray's store.
    Returns (plan, raw samples, {scene: verdict of the self-check})."""
    cfg = stages.JobConfig(input=root, format="scannetpp", output=out, max_side=640, samples_per_shard=4,
                           val_fraction=0.0, clips=ClipConfig(**CLIPS), **kw)
    scans = [stages.scan_scene(u, cfg) for u in list_scenes(root, "scannetpp")]
    shells = {s["scene"]: pickle.loads(pickle.dumps(s.pop("shell"))) for s in scans if s.get("shell")}
    plan = stages.make_plan(scans, cfg)
    os.makedirs(out, exist_ok=True)
    agg: dict[str, dict] = {}
    for entry in plan["shards"]:
        st = stages.write_shard(entry, cfg, shells)
        assert st["ok"] and st["scenes_opened"] == 0, st
        for key, acc in st["scenes"].items():
            agg.setdefault(key, {"ratios": []})["ratios"] += acc["ratios"]
    from test_sens import tar_samples

    samples = [s for t in sorted(glob.glob(os.path.join(out, "*.tar"))) for s in tar_samples(open(t, "rb").read())]
    verdicts = {k: stages.scene_verdict(plan["scan"][k], agg.get(k)) for k in plan["scan"]}
    return plan, samples, verdicts


def gt_uv_b(room, uv_a, K_a, T_a, K_b, T_b):
    """Where each A pixel's surface point lands in B, by ray casting the room (exact geometry)."""
    rays = np.c_[uv_a, np.ones(len(uv_a))] @ np.linalg.inv(K_a).T
    dirs = rays @ T_a[:3, :3].T
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    origins = np.repeat(T_a[None, :3, 3], len(uv_a), 0)
    t, _ = synthetic.raycast(room, origins, dirs)
    uv_b, _ = geometry.project(geometry.transform(geometry.invert_pose(T_b), origins + dirs * t[:, None]), K_b)
    return uv_b


def test_scannetpp_shards_give_correct_correspondences(corpus, tmp_path, shard_checks):
    """Every pair i < j of every clip: correspondences against ray-cast truth, the self-check passed."""
    root, truths = corpus
    plan, samples, verdicts = shard_job(root, str(tmp_path / "out"))
    assert verdicts == {k: None for k in truths}, verdicts  # no scene flagged
    assert len(samples) == len(truths) * CLIPS["clips_per_scene"]  # 2 clips a scene, none skipped
    errs, n_pairs = [], 0
    for raw in samples:
        s = shard_checks.sample(raw)  # DESIGN §4.1 members; every row passes visibility in the STORED data
        truth = truths[s.meta["scene"]]
        assert s.meta["dataset"] == "scannetpp" and s.n_frames >= 3
        assert s.meta["sizes"] == [[512, 384]] * s.n_frames
        ix = [truth.names.index(name) for name in s.meta["frames"]]
        assert s.meta["indices"] == ix and ix[-1] - ix[0] < CLIPS["clip_window"]  # frame_%06d is the video frame
        for k, i in enumerate(ix):
            np.testing.assert_allclose(s.K(k), truth.K, atol=1e-9)
            np.testing.assert_array_equal(s.T_w(k), truth.cam2world[i])
        for p, (i, j) in enumerate(s.meta["pairs"]):
            corr = s.pair_corr(i, j)
            assert len(corr) == s.meta["n_corr"][p] > 0, (s.key, i, j)
            uv_gt = gt_uv_b(truth.room, corr[:, :2].astype(float), truth.K, truth.cam2world[ix[i]], truth.K,
                            truth.cam2world[ix[j]])
            errs.append(np.linalg.norm(corr[:, 2:] - uv_gt, axis=1))
            assert s.meta["photo_err"][p] < 0.35 * s.meta["photo_err_shuffled"][p], (s.key, i, j, s.meta)
            n_pairs += 1
    assert n_pairs >= 24  # at least as many pairs checked as the pair version's 24 planned
    err = np.concatenate(errs)
    # depth is one ARKit sample per 2x2 view pixels: a point's depth is that of a ray <= 0.7 px away
    assert np.median(err) < 0.3 and np.percentile(err, 95) < 1.5, (np.median(err), np.percentile(err, 95))


@pytest.mark.parametrize("mistake", ["depth-grid K", "OpenGL axes", "world-to-camera"])
def test_wrong_conventions_are_flagged_by_the_self_check(corpus, tmp_path, monkeypatch, mistake):
    """What a reader that got a convention wrong would produce is flagged by the shard job's self-check
    (clip yield collapse or photo_err not well below shuffled: pipeline/stages.py scene_verdict)."""
    root, truths = corpus
    one = str(tmp_path / "one")
    os.makedirs(one)
    os.symlink(os.path.join(root, "lz4_scene"), os.path.join(one, "lz4_scene"))
    if mistake == "depth-grid K":  # K resized to 256x192 but used on the 2x view (the RGB K unresized is worse)
        monkeypatch.setattr(spp, "view_intrinsics", lambda K, rgb_size, view_size:
                            geometry.resize_intrinsics(K, rgb_size, spp.DEPTH_SIZE))
    else:
        orig = spp.pose_from_json
        convert = geometry.gl_to_cv if mistake == "OpenGL axes" else geometry.invert_pose
        monkeypatch.setattr(spp, "pose_from_json", lambda entry: convert(orig(entry)))
    cfg = stages.JobConfig(input=one, format="scannetpp", output=str(tmp_path / "o"), max_side=640,
                           samples_per_shard=4, val_fraction=0.0, clips=ClipConfig(**CLIPS))
    scan = stages.scan_scene(os.path.join(one, "lz4_scene"), cfg)
    shell = scan.pop("shell")
    plan = stages.make_plan([scan], cfg)
    os.makedirs(cfg.output)
    ratios = []
    for entry in plan["shards"]:
        st = stages.write_shard(entry, cfg, {"lz4_scene": shell})
        assert st["ok"], st
        ratios += st["scenes"].get("lz4_scene", {}).get("ratios", [])
    verdict = stages.scene_verdict(plan["scan"]["lz4_scene"], {"ratios": ratios})
    assert verdict is not None and "wrong pose convention" in verdict, (mistake, verdict, scan["yield"], ratios)


# ----------------------------------------------------------------------------- scene shell

def test_shell_carries_depth_and_index_so_write_tasks_do_not_rescan(corpus, tmp_path):
    """After the scan, depth.bin loses every record the shells do not hold (per-frame) or disappears
    (whole-file stream: the shell carries its frames' depth), and pose_intrinsic_imu.json is gone:
    write tasks that got the shells still write the same shards."""
    root, truths = corpus
    work = str(tmp_path / "corpus")
    for name in ("lz4_scene", "stream_scene"):
        os.makedirs(os.path.join(work, name, "iphone"))
        for f in ("rgb.mkv", "depth.bin", "pose_intrinsic_imu.json"):
            os.link(os.path.join(root, name, "iphone", f), os.path.join(work, name, "iphone", f))
    cfg = stages.JobConfig(input=work, format="scannetpp", output=str(tmp_path / "a"), max_side=640,
                           samples_per_shard=4, val_fraction=0.0, clips=ClipConfig(**CLIPS))
    scans = [stages.scan_scene(u, cfg) for u in list_scenes(work, "scannetpp")]
    blobs = {s["scene"]: pickle.dumps(s.pop("shell")) for s in scans}
    shells = {k: pickle.loads(b) for k, b in blobs.items()}
    assert sorted(shells["stream_scene"]._carried) == sorted(f.index for f in shells["stream_scene"].frames)
    assert not shells["lz4_scene"]._carried  # random access: nothing to carry
    assert len(shells["lz4_scene"].frames) < N_FRAMES  # some depth.bin records below belong to no clip
    plan = stages.make_plan(scans, cfg)

    def write(out: str) -> dict[str, bytes]:
        c = stages.JobConfig(**{**cfg.__dict__, "output": out})
        os.makedirs(out)
        res = {}
        for entry in plan["shards"]:
            st = stages.write_shard(entry, c, {k: pickle.loads(b) for k, b in blobs.items()})
            assert st["ok"] and st["scenes_opened"] == 0 and st["samples"] == len(entry["clips"]), st
            res[entry["name"]] = open(os.path.join(out, entry["name"]), "rb").read()
        return res

    ref = write(str(tmp_path / "ref"))
    lz4_bin = os.path.join(work, "lz4_scene", "iphone", "depth.bin")
    data = bytearray(open(lz4_bin, "rb").read())
    used = {f.extra["depth"] for f in shells["lz4_scene"].frames}
    for rec in spp.DepthBin(lz4_bin, "lz4_scene").records:
        if rec not in used:
            offset, n = rec
            data[offset - 4:offset + n] = b"\xff" * (n + 4)
    os.unlink(lz4_bin)
    open(lz4_bin, "wb").write(bytes(data))
    os.unlink(os.path.join(work, "stream_scene", "iphone", "depth.bin"))
    for name in ("lz4_scene", "stream_scene"):
        os.unlink(os.path.join(work, name, "iphone", "pose_intrinsic_imu.json"))
    assert write(str(tmp_path / "after")) == ref


# ----------------------------------------------------------------------------- broken input

@pytest.fixture()
def small(tmp_path):
    cw.write_scannetpp_scene(tmp_path, "a1b2c3d4e5", seed=7, n_frames=6, rgb_size=(320, 240), encoding="lz4")
    return tmp_path / "a1b2c3d4e5" / "iphone"


def test_missing_or_broken_files_are_one_line(small):
    for f in ("pose_intrinsic_imu.json", "rgb.mkv", "depth.bin"):
        os.rename(small / f, small / (f + ".away"))
        with pytest.raises(SceneError) as e:
            open_scene(str(small.parent), "scannetpp")
        msg = one_line(e.value)
        assert f"missing {small / f}" in msg and "a1b2c3d4e5" in msg and "README" in msg
        os.rename(small / (f + ".away"), small / f)
    (small / "depth.bin").write_bytes(b"\x07" * 5000)
    with pytest.raises(SceneError) as e:
        open_scene(str(small.parent), "scannetpp")
    assert "neither one raw-deflate stream nor per-frame" in one_line(e.value)
    (small / "rgb.mkv").write_bytes(b"not a video")
    with pytest.raises(SceneError) as e:
        open_scene(str(small.parent), "scannetpp")
    assert "rgb.mkv" in one_line(e.value)


def test_frames_without_pose_depth_or_video_are_skipped_and_counted(small, tmp_path):
    meta = json.loads((small / "pose_intrinsic_imu.json").read_text())
    meta["frame_000002"]["aligned_pose"] = np.full((4, 4), np.nan).tolist()
    del meta["frame_000003"]
    meta["frame_000009"] = dict(meta["frame_000000"])  # the video has 6 frames
    (small / "pose_intrinsic_imu.json").write_text(json.dumps(meta))
    data = (small / "depth.bin").read_bytes()
    recs = spp.DepthBin(str(small / "depth.bin"), "x").records
    (small / "depth.bin").write_bytes(data[:recs[5][0] + 10])  # cut inside the last record
    scene = open_scene(str(small.parent), "scannetpp")
    assert [f.index for f in scene.frames] == [0, 1, 4]
    assert dict(scene.skipped) == {"frame_000002": "pose is not finite",
                                   "frame_000003": "no entry in pose_intrinsic_imu.json",
                                   "frame_000005": "truncated depth.bin", "frame_000009": "no frame in rgb.mkv"}
    cfg = stages.JobConfig(input=str(small.parent.parent), format="scannetpp", output=str(tmp_path / "o"))
    scan = stages.scan_scene(str(small.parent), cfg)
    assert scan["ok"] and scan["usable"] == 3 and scan["frames"] == 7 and sum(scan["skipped"].values()) == 4


def test_truncated_deflate_stream_fails_its_frames_as_counted_skips(tmp_path):
    cw.write_scannetpp_scene(tmp_path, "f0e1d2c3b4", seed=9, n_frames=6, rgb_size=(320, 240), encoding="stream")
    iphone = tmp_path / "f0e1d2c3b4" / "iphone"
    data = (iphone / "depth.bin").read_bytes()
    full = open_scene(str(iphone.parent), "scannetpp")
    ref = [full.load_depth(f) for f in full.frames]
    (iphone / "depth.bin").write_bytes(data[: len(data) // 2])
    scene = open_scene(str(iphone.parent), "scannetpp")
    assert scene.depth.encoding == spp.DEFLATE_STREAM and len(scene.frames) == 6  # no count until inflated
    cfg = stages.JobConfig(input=str(tmp_path), format="scannetpp", output=str(tmp_path / "o"))
    scan = stages.scan_scene(str(iphone.parent), cfg)
    assert scan["ok"] and 0 < scan["usable"] < 6 and scan["skipped"] == {"missing depth": 6 - scan["usable"]}
    for f, d in zip(scene.frames[: scan["usable"]], ref):
        np.testing.assert_array_equal(scene.load_depth(f), d)


def test_listing(corpus, tmp_path):
    root, truths = corpus
    assert list_scenes(root, "scannetpp") == sorted(os.path.join(root, k) for k in truths)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SceneError, match="no scannetpp scenes"):
        list_scenes(str(tmp_path / "empty"), "scannetpp")


@pytest.mark.slow
def test_scannetpp_from_s3(s3_server, small, monkeypatch):
    """The video (through an fsspec file object), depth.bin and json from moto's S3 over HTTP."""
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3_server.fs()
    fs.mkdir("spp-corpus")
    fs.put(str(small.parent), "spp-corpus/data/", recursive=True)
    assert list_scenes("s3://spp-corpus/data", "scannetpp") == ["s3://spp-corpus/data/a1b2c3d4e5"]
    remote = open_scene("s3://spp-corpus/data/a1b2c3d4e5", "scannetpp")
    local = open_scene(str(small.parent), "scannetpp")
    assert [f.name for f in remote.frames] == [f.name for f in local.frames]
    for k in (4, 1):
        for a, b in zip(remote.load(remote.frames[k]), local.load(local.frames[k])):
            np.testing.assert_array_equal(a, b)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.slow
def test_shard_job_through_ray_reads_scannetpp(ray_local, corpus, tmp_path, shard_checks):
    """`pipeline/shard.py --format scannetpp` end to end on Ray: the scan tasks' shells (video index,
    per-frame depth offsets, carried depth of the deflate stream) go through Ray's object store."""
    from test_shard_job import run_main, verify_output

    root, truths = corpus
    out = str(tmp_path / "out")
    rc, _, _ = run_main(["--input", root, "--format", "scannetpp", "--output", out, "--clip-frames", "4",
                         "--clip-window", "11", "--clips-per-scene", "2", "--samples-per-shard", "4", "--max-side",
                         "640", "--val-fraction", "0.34", "--quiet"])
    assert rc == 0
    manifest, metas = verify_output(out, shard_checks)
    c = manifest["counts"]
    # 3 scenes x 2 clips (2 window starts in 12 frames); each clip's pairs i < j supervised
    assert manifest["flagged_scenes"] == {} and c["clips"] == c["clips_planned"] == 6
    assert c["pairs"] == sum(len(m["pairs"]) for m in metas) >= 24
    assert c["frames_stored"] == sum(len(m["frames"]) for m in metas)
    hist = manifest["dt_histogram"]["scannetpp"]  # every supervised pair's frame distance, inside the window
    assert sum(hist.values()) == c["pairs"] and all(1 <= int(dt) <= 10 for dt in hist)
    assert manifest["frame_seconds"] == {"scannetpp": round(1 / 60, 6)}  # rgb.mkv at 60 fps, every frame read
    assert {m["scene"] for m in metas} == set(truths) and {m["dataset"] for m in metas} == {"scannetpp"}
