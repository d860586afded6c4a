"""The Ray shard job end to end (issue 4): real Ray, real files, real processes.

In-process tests share one `ray.init` (conftest `ray_local`); tests that kill things
or need their own cluster run `pipeline/shard.py` as a subprocess in a new session and
kill exactly that session's processes afterwards (never `ray stop`).
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD = os.path.join(ROOT, "pipeline", "shard.py")
GOLDEN = os.path.join(ROOT, "tests", "golden", "train-000000.tar")
# 3 scenes x 24 frames (conftest tiny_corpus): up to 9 clips of up to 4 frames (windows of 16) in shards of 2;
# one val scene
TINY = ["--format", "synthetic", "--clip-frames", "4", "--clip-window", "16", "--clips-per-scene", "3",
        "--samples-per-shard", "2", "--max-side", "160", "--val-fraction", "0.34"]
TEST_DELAY_ENV = "GASP_TEST_WRITE_DELAY"


# ----------------------------------------------------------------------- helpers

def run_main(argv: list[str], capsys=None) -> tuple[int, str, str]:
    """pipeline.shard.main in this process (reusing the session's Ray); (rc, stdout, stderr)."""
    from pipeline import shard

    if capsys is not None:
        capsys.readouterr()
    rc = shard.main([str(a) for a in argv])
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return rc, out, err


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def shard_hashes(out: str) -> dict[str, str]:
    return {os.path.basename(p): sha256(p) for p in sorted(glob.glob(os.path.join(out, "*.tar")))}


def read_samples(tars: list[str]) -> list[dict]:
    """Raw samples (bytes) of the tars, read with webdataset's own tar reader."""
    import webdataset as wds

    return list(wds.WebDataset(tars, shardshuffle=False, empty_check=False))


def verify_output(out: str, shard_checks) -> tuple[dict, list]:
    """Every check of a finished local output: tars, members, corr, splits, manifest counts."""
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    c = manifest["counts"]
    assert manifest["complete"] and c["shards"] == c["shards_planned"] > 0
    tars = sorted(glob.glob(os.path.join(out, "*.tar")))
    assert [os.path.basename(t) for t in tars] == sorted(s["name"] for s in manifest["shards"])
    by_name = {s["name"]: s for s in manifest["shards"]}
    for t in tars:
        with open(t, "rb") as f:
            names = shard_checks.tar(f)
        entry = by_name[os.path.basename(t)]
        assert sha256(t) == entry["sha256"] and os.path.getsize(t) == entry["bytes"]
        # 2 members a frame (jpg, depth png) + corr.npy + json per clip
        assert len(names) == 2 * entry["frames"] + 2 * entry["samples"]
    assert not glob.glob(os.path.join(out, ".*.part")), "a partial shard was left behind"
    samples = read_samples(tars)
    metas = []
    per_shard: dict[str, int] = {}
    scene_split: dict[str, set] = {}
    for raw in samples:
        s = shard_checks.sample(raw)
        name = os.path.basename(raw["__url__"])
        per_shard[name] = per_shard.get(name, 0) + 1
        scene_split.setdefault(s.meta["scene"], set()).add(by_name[name]["split"])
        assert raw["__key__"].startswith(f"{int(name.split('-')[1][:6]):06d}_")
        metas.append(s.meta)
    assert per_shard == {n: s["samples"] for n, s in by_name.items() if s["samples"]}
    assert len(samples) == c["clips"] == c["clips_train"] + c["clips_val"] + c["clips_test"]
    n_pairs = sum(len(m["pairs"]) for m in metas)
    assert n_pairs == c["pairs"] == sum(sum(h.values()) for h in manifest["dt_histogram"].values())
    assert sum(len(m["frames"]) for m in metas) == c["frames_stored"]
    assert all(len(sp) == 1 for sp in scene_split.values()), f"a scene is in two splits: {scene_split}"
    for split in ("train", "val", "test"):
        assert {sc for sc, sp in scene_split.items() if split in sp} <= set(manifest["splits"][split])
    assert not set(manifest["splits"]["train"]) & set(manifest["splits"]["val"])
    assert manifest["kind"] == "clips" and manifest["format_version"] == 2
    return manifest, metas


def session_procs(sid: int) -> list[psutil.Process]:
    """Live processes of a session (what a subprocess started with start_new_session spawned)."""
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, psutil.Error, OSError):
            pass
    return out


def kill_session(sid: int) -> None:
    """SIGKILL every process of that session (ours) and wait for them."""
    procs = session_procs(sid)
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=15)


def start_job(argv: list[str], env_extra: dict[str, str], log_path: str) -> subprocess.Popen:
    env = {**os.environ, **env_extra}
    log = open(log_path, "wb")
    return subprocess.Popen([sys.executable, SHARD, *map(str, argv)], stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=ROOT, start_new_session=True)


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None, log: str | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)
    tail = open(log).read()[-3000:] if log and os.path.exists(log) else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


# ----------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def reference(ray_local, tiny_corpus, tmp_path_factory):
    """An uninterrupted run on the tiny corpus: (output folder, {shard: sha256})."""
    out = str(tmp_path_factory.mktemp("reference"))
    rc, _, _ = run_main(["--input", tiny_corpus, "--output", out, *TINY, "--quiet"])
    assert rc == 0
    return out, shard_hashes(out)


# ----------------------------------------------------------------------- end to end

def test_end_to_end_synthetic(reference, shard_checks):
    out, hashes = reference
    ray_procs = [p.pid for p in psutil.Process().children(recursive=True)]  # the in-process Ray
    ips = _listening_ips(ray_procs + [os.getpid()])
    assert ips and ips <= {"127.0.0.1", "::ffff:127.0.0.1"}, f"Ray listens beyond loopback: {ips}"
    manifest, metas = verify_output(out, shard_checks)
    c = manifest["counts"]
    assert c["scenes"] == 3 and c["frames"] == 72 and c["frames_skipped"] == 0
    assert c["clips"] == c["clips_planned"] >= 7 and len(hashes) == c["shards"] >= 4  # up to 3 clips a scene
    assert manifest["skipped_by_reason"] == {} and manifest["flagged_scenes"] == {}
    assert len(manifest["splits"]["val"]) == 1 and len(manifest["splits"]["train"]) == 2
    assert all(m["sizes"] == [[160, 120]] * len(m["frames"]) and m["dataset"] == "synthetic" for m in metas)
    assert all(2 <= len(m["frames"]) <= 4 and m["indices"][-1] - m["indices"][0] <= 15 for m in metas)
    assert 2 * sum(len(m["frames"]) == 4 for m in metas) >= len(metas)  # at least half the clips reach K frames
    dts = {int(d) for d in manifest["dt_histogram"]["synthetic"]}
    assert dts <= set(range(1, 16)) and len(dts) >= 6  # frame distances spread over the window
    assert manifest["config"]["clip_frames"] == 4 and manifest["config"]["clips"]["clip_window"] == 16
    for sc in manifest["scenes"].values():  # per-scene self-check summary
        assert sc["photo_ratio_median"] < 0.3 and sc["clips"] == sc["clips_planned"] >= 2
    # the global shuffle mixes scenes within a shard
    with open(os.path.join(out, "plan.json")) as f:
        plan = json.load(f)
    assert any(len({it["scene"] for it in e["clips"]}) > 1 for e in plan["shards"])
    assert plan["content_hash"] == manifest["content_hash"]
    for name in hashes:  # write tasks read the frames through the scan's scene shells, no re-open
        with open(os.path.join(out, name.replace(".tar", ".stats.json"))) as f:
            assert json.load(f)["scenes_opened"] == 0


def test_rerun_reuses_plan_and_refuses_other_arguments(reference, tiny_corpus, tmp_path, capsys):
    src, hashes = reference
    out = str(tmp_path / "out")
    shutil.copytree(src, out)
    mtimes = {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(out, "*"))}
    rc, so, _ = run_main(["--input", tiny_corpus, "--output", out, *TINY], capsys)
    assert rc == 0
    assert "reusing" in so and f"{len(hashes)} of {len(hashes)} shards already done; writing 0" in so
    assert all(os.stat(p).st_mtime_ns == t for p, t in mtimes.items() if p.endswith((".tar", ".stats.json")))
    assert shard_hashes(out) == hashes
    with open(os.path.join(src, "manifest.json")) as a, open(os.path.join(out, "manifest.json")) as b:
        ma, mb = json.load(a), json.load(b)
    assert ma["config"].pop("output") != mb["config"].pop("output")
    assert ma == mb  # the manifest depends on plan.json and the stats only

    rc, so, se = run_main(["--input", tiny_corpus, "--output", out, *TINY, "--max-side", "120"], capsys)
    assert rc == 2 and len(se.strip().splitlines()) == 1 and "--overwrite" in se and "[ray]" not in so
    assert shard_hashes(out) == hashes

    rc, so, _ = run_main(["--input", tiny_corpus, "--output", out, *TINY, "--max-side", "120", "--overwrite",
                          "--quiet"], capsys)
    assert rc == 0 and "[overwrite]" in so
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    assert m["config"]["max_side"] == 120 and m["counts"]["shards"] == len(glob.glob(os.path.join(out, "*.tar")))
    assert set(shard_hashes(out).values()).isdisjoint(hashes.values())


def test_rerun_refuses_a_plan_of_another_scene_list_or_reader(ray_local, tiny_corpus, tmp_path, capsys):
    """plan.json is reused only for the scene list and reader version it was made from (issue 15)."""
    from conftest import write_tiny_corpus

    out, corpus = str(tmp_path / "out"), str(tmp_path / "corpus")
    shutil.copytree(tiny_corpus, corpus)
    rc, _, _ = run_main(["--input", corpus, "--output", out, *TINY, "--quiet"], capsys)
    assert rc == 0
    hashes = shard_hashes(out)
    write_tiny_corpus(corpus, n_scenes=4, n_frames=24)  # one scene more than the plan was made from
    rc, so, se = run_main(["--input", corpus, "--output", out, *TINY], capsys)
    err = se.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "3 scenes; the corpus now lists 4 (1 added, 0 removed: +scene_0003)" \
        in err[0] and "--overwrite" in err[0], se
    assert shard_hashes(out) == hashes  # nothing was touched

    shutil.rmtree(os.path.join(corpus, "scene_0003"))
    with open(os.path.join(out, "plan.json")) as f:
        plan = json.load(f)
    plan["inputs"]["reader"] = "synthetic/0"  # a plan of an older reader of this layout
    with open(os.path.join(out, "plan.json"), "w") as f:
        json.dump(plan, f)
    rc, _, se = run_main(["--input", corpus, "--output", out, *TINY], capsys)
    assert rc == 2 and "read by reader synthetic/0, this job reads with synthetic/1" in se, se

    write_tiny_corpus(corpus, n_scenes=4, n_frames=24)
    rc, so, _ = run_main(["--input", corpus, "--output", out, *TINY, "--overwrite", "--quiet"], capsys)
    assert rc == 0 and "[overwrite]" in so
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    assert m["counts"]["scenes"] == 4 and "scene_0003" in m["scenes"]


def small_layout_job(root, fmt: str, tmp_path, shard_checks, *, max_side: int, max_gap: int) -> list[dict]:
    """The shard job on a 3-scene corpus of one layout: checked output, no flagged scene; its raw samples."""
    out = str(tmp_path / "out")
    rc, _, _ = run_main(["--input", root, "--format", fmt, "--output", out, "--clip-frames", "3",
                         "--clip-window", str(max_gap + 1), "--clips-per-scene", "2", "--samples-per-shard", "4",
                         "--max-side", str(max_side), "--val-fraction", "0.34", "--quiet"])
    assert rc == 0
    manifest, _ = verify_output(out, shard_checks)
    assert manifest["counts"]["clips"] >= 5 and manifest["counts"]["pairs"] >= 9 and manifest["flagged_scenes"] == {}
    return read_samples(sorted(glob.glob(os.path.join(out, "*.tar"))))


def test_end_to_end_scannet_layout(ray_local, tmp_path, shard_checks):
    """SensReader layout: colour 324x242 and depth 160x120 with different K, aligned on read."""
    from corpus_writers import write_scannet_scene

    root = tmp_path / "scannet"
    truths = {f"scene{i:04d}_00": write_scannet_scene(root, f"scene{i:04d}_00", seed=40 + i, n_frames=16,
                                                     color_size=(324, 242), depth_size=(160, 120))
              for i in range(3)}
    samples = small_layout_job(root, "scannet", tmp_path, shard_checks, max_side=160, max_gap=12)
    from data import shardformat

    for raw in samples:
        s = shardformat.decode_sample(raw)
        truth = truths[s.meta["scene"]]
        assert s.meta["dataset"] == "scannet"
        for k in range(s.n_frames):
            assert s.meta["sizes"][k] == [160, 120]
            np.testing.assert_allclose(s.K(k), truth.K, atol=1e-9)  # the depth camera's K
            ia = truth.names.index(s.meta["frames"][k])
            np.testing.assert_allclose(s.T_w(k), truth.cam2world[ia], atol=1e-5)
            # stored colour is aligned with the depth camera (not a plain resize of the colour image)
            err = np.abs(s.rgb[k].astype(float) - truth.rgb[ia].astype(float)).mean()
            assert err < 12, err


# ----------------------------------------------------------------------- CLI

@pytest.mark.parametrize("case", ["missing-input", "unknown-format", "output-not-writable", "window-below-frames",
                                  "missing-exclude-file"])
def test_bad_arguments_fail_in_one_line_before_ray(case, tiny_corpus, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    argv = {"missing-input": ["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")],
            "unknown-format": ["--input", tiny_corpus, "--format", "colmap", "--output", str(tmp_path / "o")],
            "output-not-writable": ["--input", tiny_corpus, "--output", str(blocker / "sub")],
            "window-below-frames": ["--input", tiny_corpus, "--output", str(tmp_path / "o"), "--clip-frames", "8",
                                    "--clip-window", "6"],
            "missing-exclude-file": ["--input", tiny_corpus, "--output", str(tmp_path / "o"), "--exclude-scenes",
                                     str(tmp_path / "none.txt")]}[case]
    code = ("import sys\nfrom pipeline import shard\ntry:\n    rc = shard.main(sys.argv[1:])\n"
            "except SystemExit as e:\n    rc = e.code\nprint('RAY_IMPORTED=%s' % ('ray' in sys.modules))\nsys.exit(rc)")
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pipeline/shard.py: error: "), p.stderr
    expect = {"missing-input": "no such file", "unknown-format": "colmap", "output-not-writable": "not writable",
              "window-below-frames": "--clip-window (6) must be >= --clip-frames (8)",
              "missing-exclude-file": "--exclude-scenes"}[case]
    assert expect in lines[0]
    assert "RAY_IMPORTED=False" in p.stdout and "[ray]" not in p.stdout, p.stdout
    assert time.time() - t0 < 30
    assert not (tmp_path / "o" / "plan.json").exists()


def test_help_lists_every_flag():
    p = subprocess.run([sys.executable, SHARD, "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0
    for flag in ("--input", "--format", "--output", "--clip-frames", "--clip-window", "--clips-per-scene",
                 "--samples-per-shard", "--max-side", "--val-fraction", "--test-fraction", "--seed", "--min-overlap",
                 "--max-overlap", "--max-corr", "--max-corr-clip", "--exclude-scenes", "--overwrite",
                 "--max-broken-fraction", "--retries", "--mlflow"):
        assert flag in p.stdout, flag
    assert "scannet" in p.stdout and "AWS_ENDPOINT_URL" in p.stdout


# ----------------------------------------------------------------------- data problems

def _break_frames(scene_dir: str) -> dict[str, str]:
    """Break 4 frames of a posed scene in 4 ways; returns {frame: expected reason}."""
    from PIL import Image

    with open(os.path.join(scene_dir, "cameras.json")) as f:
        cams = json.load(f)
    fr = cams["frames"]
    jpg = os.path.join(scene_dir, fr[3]["rgb"])  # truncated JPEG
    data = open(jpg, "rb").read()
    open(jpg, "wb").write(data[: len(data) // 2])
    os.unlink(os.path.join(scene_dir, fr[7]["depth"]))  # missing depth
    fr[11]["cam2world"][0][3] = float("-inf")  # -inf pose
    Image.fromarray(np.zeros((120, 160), dtype=np.uint16)).save(os.path.join(scene_dir, fr[15]["depth"]))
    with open(os.path.join(scene_dir, "cameras.json"), "w") as f:
        json.dump(cams, f)  # writes -Infinity, which json.load reads back
    return {fr[3]["name"]: "unreadable rgb", fr[7]["name"]: "missing depth file",
            fr[11]["name"]: "pose is not finite", fr[15]["name"]: "almost no valid depth"}


def test_broken_frames_are_skipped_counted_and_gate_the_exit_status(ray_local, tmp_path, capsys, shard_checks):
    from conftest import write_tiny_corpus

    root = write_tiny_corpus(str(tmp_path / "corpus"), n_scenes=3, n_frames=20, seed=3)
    broken = _break_frames(os.path.join(root, "scene_0000"))
    out = str(tmp_path / "out")
    argv = ["--input", root, "--output", out, *TINY, "--quiet"]
    rc, so, se = run_main(argv, capsys)
    assert rc == 0, se
    manifest, metas = verify_output(out, shard_checks)
    assert manifest["skipped_by_reason"] == {r: 1 for r in broken.values()}
    c = manifest["counts"]
    assert c["frames"] == 60 and c["frames_skipped"] == 4 and c["frames_skipped_fraction"] == round(4 / 60, 4)
    assert manifest["scenes"]["scene_0000"]["skipped"] == {r: 1 for r in broken.values()}
    used = {(m["scene"], f) for m in metas for f in m["frames"]}
    assert not used & {("scene_0000", f) for f in broken}, "no clip uses a broken frame"
    for reason in broken.values():  # the final table names each reason
        assert f"skipped: {reason}" in so

    # the other side of the gate: 4/60 = 6.7% broken > 5% allowed -> exit 1, in one line
    rc, so, se = run_main(argv + ["--max-broken-fraction", "0.05"], capsys)
    assert rc == 1
    lines = se.strip().splitlines()
    assert len(lines) == 1 and "6.7% of all frames are broken" in lines[0]
    assert "--max-broken-fraction 0.05" in lines[0]


def test_wrong_pose_convention_is_flagged(ray_local, tmp_path):
    """world-to-camera stored as cam2world, and OpenGL axes in the posed layout, are flagged."""
    from conftest import write_tiny_corpus
    from data import geometry

    root = write_tiny_corpus(str(tmp_path / "corpus"), n_scenes=3, n_frames=20, seed=5)
    for name, convert in (("scene_0001", geometry.invert_pose), ("scene_0002", geometry.gl_to_cv)):
        path = os.path.join(root, name, "cameras.json")
        with open(path) as f:
            cams = json.load(f)
        for fr in cams["frames"]:
            fr["cam2world"] = convert(np.asarray(fr["cam2world"])).tolist()
        with open(path, "w") as f:
            json.dump(cams, f)
    out = str(tmp_path / "out")
    rc, _, _ = run_main(["--input", root, "--output", out, *TINY, "--clips-per-scene", "4", "--quiet"])
    assert rc == 0
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    assert set(m["flagged_scenes"]) == {"scene_0001", "scene_0002"}, m["flagged_scenes"]
    assert "wrong pose convention" in m["flagged_scenes"]["scene_0001"]
    assert "flag" not in m["scenes"]["scene_0000"] and m["scenes"]["scene_0000"]["reference_yield"] > 0.5
    assert m["counts"]["scenes_flagged"] == 2


def test_end_to_end_nerfstudio_with_lens_distortion(ray_local, tmp_path, shard_checks):
    """DL3DV-like scenes (OPENCV camera, non-zero k1, k2, p1, p2): shards hold the undistorted views."""
    from corpus_writers import write_nerfstudio_scene

    root = tmp_path / "dl3dv"
    lens = (-0.12, 0.02, 0.0, 0.0, 0.001, -0.0015)
    truths = {f"scene_{i}": write_nerfstudio_scene(root, f"scene_{i}", seed=60 + i, n_frames=12, size=(192, 144),
                                                   applied_transform=False, dist=lens)
              for i in range(3)}
    samples = small_layout_job(root, "nerfstudio", tmp_path, shard_checks, max_side=192, max_gap=8)
    from data import shardformat

    for raw in samples:
        s = shardformat.decode_sample(raw)
        truth = truths[s.meta["scene"]]
        for k in range(s.n_frames):
            ia = truth.names.index(s.meta["frames"][k])
            # the stored view is the pinhole view of K (JPEG and bilinear resampling aside)
            err = np.abs(s.rgb[k].astype(float) - truth.rgb[ia].astype(float)).mean()
            assert err < 6, err  # ~3.3 here; ~16 when the lens is ignored (test_readers)


def test_narrow_overlap_window_is_not_read_as_a_broken_scene(tmp_path):
    """The pose-convention check measures the yield against the default window: a user's narrow
    --min/--max-overlap lowers the pair yield of a correct scene without flagging it, and a wrong
    convention is still flagged under that window."""
    from conftest import write_tiny_corpus
    from data import geometry
    from data.pairs import ClipConfig
    from pipeline import stages

    root = write_tiny_corpus(str(tmp_path / "corpus"), n_scenes=2, n_frames=20, seed=5)
    path = os.path.join(root, "scene_0001", "cameras.json")
    with open(path) as f:
        cams = json.load(f)
    for fr in cams["frames"]:
        fr["cam2world"] = geometry.invert_pose(np.asarray(fr["cam2world"])).tolist()
    with open(path, "w") as f:
        json.dump(cams, f)
    narrow = ClipConfig(clip_frames=4, clip_window=16, clips_per_scene=4, min_overlap=0.55, max_overlap=0.6)
    cfg = stages.JobConfig(input=root, format="synthetic", output="", clips=narrow)
    good = stages.scan_scene(os.path.join(root, "scene_0000"), cfg)
    bad = stages.scan_scene(os.path.join(root, "scene_0001"), cfg)
    assert good["tested"] >= stages.MIN_TESTED_FOR_YIELD and good["yield"] < stages.MIN_PAIR_YIELD  # the old flag
    assert good["reference_yield"] > 0.5 and stages.scene_verdict(good, None) is None
    assert "wrong pose convention" in stages.scene_verdict(bad, None)
    wide = stages.scan_scene(os.path.join(root, "scene_0000"),
                             stages.JobConfig(input=root, format="synthetic", output="",
                                              clips=ClipConfig(clip_frames=4, clip_window=16, clips_per_scene=4)))
    # co-visible candidates are all the accepted ones and the near-duplicates the window refused
    assert wide["reference_yield"] >= wide["yield"] and wide["reference_yield"] > 0.5


def test_failed_shard_is_retried_reported_and_finished_by_a_rerun(ray_local, tmp_path, capsys):
    """A shard task that returns an error status is resubmitted (--retries), then reported: exit 1,
    `failed_shards` in an incomplete manifest; a rerun writes just that shard."""
    from conftest import write_tiny_corpus

    root = write_tiny_corpus(str(tmp_path / "corpus"), n_scenes=2, n_frames=12, seed=9)
    out = str(tmp_path / "out")
    argv = ["--input", root, "--output", out, *TINY, "--val-fraction", "0", "--retries", "1"]
    assert run_main(argv + ["--quiet"], capsys)[0] == 0
    with open(os.path.join(out, "plan.json")) as f:
        plan = json.load(f)
    victim = plan["shards"][0]
    scenes = {it["scene"] for it in victim["clips"]}
    os.unlink(os.path.join(out, victim["name"]))
    os.unlink(os.path.join(out, victim["name"].replace(".tar", ".stats.json")))
    saved = {}
    for sc in scenes:  # the scenes broke under the plan (same scene list): the shard cannot be written
        path = os.path.join(root, sc, "cameras.json")
        saved[path] = open(path).read()
        with open(path, "w") as f:
            f.write("{not json")
    rc, so, se = run_main(argv, capsys)
    assert rc == 1
    assert so.count(f"[retry] {victim['name']}") == 1  # resubmitted once (--retries 1)
    assert f"shard {victim['name']} failed after 1 retries" in se and len(se.strip().splitlines()) == 1, se
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    assert not m["complete"] and m["failed_shards"] == [victim["name"]]
    assert m["counts"]["shards"] == m["counts"]["shards_planned"] - 1 and m["counts"]["shards_failed"] == 1
    for path, text in saved.items():
        with open(path, "w") as f:
            f.write(text)
    rc, so, _ = run_main(argv + ["--quiet"], capsys)
    assert rc == 0 and "writing 1" in so
    with open(os.path.join(out, victim["name"].replace(".tar", ".stats.json"))) as f:
        assert json.load(f)["scenes_opened"] == len(scenes)  # plan reused: no shells, scenes opened
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f)["complete"]


# ----------------------------------------------------------------------- tracking

def test_mlflow_records_params_counts_and_manifest(reference, tiny_corpus, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    src, _ = reference
    out = str(tmp_path / "out")
    shutil.copytree(src, out)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    rc, so, _ = run_main(["--input", tiny_corpus, "--output", out, *TINY, "--quiet", "--mlflow",
                          "--experiment", "shard-test"], capsys)
    assert rc == 0 and "[mlflow] run" in so
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("shard-test")
    (run,) = client.search_runs([exp.experiment_id])
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    p, metrics = run.data.params, run.data.metrics
    assert p["clips_per_scene"] == "3" and p["input"] == tiny_corpus and p["content_hash"] == manifest["content_hash"]
    assert metrics["clips"] == manifest["counts"]["clips"] >= 7 and metrics["shards"] == manifest["counts"]["shards"]
    assert metrics["pairs"] == manifest["counts"]["pairs"]
    assert metrics["frames"] == 72 and metrics["scenes_flagged"] == 0
    assert run.data.tags["kind"] == "shard"
    local = client.download_artifacts(run.info.run_id, "manifest.json", str(tmp_path))
    with open(local) as f:
        assert json.load(f) == manifest


# ----------------------------------------------------------------------- golden shards

GOLDEN_VALUES = [  # (frame_a, frame_b, gap, n_corr, overlap_ab, first corr row) of the version-1 shard
    ("000001", "000002", 1, 200, 0.95, [6.0, 7.0, 7.822380542755127, 6.496987819671631]),
    ("000000", "000006", 6, 200, 0.7833, [17.0, 7.0, 28.05475425720215, 3.597590208053589]),
]
GOLDEN_V2 = os.path.join(ROOT, "tests", "golden", "v2", "train-000000.tar")
GOLDEN_V2_VALUES = [  # (frames, indices, n_corr per pair, first corr row) of the version-2 clip shard
    (["000000", "000002", "000003"], [0, 2, 3], [120, 120, 120],
     [0.0, 1.0, 13.0, 5.0, 16.096832275390625, 3.221792697906494]),
    (["000004", "000007", "000011"], [4, 7, 11], [120, 120, 120],
     [0.0, 1.0, 5.0, 7.0, 6.148468494415283, 1.7526042461395264]),
]


def test_golden_v1_shard_still_reads(shard_checks):
    """The last committed version-1 (pair) shard: members, dtypes, shapes, exact values, and its reading
    as a clip of two frames. A reader change that cannot read it (or reads it differently) fails here."""
    from PIL import Image

    from data import shardformat

    assert os.path.getsize(GOLDEN) < 300_000
    with open(GOLDEN, "rb") as f:
        names = shard_checks.tar(f)
    assert names[:6] == ["000000_00000." + m for m in ("a.depth.png", "a.jpg", "b.depth.png", "b.jpg", "corr.npy",
                                                       "json")]
    samples = read_samples([GOLDEN])
    assert [s["__key__"] for s in samples] == ["000000_00000", "000000_00001"]
    for raw, (fa, fb, gap, n, ov, row) in zip(samples, GOLDEN_VALUES):
        s = shard_checks.pair(raw)
        m = s.meta
        assert (m["version"], m["dataset"], m["scene"], m["source"]) == (1, "synthetic", "golden_scene",
                                                                         "corpus/golden_scene")
        assert (m["frame_a"], m["frame_b"], m["gap"], m["n_corr"], m["overlap_ab"]) == (fa, fb, gap, n, ov)
        assert m["depth_scale"] == 1000.0 and m["metric_depth"] is True
        assert m["size_a"] == m["size_b"] == [160, 120]
        assert m["K_a"][0] == [114.25184053936917, 0.0, 79.5] and m["K_a"][1][2] == 59.5
        assert s.corr[0].tolist() == row and s.corr.shape == (n, 4)
        assert s.rgb_a.shape == (120, 160, 3) and s.depth_a.dtype == np.float32
        raw_depth = np.asarray(Image.open(io.BytesIO(raw["a.depth.png"])))
        assert raw_depth.dtype == np.uint16 and raw_depth.shape == (120, 160)
        assert m["photo_err"] < 0.3 * m["photo_err_shuffled"]
        clip = shardformat.decode_sample(raw)  # the same pair, read as a clip of K = 2
        assert clip.version == 1 and clip.n_frames == 2 and clip.meta["frames"] == [fa, fb]
        assert clip.index(1) - clip.index(0) == gap and np.array_equal(clip.pair_corr(0, 1), s.corr)
        assert np.array_equal(clip.depth[1], s.depth_b) and np.allclose(clip.K(0), s.K_a)
    with pytest.raises(shardformat.FormatError, match="version 3 is not supported"):
        bad = dict(samples[0])
        bad["json"] = bad["json"].replace(b'"version":1', b'"version":3')
        shardformat.decode_sample(bad)


def test_golden_v2_clip_shard_reads_back(shard_checks):
    """The committed version-2 (clip) shard: members, dtypes, shapes and exact values."""
    with open(GOLDEN_V2, "rb") as f:
        names = shard_checks.tar(f)
    assert names[:10] == ["000000_00000." + m for m in ("corr.npy", "f00.depth.png", "f00.jpg", "f01.depth.png",
                                                        "f01.jpg", "f02.depth.png", "f02.jpg", "json")] + [
        "000000_00001.corr.npy", "000000_00001.f00.depth.png"]
    samples = read_samples([GOLDEN_V2])
    for raw, (frames, indices, n_corr, row) in zip(samples, GOLDEN_V2_VALUES):
        s = shard_checks.sample(raw)
        m = s.meta
        assert (m["version"], m["kind"], m["scene"], m["source"]) == (2, "clip", "golden_scene", "corpus/golden_scene")
        assert (m["frames"], m["indices"], m["n_corr"]) == (frames, indices, n_corr)
        assert m["sizes"] == [[160, 120]] * len(frames) and m["depth_scale"] == 1000.0
        assert s.corr[0].tolist() == row and s.corr.shape == (sum(n_corr), 6)
        assert all(e < 0.3 * sh for e, sh in zip(m["photo_err"], m["photo_err_shuffled"]))


def test_golden_v2_shard_regenerates_byte_identical(tmp_path):
    """make_golden.py with the current code gives the committed version-2 bytes: a writer change shows up
    here. If the change is intended, run `python tests/golden/make_golden.py` (and bump the format version
    when the format itself changed)."""
    sys.path.insert(0, os.path.dirname(GOLDEN))
    try:
        import make_golden
    finally:
        sys.path.pop(0)
    path = make_golden.build(str(tmp_path))
    with open(path, "rb") as a, open(GOLDEN_V2, "rb") as b:
        assert a.read() == b.read(), ("the shard writer's bytes changed; see this test's docstring")


# ----------------------------------------------------------------------- failures (slow)

@pytest.mark.slow
def test_worker_killed_mid_job_still_completes(reference, tiny_corpus, tmp_path):
    """SIGKILL a Ray worker while it runs a write task: Ray retries it; the manifest is full and
    every shard is byte-identical to the uninterrupted run."""
    _, hashes = reference
    out, log = str(tmp_path / "out"), str(tmp_path / "job.log")
    proc = start_job(["--input", tiny_corpus, "--output", out, *TINY, "--num-cpus", "2"],
                     {TEST_DELAY_ENV: "0.6"}, log)
    try:
        def running_writer():
            for p in session_procs(proc.pid):
                try:
                    if p.cmdline()[:1] == ["ray::write_shard"]:
                        return p
                except psutil.Error:
                    pass
            return None

        victim = wait_for(running_writer, 120, "a worker running write_shard", proc, log)
        time.sleep(0.3)  # inside the task (each clip sleeps 0.6 s)
        assert victim.cmdline()[:1] == ["ray::write_shard"]
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        assert not victim.is_running()
        rc = proc.wait(180)
        text = open(log).read()
        assert rc == 0, text[-3000:]
        assert "worker died or was killed while executing a task" in text  # Ray saw it and retried
    finally:
        kill_session(proc.pid)
    assert not session_procs(proc.pid)
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    assert m["complete"] and m["counts"]["clips"] >= 7 and m["failed_shards"] == []
    assert shard_hashes(out) == hashes
    assert not glob.glob(os.path.join(out, ".*.part"))


@pytest.mark.slow
def test_job_killed_then_rerun_writes_only_missing_shards(reference, tiny_corpus, tmp_path, capsys):
    _, hashes = reference
    out, log = str(tmp_path / "out"), str(tmp_path / "job.log")
    proc = start_job(["--input", tiny_corpus, "--output", out, *TINY, "--num-cpus", "2"],
                     {TEST_DELAY_ENV: "0.5"}, log)
    try:
        wait_for(lambda: len(glob.glob(os.path.join(out, "*.stats.json"))) >= 2, 120, "two finished shards", proc, log)
        os.kill(proc.pid, signal.SIGKILL)  # the driver, then everything it started
    finally:
        kill_session(proc.pid)
    proc.wait(10)
    assert not session_procs(proc.pid)
    done = {os.path.basename(p)[: -len(".stats.json")] + ".tar" for p in glob.glob(os.path.join(out, "*.stats.json"))}
    assert 2 <= len(done) < len(hashes), done
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    for name in os.listdir(out):  # nothing is visible under a final name unless whole
        if name.endswith(".tar"):
            assert name in done or sha256(os.path.join(out, name)) == hashes[name]
    before = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in done}

    rc, so, _ = run_main(["--input", tiny_corpus, "--output", out, *TINY], capsys)
    assert rc == 0
    assert f"{len(done)} of {len(hashes)} shards already done; writing {len(hashes) - len(done)}" in so
    assert {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in done} == before
    assert shard_hashes(out) == hashes
    assert not glob.glob(os.path.join(out, ".*.part"))


def _distinct_free_ports(names) -> dict[str, int]:
    """Free loopback ports, all different (each socket stays bound until all are chosen)."""
    import socket

    socks = []
    try:
        for _ in names:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return {n: s.getsockname()[1] for n, s in zip(names, socks)}
    finally:
        for s in socks:
            s.close()


def _listening_ips(pids: list[int]) -> set[str]:
    ips = set()
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            ips.add(c.laddr.ip)
    return ips


@pytest.mark.slow
def test_ray_job_submit_to_a_real_cluster(tiny_corpus, tmp_path, shard_checks):
    """`ray start --head` on 127.0.0.1 + `ray job submit --working-dir .`; stopped by its PIDs."""
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    ports = _distinct_free_ports(("gcs", "dash", "client", "agent_http", "agent_grpc", "metrics", "runtime_env",
                                  "autoscaler_metrics", "dash_metrics"))
    temp = tempfile.mkdtemp(prefix="gr", dir="/tmp")  # short: Ray's unix socket paths must stay < 108 chars
    import secrets

    # token auth, explicitly and with a token of this test only (else Ray's default depends on
    # whether ~/.ray/auth_token exists and on RAY_AUTH_MODE left behind by an earlier ray.init)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "AUTOSCALER_METRIC_PORT": str(ports["autoscaler_metrics"]),
           "DASHBOARD_METRIC_PORT": str(ports["dash_metrics"]),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(ports["gcs"]),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(ports["dash"]), "--num-cpus", "2",
         "--ray-client-server-port", str(ports["client"]), "--dashboard-agent-listen-port", str(ports["agent_http"]),
         "--dashboard-agent-grpc-port", str(ports["agent_grpc"]), "--metrics-export-port", str(ports["metrics"]),
         "--runtime-env-agent-port", str(ports["runtime_env"]), "--temp-dir", temp, "--disable-usage-stats"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    sid = head.pid
    try:
        start_out = head.communicate(timeout=120)[0].decode(errors="replace")
        assert head.returncode == 0, start_out[-3000:]
        cluster = session_procs(sid)
        assert any("raylet" in " ".join(p.cmdline()) for p in cluster)
        ips = _listening_ips([p.pid for p in cluster])
        assert ips and ips <= {"127.0.0.1", "::ffff:127.0.0.1"}, ips
        out = str(tmp_path / "out")
        sub = subprocess.run(
            [ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{ports['dash']}", "--working-dir", ".",
             "--", sys.executable, "pipeline/shard.py", "--input", tiny_corpus, "--output", out, *TINY],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, start_new_session=False)
        text = sub.stdout + sub.stderr
        assert sub.returncode == 0, text[-4000:]
        assert "succeeded" in text and "ray job at" in text and "shard job summary" in text
        # a plain driver outside the repo joining through RAY_ADDRESS ships data/ and pipeline/ to the workers
        out2 = str(tmp_path / "out2")
        drv = subprocess.run([sys.executable, SHARD, "--input", tiny_corpus, "--output", out2, *TINY, "--quiet"],
                             cwd=tmp_path, env={**env, "RAY_ADDRESS": f"127.0.0.1:{ports['gcs']}"},
                             capture_output=True, text=True, timeout=300)
        assert drv.returncode == 0, (drv.stdout[-2000:], drv.stderr[-2000:])
        assert "[ray] cluster at 127.0.0.1" in drv.stdout
        ips = _listening_ips([p.pid for p in session_procs(sid)])
        assert ips <= {"127.0.0.1", "::ffff:127.0.0.1"}, ips
    finally:
        kill_session(sid)
        shutil.rmtree(temp, ignore_errors=True)
    assert not session_procs(sid), "processes of the test's cluster are still running"
    manifest, _ = verify_output(out, shard_checks)
    assert manifest["counts"]["clips"] >= 7
    assert shard_hashes(out) == shard_hashes(out2)  # same bytes however the job reached the cluster


@pytest.mark.slow
def test_embedded_default_without_arguments(tmp_path):
    """No arguments: a synthetic corpus under ./runs/synthetic, in-process Ray, shards under ./runs/shards."""
    p = subprocess.run([sys.executable, SHARD], cwd=tmp_path, capture_output=True, text=True, timeout=400,
                       start_new_session=True)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    with open(tmp_path / "runs" / "shards" / "manifest.json") as f:
        m = json.load(f)
    assert m["complete"] and m["counts"]["scenes"] == 8 and m["counts"]["clips"] >= 40 and m["counts"]["pairs"] > 500
    assert "[ray] local Ray in this process" in p.stdout and "shard job summary" in p.stdout
    assert "[scan]" in p.stdout and "[write]" in p.stdout and "ETA" in p.stdout  # progress per stage


def test_embedded_corpus_of_other_synthetic_settings_renders_apart_and_is_never_silently_reused(tmp_path):
    """--synthetic-motion / --synthetic-hfov / --synthetic-objects render into a corpus folder of their own
    (with object ids stored in the clips); a folder rendered with other settings is refused in one line."""
    flags = ["--synthetic-scenes", "2", "--synthetic-frames", "12", "--synthetic-motion", "scan,orbit", "--synthetic-hfov",
             "50", "--synthetic-objects", "--clip-frames", "3", "--clip-window", "8", "--clips-per-scene", "2",
             "--max-side", "160", "--val-fraction", "0", "--num-cpus", "2", "--quiet"]
    p = subprocess.run([sys.executable, SHARD, *flags], cwd=tmp_path, capture_output=True, text=True, timeout=400,
                       start_new_session=True)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    root = tmp_path / "runs" / "synthetic_scan+orbit_fov50_objects"
    cams = json.loads((root / "scene_0000" / "cameras.json").read_text())
    assert cams["synthetic"]["motion"] == "scan" and cams["synthetic"]["hfov"] == 50.0 and "object_groups" in cams
    assert json.loads((root / "scene_0001" / "cameras.json").read_text())["synthetic"]["motion"] == "orbit"
    assert not (tmp_path / "runs" / "synthetic").exists()
    from data.shardformat import decode_sample
    from data.stream import tar_samples

    url = sorted(glob.glob(str(tmp_path / "runs" / "shards" / "train-*.tar")))[0]
    clip = decode_sample(next(iter(tar_samples(url, lambda reason, msg: pytest.fail(msg)))))
    assert clip.meta["objects"] is True and clip.objects is not None
    bad = [("--synthetic-frames", "14")]
    for flag, value in bad:
        again = [*flags]
        again[again.index(flag) + 1] = value
        p = subprocess.run([sys.executable, SHARD, *again, "--output", str(tmp_path / "other")], cwd=tmp_path,
                           capture_output=True, text=True, timeout=200, start_new_session=True)
        assert p.returncode == 2 and "was rendered with frames 12 (asked 14)" in p.stderr, p.stderr[-2000:]
        assert len(p.stderr.strip().splitlines()) == 1
    p = subprocess.run([sys.executable, SHARD, "--input", str(root), "--synthetic-motion", "sweep", "--output",
                        str(tmp_path / "x"), *flags[flags.index("--clip-frames"):]], cwd=tmp_path,
                       capture_output=True, text=True, timeout=200, start_new_session=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "--synthetic-motion apply to the embedded synthetic corpus only" in p.stderr, p.stderr[-2000:]
    p = subprocess.run([sys.executable, SHARD, "--synthetic-motion", "scan,spin"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=200)
    assert p.returncode == 2 and "--synthetic-motion: unknown spin" in p.stderr, p.stderr[-2000:]
