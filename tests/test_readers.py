"""Corpus readers (ScanNet, ARKitScenes, nerfstudio) against synthetic rooms in each exact layout.

Each corpus is written by tests/corpus_writers.py with that corpus's own conventions;
the reader must give back the generator's K, poses and depth, and its frames must be
photometrically consistent. Each test of a wrong convention (plain resize, inverted
.traj, unconverted OpenGL axes) shows the check would catch it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

import corpus_writers as cw
from conftest import one_line
from data import geometry, pairs
from data.scenes import FrameError, SceneError, list_scenes, open_scene
from data.scenes.arkitscenes import ARKitScene, list_arkit_scenes
from data.scenes.nerfstudio import NerfstudioScene, list_nerfstudio_scenes
from data.scenes.scannet import ScanNetScene, list_scannet_scenes


def pair_stats(scene, a: int, b: int) -> tuple[int, float, float]:
    """(n_corr, photo_err, photo_err_shuffled) of frames a -> b, the shard job's self-check."""
    fa, fb = scene.frames[a], scene.frames[b]
    rgb_a, depth_a = scene.load(fa)
    rgb_b, depth_b = scene.load(fb)
    abs_tol = geometry.visibility_tolerance(scene.metric_depth, float(np.median(depth_a[depth_a > 0])))
    corr = pairs.correspondences(depth_a, fa.K, fa.cam2world, depth_b, fb.K, fb.cam2world,
                                 np.random.default_rng(0), stride=4, abs_tol=abs_tol)
    err, err_sh = pairs.photo_check(rgb_a, rgb_b, corr, np.random.default_rng(1))
    return len(corr), err, err_sh


# ----------------------------------------------------------------------------- ScanNet

@pytest.fixture(scope="module")
def scannet(tmp_path_factory):
    root = tmp_path_factory.mktemp("scannet")
    # indices 8..11: numeric order differs from string order ("10" < "8")
    truth = cw.write_scannet_scene(root, "scene0000_00", seed=3, n_frames=4, color_size=(648, 484), first_index=8)
    return str(root), truth


def test_scannet_reads_back_generator_truth(scannet):
    root, truth = scannet
    scene = open_scene(os.path.join(root, "scene0000_00"), "scannet")
    assert isinstance(scene, ScanNetScene) and scene.skipped == []
    assert [f.name for f in scene.frames] == ["8", "9", "10", "11"]
    assert [f.index for f in scene.frames] == [0, 1, 2, 3]
    assert scene.metric_depth and scene.depth_to_color is None
    for f, T, z, rgb_direct in zip(scene.frames, truth.cam2world, truth.depth, truth.rgb):
        assert f.size == (640, 480)
        assert np.abs(f.K - truth.K).max() < 1e-6
        assert np.abs(f.cam2world - T).max() < 1e-6  # '%f' text keeps 6 decimals
        rgb, depth = scene.load(f)
        assert rgb.shape == (480, 640, 3) and depth.shape == (480, 640)
        assert np.abs(depth - z).max() <= 0.0005 + 1e-6  # millimetre quantisation
        # colour aligned onto the depth grid == a rendering made in the depth camera
        assert np.abs(rgb.astype(float) - rgb_direct).mean() < 2.0


def test_scannet_pairs_are_photometrically_consistent(scannet):
    scene = ScanNetScene(os.path.join(scannet[0], "scene0000_00"))
    for b in (1, 3):
        n, err, err_sh = pair_stats(scene, 0, b)
        assert n > 1000 and err < 0.1 * err_sh, (b, n, err, err_sh)


def test_scannet_plain_resize_of_colour_is_caught(scannet, monkeypatch):
    root, truth = scannet
    scene = ScanNetScene(os.path.join(root, "scene0000_00"))
    right = [pair_stats(scene, 0, b) for b in (1, 3)]
    aligned, _ = scene.load(scene.frames[0])

    def plain_resize(frame):  # the classic mistake: ignore the two K's
        with Image.open(os.path.join(root, "scene0000_00", "color", f"{frame.name}.jpg")) as im:
            return np.asarray(im.convert("RGB").resize(frame.size, Image.BICUBIC))

    monkeypatch.setattr(scene, "_read_rgb", plain_resize)
    resized, _ = scene.load(scene.frames[0])
    err_aligned = np.abs(aligned.astype(float) - truth.rgb[0]).mean()
    err_resized = np.abs(resized.astype(float) - truth.rgb[0]).mean()
    assert err_resized > 8 * err_aligned, (err_aligned, err_resized)
    for (_, e_ok, _), b in zip(right, (1, 3)):
        n, e_bad, e_sh = pair_stats(scene, 0, b)
        assert e_bad > 5 * e_ok and e_bad > 0.25 * e_sh, (b, e_ok, e_bad, e_sh)


def test_scannet_differing_extrinsics_align_through_depth(tmp_path, monkeypatch):
    d2c = np.eye(4)
    d2c[:3, :3] = geometry.axis_angle_to_matrix([0.0, np.deg2rad(2.0), np.deg2rad(0.5)])
    d2c[:3, 3] = [-0.05, 0.01, 0.0]
    truth = cw.write_scannet_scene(tmp_path, "scene0001_00", seed=11, n_frames=1, color_size=(648, 484),
                                   depth_to_color=d2c)
    scene = ScanNetScene(str(tmp_path / "scene0001_00"))
    assert scene.depth_to_color is not None and np.abs(scene.depth_to_color - d2c).max() < 1e-5
    rgb, _ = scene.load(scene.frames[0])
    err = np.abs(rgb.astype(float) - truth.rgb[0]).mean()
    assert err < 1.5, err
    for wrong in (None, geometry.invert_pose(d2c)):  # homography only / the inverse transform
        monkeypatch.setattr(scene, "depth_to_color", wrong)
        bad, _ = scene.load(scene.frames[0])
        assert np.abs(bad.astype(float) - truth.rgb[0]).mean() > 4 * err


@pytest.fixture()
def small_scannet(tmp_path):
    cw.write_scannet_scene(tmp_path, "scene0002_00", seed=5, n_frames=5, color_size=(324, 242),
                           depth_size=(160, 120), inf_pose_frames=(1,))
    return tmp_path / "scene0002_00"


def test_scannet_broken_frames_are_skipped_and_counted(small_scannet):
    (small_scannet / "depth" / "2.png").unlink()
    (small_scannet / "pose" / "3.txt").write_text("1 0 0\nnot a pose\n")
    Image.fromarray(np.full((60, 80), 1000, np.uint16)).save(small_scannet / "depth" / "4.png")
    scene = ScanNetScene(str(small_scannet))
    skipped = dict(scene.skipped)
    assert skipped == {"1": "pose is not finite", "2": "missing depth file",
                       "3": "garbage pose file (expected 16 numbers)"}
    assert [f.name for f in scene.frames] == ["0", "4"]
    assert scene.frames[1].index == 4
    with pytest.raises(FrameError) as e:  # depth of the wrong size: one frame, counted by the job
        scene.load(scene.frames[1])
    assert "80x60" in one_line(e.value) and "scene0002_00" in str(e.value)


def test_scannet_scan_read_is_depth_only_with_the_same_checks(small_scannet, monkeypatch):
    """load_depth (what the scan reads) gives load's depth and load's verdict on broken frames,
    without resampling the colour onto the depth grid."""
    scene = ScanNetScene(str(small_scannet))
    full = {f.name: scene.load(f)[1] for f in scene.frames}
    from data.scenes import scannet as sc

    def no_alignment(*a, **k):
        raise AssertionError("the scan must not align colour")

    monkeypatch.setattr(sc.geometry, "align_color_to_depth", no_alignment)
    for f in scene.frames:
        np.testing.assert_array_equal(scene.load_depth(f), full[f.name])
    monkeypatch.undo()
    jpg = small_scannet / "color" / f"{scene.frames[0].name}.jpg"
    data = jpg.read_bytes()
    for cut in (0.5, 0.97):  # truncated anywhere: both reads refuse it as unreadable rgb
        jpg.write_bytes(data[: int(len(data) * cut)])
        for read in (scene.load, scene.load_depth):
            with pytest.raises(FrameError, match="unreadable rgb"):
                read(scene.frames[0])
    jpg.unlink()
    for read in (scene.load, scene.load_depth):
        with pytest.raises(FrameError, match="missing rgb file"):
            read(scene.frames[0])
    Image.fromarray(np.full((60, 80), 1000, np.uint16)).save(small_scannet / "depth" / f"{scene.frames[1].name}.png")
    for read in (scene.load, scene.load_depth):
        with pytest.raises(FrameError, match="80x60"):
            read(scene.frames[1])


def test_scannet_missing_intrinsics_is_one_line(small_scannet):
    (small_scannet / "intrinsic" / "intrinsic_depth.txt").unlink()
    with pytest.raises(SceneError) as e:
        ScanNetScene(str(small_scannet))
    msg = one_line(e.value)
    assert "intrinsic/intrinsic_depth.txt" in msg and "scene0002_00" in msg


def test_list_scannet_scenes(scannet, small_scannet):
    root = small_scannet.parent
    (root / "not_a_scene").mkdir()
    (root / "notes.txt").write_text("x")
    assert list_scannet_scenes(str(root)) == [str(small_scannet)]
    assert list_scenes(scannet[0], "scannet") == [os.path.join(scannet[0], "scene0000_00")]


# ----------------------------------------------------------------------------- ARKitScenes

@pytest.fixture(scope="module")
def arkit(tmp_path_factory):
    root = tmp_path_factory.mktemp("arkit")
    truth = cw.write_arkit_scene(root, "41069025", seed=5, n_frames=4)
    return str(root), truth


def test_arkit_reads_back_generator_truth(arkit):
    root, truth = arkit
    scene = open_scene(os.path.join(root, "41069025"), "arkitscenes")
    assert isinstance(scene, ARKitScene) and scene.metric_depth
    assert [f.name for f in scene.frames] == truth.names
    # the 60 fps frames between the 10 Hz poses have no pose within tolerance
    assert sorted(n for n, _ in scene.skipped) == sorted(truth.extra["unposed"])
    assert all(reason.startswith("no pose within") for _, reason in scene.skipped)
    assert [f.index for f in scene.frames] == [0, 2, 4, 6]  # slots in the full timestamp order
    for f, T, z, rgb_true in zip(scene.frames, truth.cam2world, truth.depth, truth.rgb):
        assert np.abs(f.cam2world - T).max() < 1e-6  # .traj is world-to-camera, inverted on read
        assert np.abs(f.K - truth.K).max() < 1e-5 and f.size == (256, 192)
        assert abs(f.timestamp - float(f.name)) < 1e-9
        rgb, depth = scene.load(f)
        assert np.array_equal(rgb, rgb_true)
        assert np.abs(depth - z).max() <= 0.0005 + 1e-6


def test_arkit_pairs_are_photometrically_consistent(arkit):
    scene = ARKitScene(os.path.join(arkit[0], "41069025"))
    for b in (1, 3):
        n, err, err_sh = pair_stats(scene, 0, b)
        assert n > 1000 and err < 0.15 * err_sh, (b, n, err, err_sh)


def test_arkit_inverted_traj_direction_is_caught(arkit, monkeypatch):
    from data.scenes import arkitscenes

    scene = ARKitScene(os.path.join(arkit[0], "41069025"))
    right = [pair_stats(scene, 0, b) for b in (1, 2, 3)]
    orig = arkitscenes.traj_line_to_cam2world
    # the wrong reading: the .traj row taken as camera-to-world
    monkeypatch.setattr(arkitscenes, "traj_line_to_cam2world",
                        lambda tokens: (tokens[0], geometry.invert_pose(orig(tokens)[1])))
    wrong = ARKitScene(os.path.join(arkit[0], "41069025"))
    for (n_ok, _, _), b in zip(right, (1, 2, 3)):
        n, err, err_sh = pair_stats(wrong, 0, b)
        # pair yield collapses, and what survives is no better than shuffled
        assert n < 0.2 * n_ok and pairs.photo_flag(err, err_sh), (b, n_ok, n, err, err_sh)


def test_arkit_pose_tolerance_and_3dod_nesting(arkit, tmp_path):
    strict = ARKitScene(os.path.join(arkit[0], "41069025"), pose_tolerance=0.001)  # rows are 2 ms off
    assert strict.frames == [] and len(strict.skipped) == 8
    nested = tmp_path / "47333462"
    shutil.copytree(os.path.join(arkit[0], "41069025"), nested / "47333462_frames")
    (tmp_path / "junk").mkdir()
    assert list_arkit_scenes(str(tmp_path)) == [str(nested)]
    scene = ARKitScene(str(nested))
    assert len(scene.frames) == 4 and scene.frames_url.endswith("47333462_frames")


def test_arkit_malformed_traj_line_is_one_line(arkit, tmp_path):
    scene_dir = tmp_path / "41069025"
    shutil.copytree(os.path.join(arkit[0], "41069025"), scene_dir)
    lines = (scene_dir / "lowres_wide.traj").read_text().splitlines()
    lines[2] = lines[2].rsplit(" ", 1)[0]  # 6 numbers
    (scene_dir / "lowres_wide.traj").write_text("\n".join(lines) + "\n")
    with pytest.raises(SceneError) as e:
        ARKitScene(str(scene_dir))
    msg = one_line(e.value)
    assert "lowres_wide.traj line 3" in msg and "41069025" in msg
    (scene_dir / "lowres_wide.traj").unlink()
    with pytest.raises(SceneError) as e:
        ARKitScene(str(scene_dir))
    assert "missing" in one_line(e.value) and "lowres_wide.traj" in str(e.value)


# ----------------------------------------------------------------------------- nerfstudio

@pytest.fixture(scope="module")
def nerfstudio(tmp_path_factory):
    root = tmp_path_factory.mktemp("nerfstudio")
    truth = cw.write_nerfstudio_scene(root, "dl3dv_0001", seed=7, n_frames=4)
    return str(root), truth


def test_nerfstudio_reads_back_generator_truth(nerfstudio):
    root, truth = nerfstudio
    scene = open_scene(os.path.join(root, "dl3dv_0001"), "nerfstudio")
    assert isinstance(scene, NerfstudioScene) and scene.skipped == []
    assert [f.name for f in scene.frames] == truth.names  # sorted by file name, not json order
    assert scene.metric_depth is False  # COLMAP-scaled unless the json says otherwise
    for f, T, z, rgb_true in zip(scene.frames, truth.cam2world, truth.depth, truth.rgb):
        assert np.abs(f.K - truth.K).max() < 1e-9  # +0.5 pixel-centre convention undone
        assert np.abs(f.cam2world - T).max() < 1e-9  # OpenGL -> OpenCV; applied_transform not re-applied
        rgb, depth = scene.load(f)
        assert np.array_equal(rgb, rgb_true)
        assert np.abs(depth - z).max() <= 0.0005 + 1e-6
    A = truth.extra["applied_transform"]
    assert np.abs(scene.frames[0].cam2world - truth.cam2world[0]).max() < 1e-9
    assert np.abs(A @ scene.frames[0].cam2world - truth.cam2world[0]).max() > 0.1  # applying it again differs


def test_nerfstudio_pairs_are_photometrically_consistent(nerfstudio):
    scene = NerfstudioScene(os.path.join(nerfstudio[0], "dl3dv_0001"))
    for b in (1, 3):
        n, err, err_sh = pair_stats(scene, 0, b)
        assert n > 1000 and err < 0.25 * err_sh, (b, n, err, err_sh)


def test_nerfstudio_unconverted_opengl_axes_are_caught(nerfstudio, monkeypatch):
    monkeypatch.setattr(geometry, "gl_to_cv", lambda T: np.asarray(T, dtype=np.float64))
    scene = NerfstudioScene(os.path.join(nerfstudio[0], "dl3dv_0001"))
    for b in (1, 2, 3):
        n, err, err_sh = pair_stats(scene, 0, b)
        assert pairs.photo_flag(err, err_sh), (b, n, err, err_sh)


def test_nerfstudio_depth_root_and_metric_flag(tmp_path):
    depth_root = tmp_path / "depth"
    truth = cw.write_nerfstudio_scene(tmp_path / "corpus", "dl3dv_0002", seed=9, n_frames=2, size=(160, 120),
                                      depth="root", depth_root=depth_root, applied_transform=False,
                                      json_extra={"metric_depth": True})
    url = str(tmp_path / "corpus" / "dl3dv_0002")
    with pytest.raises(SceneError) as e:  # DL3DV ships no depth: say where it is expected
        NerfstudioScene(url)
    msg = one_line(e.value)
    assert "depth_root" in msg and "README" in msg and "transforms.json" in msg
    scene = NerfstudioScene(url, depth_root=str(depth_root))
    assert scene.metric_depth is True and len(scene.frames) == 2
    _, depth = scene.load(scene.frames[1])
    assert np.array_equal(depth, truth.depth[1])  # float32 .npy, exact
    with pytest.raises(SceneError) as e:
        NerfstudioScene(url, depth_root=str(tmp_path / "elsewhere"))
    assert "elsewhere/dl3dv_0002" in one_line(e.value)
    assert list_nerfstudio_scenes(str(tmp_path / "corpus")) == [url]


@pytest.fixture()
def small_ns(tmp_path):
    cw.write_nerfstudio_scene(tmp_path, "dl3dv_0003", seed=4, n_frames=3, size=(160, 120))
    return tmp_path / "dl3dv_0003"


def _edit_json(scene_dir, fn) -> None:
    import json

    p = scene_dir / "transforms.json"
    meta = json.loads(p.read_text())
    fn(meta)
    p.write_text(json.dumps(meta))


@pytest.mark.parametrize("edit, expect", [
    (lambda m: m.update(frames=[]), "no 'frames'"),
    (lambda m: m.pop("frames"), "no 'frames'"),
    (lambda m: m.update(k1=-3.0), "folds back over"),  # too strong to undo on the same K
    (lambda m: m["frames"][0].update(p2="0.1x"), "not numbers"),
    (lambda m: m.update(camera_model="OPENCV_FISHEYE"), "OPENCV_FISHEYE"),
])
def test_nerfstudio_refusals_are_one_line(small_ns, edit, expect):
    _edit_json(small_ns, edit)
    with pytest.raises(SceneError) as e:
        NerfstudioScene(str(small_ns))
    msg = one_line(e.value)
    assert expect in msg and "transforms.json" in msg and "dl3dv_0003" in msg


LENS = (-0.12, 0.02, 0.0, 0.0, 0.001, -0.0015)  # k1 k2 k3 k4 p1 p2: barrel + tangential, ~14 px at the corners


@pytest.fixture(scope="module")
def lens_ns(tmp_path_factory):
    root = tmp_path_factory.mktemp("nerfstudio_lens")
    truth = cw.write_nerfstudio_scene(root, "dl3dv_lens", seed=7, n_frames=4, dist=LENS)
    return str(root / "dl3dv_lens"), truth


def test_nerfstudio_distortion_is_undone_on_read(lens_ns):
    """Images ray-cast through a lens read back as the pinhole views of the same K (DL3DV ships OPENCV
    cameras with non-zero k1, k2, p1, p2)."""
    url, truth = lens_ns
    scene = NerfstudioScene(url)
    assert len(scene.frames) == 4 and all(f.extra["dist"] == LENS for f in scene.frames)
    for f, rgb_true, z_true in zip(scene.frames, truth.rgb, truth.depth):
        assert np.abs(f.K - truth.K).max() < 1e-9  # same K: the pinhole image of that K
        rgb, depth = scene.load(f)
        raw = np.asarray(Image.open(os.path.join(url, f.extra["rgb"])).convert("RGB")).astype(float)
        v = (depth > 0) & (z_true > 0)
        assert v.mean() > 0.99  # barrel: every pinhole pixel has a source
        rel = np.abs(depth[v] - z_true[v]) / z_true[v]
        assert np.median(rel) < 0.003, np.median(rel)  # nearest resampling, values kept
        err = np.abs(rgb.astype(float) - rgb_true)[v].mean()
        err_ignored = np.abs(raw - rgb_true)[v].mean()
        assert err < 0.4 * err_ignored and err < 6, (err, err_ignored)  # bilinear resampling blur only
    for b in (1, 3):
        n, err, err_sh = pair_stats(scene, 0, b)
        assert n > 1000 and err < 0.25 * err_sh, (b, n, err, err_sh)
    for f in scene.frames:  # the lens ignored: pairs agree visibly worse
        f.extra.pop("dist")
    for b in (1, 3):
        n, err_ignored, _ = pair_stats(scene, 0, b)
        assert err_ignored > 1.4 * pair_stats(NerfstudioScene(url), 0, b)[1], b


def test_nerfstudio_pincushion_corners_are_invalid(tmp_path):
    """k1 > 0: the pinhole image's corners have no source; they come out black with depth 0."""
    cw.write_nerfstudio_scene(tmp_path, "dl3dv_pin", seed=3, n_frames=1, size=(160, 120),
                              dist=(0.25, 0.0, 0.0, 0.0, 0.0, 0.0))
    scene = NerfstudioScene(str(tmp_path / "dl3dv_pin"))
    rgb, depth = scene.load(scene.frames[0])
    assert depth[0, 0] == 0 and depth[-1, -1] == 0 and (rgb[0, 0] == 0).all()
    assert depth[60, 80] > 0 and (depth > 0).mean() > 0.8
    assert np.array_equal(scene.load_depth(scene.frames[0]), depth)  # the scan reads the same depth


def test_nerfstudio_broken_frames(small_ns):
    Image.fromarray(np.full((60, 80), 1000, np.uint16)).save(small_ns / "depths" / "frame_00002.png")
    (small_ns / "depths" / "frame_00003.png").unlink()
    scene = NerfstudioScene(str(small_ns))
    assert scene.skipped == [("frame_00003", "missing depth file")]
    scene.load(scene.frames[0])
    with pytest.raises(FrameError) as e:
        scene.load(scene.frames[1])
    assert "80x60" in one_line(e.value) and "frame_00002" in str(e.value)


# ----------------------------------------------------------------------------- s3://

@pytest.mark.slow
def test_scannet_reads_from_s3(small_scannet, monkeypatch):
    pytest.importorskip("s3fs")
    moto = shutil.which("moto_server") or os.path.join(os.path.dirname(os.sys.executable), "moto_server")
    if not os.path.exists(moto):
        pytest.skip("moto_server not installed")
    from conftest import free_port

    port = free_port()
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                     "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        for _ in range(100):
            try:
                fs.mkdir("corpus")
                break
            except Exception:
                time.sleep(0.1)
        fs.put(str(small_scannet), "corpus/scans/", recursive=True)
        assert list_scenes("s3://corpus/scans", "scannet") == ["s3://corpus/scans/scene0002_00"]
        remote = ScanNetScene("s3://corpus/scans/scene0002_00")
        local = ScanNetScene(str(small_scannet))
        assert [f.name for f in remote.frames] == [f.name for f in local.frames]
        assert remote.skipped == local.skipped
        for fr, fl in zip(remote.frames, local.frames):
            assert np.array_equal(fr.cam2world, fl.cam2world)
        for a, b in zip(remote.load(remote.frames[0]), local.load(local.frames[0])):
            assert np.array_equal(a, b)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        proc.terminate()
        proc.wait(timeout=10)
