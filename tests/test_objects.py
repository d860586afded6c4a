"""Per-pixel object ids of synthetic scenes (`objects=True`), carried through the shard job as the
optional `fKK.objects.png` members of a clip (DESIGN §4.1 extension for synthetic data)."""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest

from data import shardformat, synthetic
from data.pairs import ClipConfig
from data.scenes import list_scenes, open_scene
from data.stream import tar_samples
from pipeline import stages


def _shard(corpus: str, out: str, max_side: int, before_write=None) -> tuple[list, list]:
    cfg = stages.JobConfig(input=corpus, format="synthetic", output=out,
                           clips=ClipConfig(clip_frames=3, clip_window=8, clips_per_scene=2, max_overlap=1.0),
                           samples_per_shard=8, max_side=max_side, val_fraction=0.0)
    os.makedirs(out, exist_ok=True)
    scans = [stages.scan_scene(u, cfg) for u in list_scenes(corpus, "synthetic")]
    plan = stages.make_plan(scans, cfg)
    if before_write is not None:
        before_write(plan)
    stats = [stages.write_shard(entry, cfg) for entry in plan["shards"]]
    assert all(st["ok"] for st in stats), stats
    clips = []
    for url in sorted(glob.glob(os.path.join(out, "*.tar"))):
        clips += [shardformat.decode_sample(r) for r in tar_samples(url, lambda reason, msg: pytest.fail(msg))]
    return clips, stats


def test_object_ids_are_the_ray_cast_primitive_of_each_pixel(tmp_path):
    path = synthetic.write_scene(tmp_path, "room", seed=5, n_frames=2, width=64, height=48, objects=True)
    cams = json.loads(open(os.path.join(path, "cameras.json")).read())
    room = synthetic.room_for_scene(cams)
    assert cams["object_groups"] == synthetic.object_groups(room) and len(cams["object_groups"]) >= 2
    for fr in cams["frames"]:
        ids = shardformat.decode_objects_png(open(os.path.join(path, fr["objects"]), "rb").read())
        K, T = np.array(fr["K"]), np.array(fr["cam2world"])
        _, prim = synthetic.raycast(room, T[:3, 3], synthetic.pixel_rays(K, 64, 48) @ T[:3, :3].T)
        assert ids.dtype == np.uint16 and ids.shape == (48, 64)
        assert np.array_equal(ids.ravel(), np.where(prim >= 0, prim + 1, 0))
        depth = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(os.path.join(path, fr["depth"])))
        assert np.array_equal(ids > 0, depth > 0)  # an object exactly where there is depth
    plain = synthetic.write_scene(tmp_path, "plain", seed=5, n_frames=2, width=64, height=48)
    plain_cams = json.loads(open(os.path.join(plain, "cameras.json")).read())
    assert "object_groups" not in plain_cams and not os.path.exists(os.path.join(plain, "objects"))
    assert [f["cam2world"] for f in plain_cams["frames"]] == [f["cam2world"] for f in cams["frames"]]


@pytest.mark.parametrize("max_side", [96, 64])
def test_clips_carry_the_object_ids_of_their_frames_at_the_stored_size(tmp_path, max_side):
    """Stored at the render size (96) and shrunk (64: ids resized nearest-exact, as depth), each clip's
    objects member equals the scene's ids of that frame, and the json names the look-alike groups."""
    corpus = str(tmp_path / "corpus")
    synthetic.write_scene(corpus, "room", seed=3, n_frames=8, width=96, height=72, objects=True, step=0.1)
    clips, _ = _shard(corpus, str(tmp_path / "out"), max_side)
    assert clips
    scene = open_scene(os.path.join(corpus, "room"), "synthetic")
    by_name = {f.name: f for f in scene.frames}
    for clip in clips:
        assert clip.meta["objects"] is True and clip.meta["object_groups"] == scene.object_groups
        assert clip.objects is not None and len(clip.objects) == clip.n_frames
        for k, name in enumerate(clip.meta["frames"]):
            rgb, depth = scene.load(by_name[name])
            ids = scene.load_objects(by_name[name], rgb.shape[:2])
            W, H = clip.size(k)
            if (W, H) != (96, 72):
                from data import geometry
                ids = geometry.resize_depth_nearest(ids, (W, H))
            assert clip.objects[k].dtype == np.uint16 and np.array_equal(clip.objects[k], ids)
            assert np.array_equal(clip.objects[k] > 0, clip.depth[k] > 0)


def test_scenes_without_ids_write_no_objects_member(tmp_path):
    corpus = str(tmp_path / "corpus")
    synthetic.write_scene(corpus, "room", seed=3, n_frames=8, width=96, height=72, step=0.1)
    clips, _ = _shard(corpus, str(tmp_path / "out"), 96)
    assert clips and all(c.objects is None and "objects" not in c.meta for c in clips)
    with pytest.raises(ValueError, match="disagree"):
        shardformat.make_clip_sample("k", clips[0].rgb, clips[0].depth, clips[0].corr, clips[0].meta,
                                     objects=[b"x"] * clips[0].n_frames)


def test_a_broken_objects_file_skips_its_clips_and_counts_them(tmp_path):
    corpus = str(tmp_path / "corpus")
    path = synthetic.write_scene(corpus, "room", seed=3, n_frames=12, width=96, height=72, objects=True, step=0.1)
    broken = []

    def break_one(plan):  # the scan reads depth only: a broken objects file shows when the clip is written
        index = plan["shards"][0]["clips"][0]["indices"][0]
        broken.append(index)
        with open(os.path.join(path, "objects", f"{index:06d}.png"), "wb") as f:
            f.write(b"not a png")

    clips, stats = _shard(corpus, str(tmp_path / "out"), 96, break_one)
    assert sum(st["skipped_clips"].get("unreadable objects", 0) for st in stats) >= 1
    assert all(broken[0] not in c.meta["indices"] for c in clips)


def test_a_sample_whose_objects_member_is_missing_or_misaligned_is_refused(tmp_path):
    corpus = str(tmp_path / "corpus")
    synthetic.write_scene(corpus, "room", seed=3, n_frames=8, width=96, height=72, objects=True, step=0.1)
    _shard(corpus, str(tmp_path / "out"), 96)
    url = sorted(glob.glob(os.path.join(tmp_path, "out", "*.tar")))[0]
    raw = next(iter(tar_samples(url, lambda reason, msg: pytest.fail(msg))))
    missing = {k: v for k, v in raw.items() if k != "f01.objects.png"}
    with pytest.raises(shardformat.FormatError, match="missing member.*f01.objects.png"):
        shardformat.decode_sample(missing)
    small = dict(raw)
    small["f00.objects.png"] = shardformat.encode_objects_png(np.zeros((10, 10), np.uint16))
    with pytest.raises(shardformat.FormatError, match="object ids and rgb sizes differ"):
        shardformat.decode_sample(small)


# ------------------------------------------------------------------ the look-alike subset

def test_cell_objects_is_the_most_frequent_id_of_each_cell():
    from data.adapter import CellGrid
    from data.labels import _axis_cells, cell_objects

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 5, (50, 70)).astype(np.uint16)
    ids[:20, :30] = 3  # a block where one id wins
    grid = CellGrid(size=(84, 56), cell_px=14, rows=4, cols=6)
    got = cell_objects(ids, grid)
    cols, rows = _axis_cells(70, 84, 14, 6), _axis_cells(50, 56, 14, 4)
    for c in range(grid.n_cells):
        pix = ids[np.ix_(rows == c // 6, cols == c % 6)].ravel()
        counts = np.bincount(pix, minlength=5)
        assert got[c] == int(np.argmax(counts)), c  # ties: the smaller id
    assert got[0] == 3


def test_lookalike_anchors_need_a_look_alike_of_their_object_at_another_depth():
    from data.labels import lookalike_anchors

    objects_a = np.array([1, 2, 5, 1])  # anchors' cells of A show objects 1, 2, 5, 1
    objects_b = np.array([4, 4, 2, 7])  # B shows 4 (look-alike of 1), 2 (itself), 7
    depth_b = np.array([3.0, 3.1, 2.0, 1.0], np.float32)
    valid_b = np.array([True, True, True, True])
    groups = [[1, 4], [2, 6]]
    anchor_a = np.array([0, 1, 2, 3])
    z = np.array([1.0, 2.0, 1.0, 0.0], np.float32)  # the last anchor has no depth
    assert lookalike_anchors(objects_a, objects_b, depth_b, valid_b, anchor_a, z, groups).tolist() == \
        [True, False, False, False]  # 2's look-alike 6 is not in B; 5 has none; no z: never
    near = np.array([1.0, 1.05, 2.0, 1.0], np.float32)  # the look-alike at (almost) the anchor's depth
    assert not lookalike_anchors(objects_a, objects_b, near, valid_b, anchor_a, z, groups)[0]
    hidden = np.array([False, False, True, True])  # its cells have no valid depth
    assert not lookalike_anchors(objects_a, objects_b, depth_b, hidden, anchor_a, z, groups)[0]


def _brute_lookalike(clip, grid, p) -> list[bool]:
    """The look-alike flag of each anchor of pair p by loops over cells (module docstring of data.labels)."""
    from data.labels import LOOKALIKE_REL_DEPTH, _axis_cells, cell_depth

    def mode(ids, c):
        W, H = clip.size(0)
        cols, rows = _axis_cells(W, grid.size[0], grid.cell_px, grid.cols), \
            _axis_cells(H, grid.size[1], grid.cell_px, grid.rows)
        pix = ids[np.ix_(rows == c // grid.cols, cols == c % grid.cols)].ravel()
        return int(np.argmax(np.bincount(pix)))

    D, valid = cell_depth(clip.depth[p.j], grid)
    out = []
    for a, z in zip(p.anchor_a.tolist(), p.z_b.tolist()):
        own = mode(clip.objects[p.i], a)
        others = {o for g in clip.meta["object_groups"] if own in g for o in g if o != own}
        hit = False
        for c in range(grid.n_cells):
            if valid[c] and mode(clip.objects[p.j], c) in others and z > 0 and \
                    abs(float(D[c]) - z) > LOOKALIKE_REL_DEPTH * z:
                hit = True
        out.append(hit)
    return out


@pytest.fixture(scope="module")
def object_shards(tmp_path_factory) -> str:
    from conftest import build_shards

    corpus = str(tmp_path_factory.mktemp("obj_corpus"))
    for i in range(2):  # rooms whose walk shows both objects of a look-alike pair together (most do not)
        synthetic.write_scene(corpus, f"scene_{i:04d}", seed=(41, 48)[i], n_frames=40, width=160, height=120,
                              objects=True, step=0.1)
    out = str(tmp_path_factory.mktemp("obj_shards"))
    build_shards(corpus, out, clip_frames=2, clip_window=16, clips_per_scene=12, samples_per_shard=4, max_side=160,
                 val_fraction=0.0)
    return out


def test_stream_batches_flag_the_look_alike_anchors(object_shards):
    from data.labels import clip_labels
    from model.loading import build_model_and_processor

    _, _, adapter = build_model_and_processor("tiny")
    clips = []
    for url in sorted(glob.glob(os.path.join(object_shards, "*.tar"))):
        clips += [shardformat.decode_sample(r) for r in tar_samples(url, lambda reason, msg: pytest.fail(msg))]
    n_alike = n = 0
    for clip in clips:
        grid = adapter.grid(clip.size(0))
        for p in clip_labels(clip, [grid] * clip.n_frames).pairs:
            assert p.lookalike is not None and p.lookalike.tolist() == _brute_lookalike(clip, grid, p)
            n_alike += int(p.lookalike.sum())
            n += p.n_anchors
    assert 0 < n_alike < n  # the subset exists and is a subset

    from data.stream import SampleStream
    stream = SampleStream([object_shards], adapter, batch_size=2, seed=0)
    batch = next(iter(stream))
    assert batch["objects_known"].all() and batch["lookalike"].shape == batch["anchor_mask"].shape
    assert not (batch["lookalike"] & ~batch["anchor_mask"]).any()


def test_probe_reports_the_look_alike_subset(object_shards, tiny_shards, tmp_path, monkeypatch):
    """Aligned features (PCK 1 everywhere) score 1 on the look-alike subset too; the table names it; shards
    without object ids report no subset."""
    from test_probe import _aligned_capture, _identity_heads, _flags, _load
    from launch.probe import main
    from model.wrapper import GaspVLM

    monkeypatch.setattr(GaspVLM, "capture", _aligned_capture)
    heads = _identity_heads(tmp_path / "eye.safetensors")
    assert main(_flags(object_shards, tmp_path / "out", "--heads", heads, "--split", "train")) == 0
    res = _load(tmp_path / "out")
    la = res["head"]["lookalike"]
    assert la["of_anchors"] == res["data"]["anchors"] and 0 < la["n_anchors"] < la["of_anchors"]
    assert la["pck2patch"] == [1.0] * len(res["head"]["layers"])
    assert res["best"]["head"]["lookalike"]["pck2patch"] == 1.0
    table = open(tmp_path / "out" / "probe_table.txt").read()
    assert "look-alike subset (head" in table
    from launch.probe_lib import format_table

    res["best"]["head"]["lookalike"]["n_anchors"] = 0  # shards with ids but no look-alike anchor: said so
    assert f"none among the {la['of_anchors']} anchors with object ids" in format_table(res)
    monkeypatch.undo()  # the real model on clips of 4 frames
    assert main(_flags(tiny_shards, tmp_path / "plain", "--no-head", "--split", "train")) == 0
    assert _load(tmp_path / "plain")["raw"]["lookalike"] is None
