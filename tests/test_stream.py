"""The streaming loader: sources, batches, bad data, resuming, ranks, s3://, golden shard."""
from __future__ import annotations

import glob
import itertools
import json
import logging
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds

from conftest import GOLDEN_SHARD, ROOT, free_port
from data import shardformat
from data.labels import clip_labels
from data.shardformat import FormatError
from data.stream import REASONS, SampleStream, decode_checked, parse_spec, tar_samples

BIN = os.path.dirname(sys.executable)


# ----------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def tiny_model():
    from model.loading import build_model_and_processor

    return build_model_and_processor("tiny")


@pytest.fixture(scope="module")
def adapter(tiny_model):
    return tiny_model[2]


@pytest.fixture(scope="module")
def raw_pool(tiny_shards) -> list[dict]:
    """18 raw clip samples (bytes): the tiny shards' clips, train then val, repeated in order to 18 (write_set
    re-keys every sample, so a repeated clip is a distinct sample of the sets the tests write)."""
    out = []
    for url in sorted(glob.glob(os.path.join(tiny_shards, "*.tar"))):
        out.extend(tar_samples(url, lambda reason, msg: pytest.fail(msg)))
    assert len(out) >= 6
    return list(itertools.islice(itertools.cycle(out), 18))


def _fail(reason, msg):
    pytest.fail(msg)


def write_set(out: str, samples: list[dict], per_shard: int, *, split: str = "train", prefix: str = "",
              manifest: bool = True, format_version: int = 2, stats: bool = True) -> list[str]:
    """Write samples as shards OUT/{split}-NNNNNN.tar (+ stats.json, manifest.json); returns the keys.

    Samples are re-keyed `{prefix}{shard:06d}_{index:05d}`; a sample may be a (sample, mutate) pair
    where mutate(dict) -> dict corrupts it.
    """
    os.makedirs(out, exist_ok=True)
    keys, entries = [], []
    for s, k in enumerate(range(0, len(samples), per_shard)):
        name = shardformat.shard_name(split, s)
        with wds.TarWriter(os.path.join(out, name), encoder=False, mtime=0) as sink:
            for i, smp in enumerate(samples[k:k + per_shard]):
                mutate = None
                if isinstance(smp, tuple):
                    smp, mutate = smp
                key = f"{prefix}{s:06d}_{i:05d}"
                d = {m: v for m, v in smp.items() if not m.startswith("__")}
                d["__key__"] = key
                if mutate:
                    d = mutate(d)
                sink.write(d)
                keys.append(key)
        n = len(samples[k:k + per_shard])
        if stats:
            with open(os.path.join(out, name[:-4] + ".stats.json"), "w") as f:
                json.dump({"name": name, "split": split, "samples": n}, f)
        entries.append({"name": name, "split": split, "samples": n})
    if manifest:
        with open(os.path.join(out, "manifest.json"), "w") as f:
            json.dump({"version": 1, "format_version": format_version, "shards": entries}, f)
    return keys


def versioned(v):
    def mutate(d):
        meta = json.loads(d["json"])
        meta["version"] = v
        d["json"] = json.dumps(meta).encode()
        return d
    return mutate


def drop(member):
    def mutate(d):
        del d[member]
        return d
    return mutate


def replace(member, data):
    def mutate(d):
        d[member] = data(d[member]) if callable(data) else data
        return d
    return mutate


def truncate_tar(path: str, sample_index: int) -> None:
    """Cut a tar in the middle of the data of the first member of sample `sample_index`."""
    with tarfile.open(path) as tf:
        members = [m for m in tf.getmembers() if m.isreg()]
    keys = sorted({m.name.split(".", 1)[0] for m in members})
    first = next(m for m in members if m.name.startswith(keys[sample_index] + "."))
    cut = first.offset_data + first.size // 2
    with open(path, "r+b") as f:
        f.truncate(cut)


def epoch_batches(stream: SampleStream, n: int | None = None) -> list[dict]:
    return list(itertools.islice(stream.forever(), n if n is not None else len(stream)))


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert [b["keys"] for b in got] == [b["keys"] for b in want]
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            if isinstance(w[k], torch.Tensor):
                assert torch.equal(g[k], w[k]), k


# ------------------------------------------------------------------ batch format

def test_batch_format_labels_and_tiny_model_forward(tiny_shards, tiny_model):
    """The clip batch (data/stream.py docstring): per-frame and per-pair tensors, labels equal to the
    per-clip computation, cell positions in frame order, and it feeds the model and the loss."""
    model, _, adapter = tiny_model
    stream = SampleStream([tiny_shards], adapter, batch_size=3, seed=1)
    n_train = stream.sets[0].n_samples
    assert len(stream) == n_train // 3 >= 1
    batches = epoch_batches(stream)
    by_key = {s["__key__"]: s for url in stream.sets[0].urls for s in tar_samples(url, _fail)}
    B = 3
    for batch in batches:
        assert len(batch["keys"]) == B and len(batch["datasets"]) == B
        F, N = batch["cell_pos"].shape
        P, M = batch["anchor_a"].shape
        spec = {"frame_clip": (torch.long, (F,)), "cell_pos": (torch.long, (F, N)), "cell_mask": (torch.bool, (F, N)),
                "grid": (torch.long, (F, 2)), "depth": (torch.float32, (F, N)), "depth_valid": (torch.bool, (F, N)),
                "pair_frames": (torch.long, (P, 2)), "pair_clip": (torch.long, (P,)), "dt": (torch.long, (P,)),
                "anchor_a": (torch.long, (P, M)), "target_b": (torch.long, (P, M)), "z_b": (torch.float32, (P, M)),
                "anchor_mask": (torch.bool, (P, M)), "n_anchors": (torch.long, (P,)), "n_frames": (torch.long, (B,))}
        for k, (dtype, shape) in spec.items():
            assert batch[k].dtype == dtype and tuple(batch[k].shape) == shape, k
        for k in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
            assert isinstance(batch[k], torch.Tensor), k
        assert (batch["anchor_mask"].sum(1) == batch["n_anchors"]).all() and batch["n_anchors"].sum() > 0
        assert batch["n_frames"].sum() == F and batch["image_grid_thw"].shape[0] == F
        first = 0
        for b, key in enumerate(batch["keys"]):
            clip, _, _ = decode_checked(by_key[key])
            K = clip.n_frames
            assert batch["n_frames"][b] == K and batch["frame_clip"][first:first + K].tolist() == [b] * K
            grids = [adapter.grid(clip.size(k)) for k in range(K)]
            lab = clip_labels(clip, grids)  # labels equal the per-clip computation
            ids = batch["input_ids"][b]
            image_pos = torch.nonzero(ids == adapter.image_token_id).squeeze(1)
            pos = torch.cat([batch["cell_pos"][first + k, :grids[k].n_cells] for k in range(K)])
            assert torch.equal(pos, image_pos)  # every image token, frame 0's first
            for k, g in enumerate(grids):
                f = first + k
                assert batch["grid"][f].tolist() == [g.rows, g.cols] and batch["cell_mask"][f].sum() == g.n_cells
                if any(p.j == k for p in lab.pairs):
                    assert torch.equal(batch["depth"][f, :g.n_cells], torch.from_numpy(lab.depth[k]))
                    assert batch["depth_valid"][f, :g.n_cells].tolist() == lab.depth_valid[k].tolist()
            rows = torch.nonzero(batch["pair_clip"] == b).squeeze(1).tolist()
            assert len(rows) == len(lab.pairs) == K * (K - 1) // 2
            for r, p in zip(rows, lab.pairs):
                n = p.n_anchors
                assert batch["pair_frames"][r].tolist() == [first + p.i, first + p.j]
                assert batch["dt"][r] == p.dt == clip.index(p.j) - clip.index(p.i)
                assert batch["anchor_a"][r, :n].tolist() == p.anchor_a.tolist()
                assert batch["target_b"][r, :n].tolist() == p.target_b.tolist()
                assert torch.equal(batch["z_b"][r, :n], torch.from_numpy(p.z_b))
                assert not batch["anchor_mask"][r, n:].any()
            first += K

    batch = batches[0]
    with torch.no_grad():
        out = model(**adapter.model_inputs(batch), output_hidden_states=True)
    assert len(out.hidden_states) == model.config.text_config.num_hidden_layers + 1
    for h in out.hidden_states:
        feats = h[batch["frame_clip"][:, None], batch["cell_pos"]]  # (F, N, D): per-frame cell features
        assert feats.shape == (*batch["cell_pos"].shape, h.shape[-1]) and torch.isfinite(feats).all()
    # the batch feeds the loss (names as losses/gasp.py reads them)
    from losses.gasp import count_items

    counts = count_items(batch)
    assert counts[0] == batch["n_anchors"].sum()


def test_batch_with_no_anchors_at_all(tiny_shards, adapter, tmp_path, raw_pool):
    empty = np.zeros((0, 6), np.float32)
    samples = [(s, replace("corr.npy", shardformat.encode_npy(empty))) for s in raw_pool[:4]]
    write_set(str(tmp_path / "s"), samples, per_shard=4)
    batch = epoch_batches(SampleStream([str(tmp_path / "s")], adapter, batch_size=2))[0]
    P = int(batch["pair_clip"].shape[0])
    assert P >= 2 and batch["anchor_a"].shape == (P, 0) and batch["z_b"].shape == (P, 0)
    assert batch["n_anchors"].tolist() == [0] * P
    assert batch["depth_valid"].any()


# ---------------------------------------------------------------------- sources

def test_every_source_form_gives_the_same_epoch(adapter, tmp_path, raw_pool):
    folder = str(tmp_path / "set")
    keys = write_set(folder, raw_pool[:12], per_shard=3)
    forms = [folder, folder + "/", os.path.join(folder, "manifest.json"),
             os.path.join(folder, "train-{000000..000003}.tar"),
             [os.path.join(folder, f"train-{i:06d}.tar") for i in range(4)]]
    epochs = []
    for form in forms:
        stream = SampleStream([form], adapter, batch_size=2, seed=3)
        assert len(stream) == 6 and stream.sets[0].n_samples == 12
        epochs.append([k for b in epoch_batches(stream) for k in b["keys"]])
    assert sorted(epochs[0]) == sorted(keys)  # one epoch reads every sample once
    assert all(e == epochs[0] for e in epochs)
    # without manifest and stats the tars are counted
    bare = str(tmp_path / "bare")
    write_set(bare, raw_pool[:5], per_shard=2, manifest=False, stats=False)
    assert SampleStream([bare], adapter, batch_size=1).sets[0].samples == [2, 2, 1]


def test_split_selects_train_or_val(tiny_shards, adapter):
    val = SampleStream([tiny_shards], adapter, batch_size=1, split="val")
    keys = [k for b in epoch_batches(val) for k in b["keys"]]
    assert len(keys) == val.sets[0].n_samples >= 2 and all("val-" in u for u in val.sets[0].urls)
    train = SampleStream([tiny_shards], adapter, batch_size=1, split="train")
    assert all("train-" in u for u in train.sets[0].urls)
    with open(os.path.join(tiny_shards, "plan.json")) as f:
        scenes = json.load(f)["scenes"]
    for stream, split in ((val, "val"), (train, "train")):  # each stream reads its split's scenes only
        seen = {json.loads(s["json"])["scene"] for u in stream.sets[0].urls for s in tar_samples(u, _fail)}
        assert seen and all(scenes[sc] == split for sc in seen)


def test_pixel_dtype_casts_in_the_workers_only(tiny_shards, adapter):
    ref = epoch_batches(SampleStream([tiny_shards], adapter, batch_size=2, seed=3))
    half = epoch_batches(SampleStream([tiny_shards], adapter, batch_size=2, seed=3, num_workers=1,
                                    pixel_dtype=torch.bfloat16))
    assert [b["keys"] for b in half] == [b["keys"] for b in ref]
    for h, r in zip(half, ref):
        assert r["pixel_values"].dtype == torch.float32 and h["pixel_values"].dtype == torch.bfloat16
        assert torch.equal(h["pixel_values"], r["pixel_values"].to(torch.bfloat16))
        for k in r:
            if isinstance(r[k], torch.Tensor) and k != "pixel_values":
                assert torch.equal(h[k], r[k]), k


class _CatInWorker(torch.utils.data.IterableDataset):
    """Yields batch_cat of two pixel-like tensors and whether it was allocated in shared memory."""

    def __iter__(self):
        from data.adapter import batch_cat

        out = batch_cat([torch.arange(12.0).reshape(3, 4), -torch.arange(8.0).reshape(2, 4)])
        yield {"out": out, "shared": out.is_shared()}


def test_batch_media_are_concatenated_into_shared_memory_inside_a_worker():
    """In a DataLoader worker the batch's media are concatenated straight into shared memory (as torch's
    default_collate does), so handing the batch to the trainer copies nothing; in the trainer's own
    process (num_workers=0) it is a plain torch.cat."""
    from data.adapter import batch_cat

    want = torch.cat([torch.arange(12.0).reshape(3, 4), -torch.arange(8.0).reshape(2, 4)])
    (got,) = list(torch.utils.data.DataLoader(_CatInWorker(), batch_size=None, num_workers=1))
    assert got["shared"] and torch.equal(got["out"], want)
    (here,) = list(_CatInWorker())
    assert not here["shared"] and torch.equal(here["out"], want)
    with pytest.raises(ValueError, match="at least one"):
        batch_cat([])


def test_seeded_shuffle_changes_per_epoch_and_seed(tiny_shards, adapter):
    def keys(seed, epochs=2):
        s = SampleStream([tiny_shards], adapter, batch_size=2, seed=seed)
        return [tuple(b["keys"]) for b in epoch_batches(s, epochs * len(s))]
    a, b = keys(0), keys(1)
    assert a == keys(0)
    assert a != b
    n = len(a) // 2
    assert a[:n] != a[n:]  # a new shard order and buffer per epoch


def test_unknown_format_version_is_refused_in_one_line(adapter, tmp_path, raw_pool):
    write_set(str(tmp_path / "m"), raw_pool[:4], per_shard=2, format_version=3)
    with pytest.raises(FormatError) as e:
        SampleStream([str(tmp_path / "m")], adapter, batch_size=1)
    assert "version 3 is not supported" in str(e.value) and "\n" not in str(e.value)
    # a set without a manifest whose samples carry an unknown version
    write_set(str(tmp_path / "s"), [(s, versioned(3)) for s in raw_pool[:4]], per_shard=2, manifest=False)
    with pytest.raises(FormatError) as e:
        SampleStream([os.path.join(str(tmp_path / "s"), "train-{000000..000001}.tar")], adapter, batch_size=1)
    assert "version 3 is not supported" in str(e.value) and "\n" not in str(e.value)


def test_missing_source_is_one_clear_error(adapter, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        SampleStream([str(tmp_path / "nope")], adapter, batch_size=1)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no train"):
        SampleStream([str(tmp_path / "empty")], adapter, batch_size=1)


def test_mixing_spec_and_weights(adapter, tmp_path, raw_pool):
    assert parse_spec("s3://bucket/shards/") == ("s3://bucket/shards/", None)
    assert parse_spec("s3://bucket/shards/:0.3") == ("s3://bucket/shards/", 0.3)
    assert parse_spec("runs/a/manifest.json:0.7") == ("runs/a/manifest.json", 0.7)
    with pytest.raises(ValueError, match="positive"):
        parse_spec("a/:-1")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_set(a, raw_pool[:8], per_shard=4, prefix="a")
    write_set(b, raw_pool[8:12], per_shard=2, prefix="b")
    with pytest.raises(ValueError, match="every shard set"):
        SampleStream([a + ":0.5", b], adapter, batch_size=2)
    plain = SampleStream([a, b], adapter, batch_size=2)
    assert plain.probs.tolist() == pytest.approx([8 / 12, 4 / 12]) and len(plain) == 6
    mixed = SampleStream([a + ":0.9", b + ":0.1"], adapter, batch_size=4, batches_per_epoch=20, seed=5)
    keys = [k for batch in epoch_batches(mixed) for k in batch["keys"]]
    share_a = sum(k.startswith("a") for k in keys) / len(keys)
    assert 0.8 <= share_a <= 0.98, share_a  # 80 draws at p = 0.9


# ------------------------------------------------------------------------ ranks

def test_ranks_read_disjoint_shares_with_equal_batch_counts(adapter, tmp_path, raw_pool):
    folder = str(tmp_path / "set")
    keys = write_set(folder, raw_pool[:16], per_shard=2)
    seen, counts = [], []
    for rank in range(2):
        s = SampleStream([folder], adapter, batch_size=2, rank=rank, world_size=2, num_workers=0, seed=9)
        got = [k for b in epoch_batches(s) for k in b["keys"]]
        seen.append(got)
        counts.append(len(got) // 2)
    assert counts == [4, 4]
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == sorted(keys)


def test_fewer_shards_than_ranks_resamples(adapter, tmp_path, raw_pool, caplog):
    folder = str(tmp_path / "one")
    write_set(folder, raw_pool[:4], per_shard=4)
    caplog.set_level(logging.WARNING, logger="data.stream")
    counts = []
    for rank in range(2):
        s = SampleStream([folder], adapter, batch_size=2, rank=rank, world_size=2)
        counts.append(len(epoch_batches(s)))
    assert counts == [1, 1]
    assert any("resamples" in r.getMessage() for r in caplog.records)


def test_uneven_shards_give_every_rank_the_same_count(adapter, tmp_path, raw_pool):
    folder = str(tmp_path / "uneven")
    write_set(folder, raw_pool[:17], per_shard=5)  # shards of 5, 5, 5, 2
    counts = []
    for rank in range(3):
        s = SampleStream([folder], adapter, batch_size=2, rank=rank, world_size=3, num_workers=0)
        assert len(s) == 17 // 6
        counts.append(len(epoch_batches(s)))
    assert counts == [2, 2, 2]


@pytest.mark.slow
def test_two_ranks_two_workers_under_the_deepspeed_launcher(tmp_path, raw_pool):
    folder = str(tmp_path / "set")
    keys = write_set(folder, raw_pool[:16], per_shard=2)  # 8 shards: 2 per (rank, worker)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "tests", "dist_stream_worker.py"), "--shards", folder, "--out", str(out),
           "--batch-size", "2", "--workers", "2", "--epochs", "2"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.load(open(out / f"rank{r}.json")) for r in range(2)]
    for epoch in range(2):
        per_rank = [[k for b in r["epochs"][epoch] for k in b] for r in ranks]
        assert [len(r["epochs"][epoch]) for r in ranks] == [4, 4]
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == sorted(keys)
    assert ranks[0]["all_counts"] == [[4, 4], [4, 4]]
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]


# --------------------------------------------------------------------- bad data

@pytest.fixture()
def bad_set(tmp_path, raw_pool) -> str:
    """16 samples in 4 shards; 6 of them bad in every way the loader must survive."""
    p = raw_pool
    half = lambda b: b[: len(b) // 3]  # noqa: E731
    samples = [p[0], (p[1], drop("corr.npy")), p[2], p[3],
               p[4], (p[5], replace("corr.npy", b"\x93NUMPY garbage")), p[6], (p[7], replace("f00.jpg", half)),
               p[8], (p[9], versioned(3)), p[10], p[11],
               p[12], p[13], p[14], p[15]]
    folder = str(tmp_path / "bad")
    write_set(folder, samples, per_shard=4)
    truncate_tar(os.path.join(folder, "train-000003.tar"), 2)  # samples 0, 1 whole; 2 cut; 3 lost
    return folder


def test_bad_samples_and_shards_are_skipped_counted_and_reported(adapter, bad_set, caplog):
    caplog.set_level(logging.WARNING, logger="data.stream")
    good = 3 + 2 + 3 + 2
    stream = SampleStream([bad_set], adapter, batch_size=2, batches_per_epoch=good // 2, warn_every=0)
    keys = [k for b in epoch_batches(stream) for k in b["keys"]]
    assert len(keys) == good and len(set(keys)) == good
    stats = stream.stats()
    assert stats == {"samples": good, "shard_unreadable": 0, "tar_truncated": 1, "missing_member": 1,
                     "unknown_version": 1, "unknown_kind": 0, "corrupt_member": 2, "bad_meta": 0, "bad_labels": 0,
                     "encode_error": 0, "bad_conversation": 0, "too_long": 0, "skipped": 5}
    warnings = [r.getMessage() for r in caplog.records if "skipped bad data" in r.getMessage()]
    assert len(warnings) == 5
    assert any("missing member(s) corr.npy" in w for w in warnings)
    assert any("tar breaks off" in w for w in warnings)
    assert any("version 3 is not supported" in w for w in warnings)
    # rate limit: one warning in a long window, with the count so far
    caplog.clear()
    stream = SampleStream([bad_set], adapter, batch_size=2, warn_every=3600)
    batches = epoch_batches(stream)  # default length: 16 // 2 = 8 batches, a second pass fills the epoch
    assert len(batches) == 8
    warnings = [r.getMessage() for r in caplog.records if "skipped bad data" in r.getMessage()]
    assert len(warnings) == 1 and "1 skipped so far" in warnings[0]
    assert stream.stats()["skipped"] >= 5


def test_all_bad_stops_with_an_error_instead_of_spinning(adapter, tmp_path, raw_pool):
    folder = str(tmp_path / "allbad")
    write_set(folder, [(s, drop("json")) for s in raw_pool[:4]], per_shard=4)
    stream = SampleStream([folder], adapter, batch_size=2, batches_per_epoch=3, max_consecutive_bad=20)
    with pytest.raises(RuntimeError, match="bad samples in a row"):
        epoch_batches(stream)
    # shards that yield no sample at all (cut inside their first sample)
    empty = str(tmp_path / "empty")
    write_set(empty, raw_pool[:4], per_shard=2)
    for name in ("train-000000.tar", "train-000001.tar"):
        truncate_tar(os.path.join(empty, name), 0)
    stream = SampleStream([empty], adapter, batch_size=2)
    with pytest.raises(RuntimeError, match="read no sample"):
        epoch_batches(stream)


# --------------------------------------------------------------------- resuming

@pytest.fixture()
def resume_set(tmp_path, raw_pool) -> str:
    """18 samples in 6 shards, one of them corrupt (the skip must count it)."""
    samples = list(raw_pool)
    samples[4] = (samples[4], replace("corr.npy", b"junk"))
    folder = str(tmp_path / "resume")
    write_set(folder, samples, per_shard=3)
    return folder


def _resume_check(adapter, folder, num_workers, cuts, **kw):
    make = lambda: SampleStream([folder], adapter, batch_size=2, num_workers=num_workers, seed=11,  # noqa: E731
                              shuffle_buffer=4, shuffle_initial=2, **kw)
    ref = make()
    nb = len(ref)
    full = epoch_batches(ref, 2 * nb)
    for k in cuts:
        first = make()
        head = epoch_batches(first, k)
        assert_same_batches(head, full[:k])
        state = json.loads(json.dumps(first.state_dict()))
        del first, head
        resumed = make()
        resumed.load_state_dict(state)
        assert resumed.epoch == k // nb
        rest = epoch_batches(resumed, 2 * nb - k)
        assert_same_batches(rest, full[k:])
        assert resumed.stats() == ref.stats()
    return ref


def test_resume_equals_uninterrupted_in_process(adapter, resume_set):
    ref = _resume_check(adapter, resume_set, 0, cuts=[4, 9, 10, 13])
    assert ref.stats()["corrupt_member"] >= 1


def test_resume_equals_uninterrupted_with_two_workers(adapter, resume_set):
    _resume_check(adapter, resume_set, 2, cuts=[3, 9, 12])


def test_resume_from_another_ranks_state_replays(adapter, resume_set):
    make = lambda rank: SampleStream([resume_set], adapter, batch_size=2, rank=rank, world_size=2,  # noqa: E731
                                   seed=4, shuffle_buffer=4, shuffle_initial=2)
    full = epoch_batches(make(1), 2 * len(make(1)))
    r0 = make(0)
    epoch_batches(r0, 3)
    states = [r0.state_dict(), {**r0.state_dict(), "rank": 5}]
    resumed = make(1)
    resumed.load_state_dict(states)  # no state of rank 1: replay from rank 0's position
    assert_same_batches(epoch_batches(resumed, len(full) - 3), full[3:])


def test_state_of_other_settings_is_refused(adapter, resume_set):
    s = SampleStream([resume_set], adapter, batch_size=2)
    epoch_batches(s, 2)
    other = SampleStream([resume_set], adapter, batch_size=3)
    with pytest.raises(ValueError, match="batch_size=2"):
        other.load_state_dict(s.state_dict())


# ------------------------------------------------------------------------ s3://

@pytest.fixture()
def s3(s3_server, monkeypatch):
    """An s3fs client of the session's moto server; the loader finds it through the environment."""
    import s3fs

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()  # cached clients may point at another endpoint
    yield s3_server.fs()
    s3fs.S3FileSystem.clear_instance_cache()


def test_s3_shards_stream_like_local_ones(adapter, tmp_path, raw_pool, s3):
    folder = str(tmp_path / "set")
    write_set(folder, raw_pool[:12], per_shard=3)
    s3.mkdir("gasp-test")
    s3.put(folder + "/", "gasp-test/set/", recursive=True)
    local = {w: [b["keys"] for b in epoch_batches(SampleStream([folder], adapter, batch_size=2, seed=2,
                                                             num_workers=w))] for w in (0, 2)}
    for src, workers in (("s3://gasp-test/set/", 0), ("s3://gasp-test/set/manifest.json", 2),
                         ("s3://gasp-test/set/train-{000000..000003}.tar", 0)):
        stream = SampleStream([src], adapter, batch_size=2, seed=2, num_workers=workers)
        assert stream.sets[0].urls[0].startswith("s3://gasp-test/set/")
        assert [b["keys"] for b in epoch_batches(stream)] == local[workers], src
    # a truncated object on s3 is skipped and counted like a local one
    truncate_tar(os.path.join(folder, "train-000001.tar"), 1)
    s3.put(os.path.join(folder, "train-000001.tar"), "gasp-test/set/train-000001.tar")
    stream = SampleStream(["s3://gasp-test/set/"], adapter, batch_size=2, seed=2, batches_per_epoch=5)
    assert len(epoch_batches(stream)) == 5 and stream.stats()["tar_truncated"] >= 1


# ----------------------------------------------------------------------- golden

def test_golden_shards_read_back_through_the_stream(adapter, shard_checks):
    """Both committed golden shards stream: the version-1 pairs as clips of two frames, the version-2 clips."""
    v2 = os.path.join(ROOT, "tests", "golden", "v2", "train-000000.tar")
    for path, version in ((GOLDEN_SHARD, 1), (v2, 2)):
        raw = list(tar_samples(path, _fail))
        assert raw
        for smp in raw:
            (shard_checks.pair if version == 1 else shard_checks.sample)(smp)  # the job's member / visibility checks
            clip, reason, msg = decode_checked(smp)
            assert clip is not None, msg
            assert clip.version == version and clip.n_frames == (2 if version == 1 else len(clip.meta["frames"]))
            for k in range(clip.n_frames):
                W, H = clip.meta["sizes"][k]
                assert clip.rgb[k].dtype == np.uint8 and clip.rgb[k].shape == (H, W, 3)
                assert clip.depth[k].dtype == np.float32 and clip.depth[k].shape == (H, W)
                assert (clip.depth[k] > 0).any() and clip.depth[k].max() > 1.0  # 16-bit depth, not 8-bit
            assert clip.corr.dtype == np.float32 and clip.corr.shape == (sum(clip.meta["n_corr"]), 6)
        stream = SampleStream([path], adapter, batch_size=1)
        assert len(stream) == len(raw)
        batches = epoch_batches(stream)
        assert sorted(k for b in batches for k in b["keys"]) == sorted(s["__key__"] for s in raw)
        assert stream.stats()["skipped"] == 0
        for b in batches:
            assert b["z_b"].dtype == torch.float32 and b["anchor_a"].dtype == torch.long
            assert b["depth"].shape == b["cell_pos"].shape and b["cell_mask"].dtype == torch.bool


def test_reasons_are_the_stats_keys(tiny_shards, adapter):
    s = SampleStream([tiny_shards], adapter, batch_size=4)
    assert set(s.stats()) == {"samples", "skipped", *REASONS}
