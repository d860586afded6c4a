"""What a careful user hits first (issue 15): silent resumes, stale plans, late tracebacks,
contradictory flags, numerics the contract promises, the similarity memory guard.

The shard job's stale-plan test lives beside the other rerun tests in test_shard_job.py.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import ROOT, ZERO3_JSON, Launch

# ------------------------------------------------------------------ 1. run naming and resume


def _cfg(argv):
    from launch.train import parse_config

    return parse_config(argv)[0]


def test_default_run_name_follows_the_defining_flags():
    base = ["--preset", "tiny", "--shards", "runs/shards"]
    name = _cfg(base).run.run_name
    assert name.startswith("tiny-") and len(name) == len("tiny-") + 8
    assert _cfg(base).run.run_name == name  # the same command: the same folder (a requeue resumes)
    for flags in (["--lr", "1e-3"], ["--steps", "41"], ["--lambda-depth", "0.5"], ["--seed", "1"],
                  ["--shards", "runs/other"], ["--batch-size", "4"]):
        assert _cfg(base + flags).run.run_name != name, flags
    # flags that only change how a run is watched or saved keep its folder
    for flags in (["--val-every", "3"], ["--experiment", "x"], ["--save-every", "5"], ["--no-mlflow"],
                  ["--log-every", "7"], ["--sim-memory-gib", "3"]):
        assert _cfg(base + flags).run.run_name == name, flags


def test_an_explicit_run_name_with_changed_flags_refuses_naming_them(tmp_path):
    from launch.config import RUN_RECORD, TrainError, current_defining, defining_hash
    from launch.train import check_run_folder

    folder = tmp_path / "run"
    folder.mkdir()
    first = _cfg(["--preset", "tiny", "--output-dir", str(folder), "--lr", "2e-3", "--steps", "40"])
    (folder / RUN_RECORD).write_text(json.dumps({"hash": defining_hash(current_defining(first)),
                                                 "defining": current_defining(first)}))
    check_run_folder(first)  # its own command continues
    changed = _cfg(["--preset", "tiny", "--output-dir", str(folder), "--lr", "1e-3", "--steps", "80"])
    with pytest.raises(TrainError) as e:
        check_run_folder(changed)
    msg = str(e.value)
    assert "--lr 0.002 -> 0.001" in msg and "--steps 40 -> 80" in msg and "--run-name" in msg \
        and "--resume never" in msg and "\n" not in msg
    check_run_folder(_cfg(["--preset", "tiny", "--output-dir", str(folder), "--lr", "1e-3", "--resume", "never"]))


def test_a_folder_of_an_older_run_is_checked_against_its_checkpoint(tmp_path):
    """Runs written before run_config.json existed: the latest checkpoint's config is the record."""
    from data.cli import flat_dict
    from launch.config import TrainError
    from launch.train import check_run_folder

    folder = tmp_path / "run"
    old = _cfg(["--preset", "tiny", "--output-dir", str(folder), "--lr", "2e-3"])
    (folder / "checkpoints" / "step00000004").mkdir(parents=True)
    (folder / "checkpoints" / "latest").write_text("step00000004")
    (folder / "checkpoints" / "step00000004" / "trainer_meta.json").write_text(
        json.dumps({"world_size": 2, "step": 4, "config": flat_dict(old)}))
    check_run_folder(old)
    with pytest.raises(TrainError, match="--lr 0.002 -> 0.003"):
        check_run_folder(_cfg(["--preset", "tiny", "--output-dir", str(folder), "--lr", "3e-3"]))


@pytest.mark.slow
def test_same_command_resumes_and_a_changed_one_starts_fresh(tiny_shards, tmp_path, capsys):
    """A real run (launcher, 1 rank) claims its default folder; the same command resumes it, a changed
    --lr gets another folder, and the old name with the new --lr refuses before any model is built."""
    from launch.trainer import find_resume, run_dir
    from launch.train import main

    argv = ["--preset", "tiny", "--shards", tiny_shards, "--steps", "2", "--val-every", "0", "--val-batches", "1",
            "--no-mlflow", "--no-export", "--num-workers", "0"]
    launch = Launch(["--ds_config", ZERO3_JSON, *argv], str(tmp_path / "launch.log"), cwd=str(tmp_path), ranks=1)
    assert launch.wait(timeout=400) == 0, launch.tail()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        cfg = _cfg(argv)
        folder = run_dir(cfg)
        record = json.load(open(os.path.join(folder, "run_config.json")))
        assert record["run_name"] == cfg.run.run_name and record["defining"]["optim.lr"] == 2e-3
        assert find_resume(cfg, 1) == os.path.join(folder, "checkpoints")  # a requeue continues it
        other = _cfg(argv + ["--lr", "1e-3"])
        assert run_dir(other) != folder and find_resume(other, 1) is None
        rc = main(argv + ["--lr", "1e-3", "--run-name", cfg.run.run_name])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 3 and len(err) == 1 and "--lr 0.002 -> 0.001" in err[0], err
        assert not torch.distributed.is_initialized()
    finally:
        os.chdir(cwd)


# --------------------------------------------------------------- 3. bad sources, in one line, early

def _train_error(argv, capsys) -> str:
    from launch.train import main

    with pytest.raises(SystemExit) as e:
        main(["--no-mlflow", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("launch/train.py: error:"), err
    assert not torch.distributed.is_initialized()  # failed before the process group, hence before any model
    return err[0]


def _write_manifest(folder, **changes):
    from data.shardformat import FORMAT_VERSION

    m = {"version": 1, "format_version": FORMAT_VERSION, "shards": [{"name": "val-000000.tar", "split": "val",
                                                                     "samples": 3}]}
    m.update(changes)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(m, f)
    return str(folder)


def test_bad_sources_fail_in_one_line_before_the_model(tiny_shards, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no train-*.tar shards" in _train_error(["--shards", str(empty)], capsys)
    no_train = _write_manifest(tmp_path / "valonly")
    assert "has no 'train' shards (splits: val)" in _train_error(["--shards", no_train], capsys)
    future = _write_manifest(tmp_path / "future", format_version=99)
    assert "shard format version 99 is not supported" in _train_error(["--shards", future], capsys)
    msg = _train_error(["--shards", tiny_shards, "--batch-size", "500"], capsys)
    assert "make no batch of --batch-size 500" in msg
    no_val = _write_manifest(tmp_path / "noval", shards=[{"name": "train-000000.tar", "split": "train",
                                                          "samples": 3}])
    assert "has no 'val' shards" in _train_error(["--shards", tiny_shards, "--val-shards", no_val], capsys)


def test_unreachable_and_empty_s3_prefixes_fail_in_one_line(tiny_shards, s3_server, monkeypatch, capsys):
    import socket

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    s3_server.fs().mkdir("gasp-empty")
    msg = _train_error(["--shards", "s3://gasp-empty/shards/"], capsys)
    assert "s3://gasp-empty/shards/" in msg and "no such folder" in msg
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    msg = _train_error(["--shards", "s3://gasp-nowhere/shards/"], capsys)
    assert "s3://gasp-nowhere/shards/" in msg


def test_failed_default_shard_build_is_one_line(tmp_path, capsys, monkeypatch):
    """The embedded default shards cannot be built (the output path is a file): one line, exit 3."""
    from launch.train import main

    monkeypatch.chdir(tmp_path)
    os.makedirs("runs")
    open(os.path.join("runs", "shards"), "w").close()
    rc = main(["--no-mlflow", "--steps", "1"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("launch/train.py")]
    assert rc == 3 and len(err) == 1 and "building the default shards" in err[0], err


@pytest.mark.slow
def test_export_of_a_checkpoint_whose_model_moved_is_one_line(reference_run, tmp_path, capsys):
    from launch.export import main

    ckpt = tmp_path / "checkpoints"
    shutil.copytree(os.path.join(reference_run.dir, "checkpoints"), ckpt)
    tag = (ckpt / "latest").read_text().strip()
    meta_path = ckpt / tag / "trainer_meta.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["model.model"] = str(tmp_path / "moved-away" / "Qwen2-VL")
    meta_path.write_text(json.dumps(meta))
    rc = main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "export")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "moved-away" in err[0] and "does not load now" in err[0], err


def test_reproduce_refuses_a_folder_of_other_settings(tmp_path, capsys):
    from launch.reproduce import main

    (tmp_path / "repro_args.json").write_text(json.dumps({"steps": 5}))
    rc = main(["--output", str(tmp_path), "--steps", "7"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "other settings" in err[0] and "--fresh" in err[0], err


def test_a_probe_error_inside_the_demo_is_one_line(tmp_path, capsys):
    """The demo's probes fail with ProbeError on shards without a val split: one line, exit 1."""
    from launch.demo import main

    out = tmp_path / "demo"
    _write_manifest(out / "shards", complete=True, shards=[{"name": "train-000000.tar", "split": "train",
                                                              "samples": 3}])
    rc = main(["--output", str(out), "--scenes", "2", "--frames", "4", "--steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("python -m launch.demo: error: probe:") \
        and "no 'val' shards" in err[0], err


# ------------------------------------------------------------------ 4. contradictory flags

@pytest.mark.parametrize("argv,want", [
    (["--trainable", "heads", "--no-freeze-vision"], "--no-freeze-vision asks to train the vision tower"),
    (["--trainable", "full", "--lora-r", "8"], "--lora-r only act with --trainable lora"),
    (["--trainable", "heads", "--gradient-checkpointing"], "nothing to recompute under --trainable heads"),
    (["--elastic-resume", "--resume", "never"], "--elastic-resume and --resume never contradict"),
])
def test_contradictory_flags_are_refused(argv, want, capsys):
    from launch.train import parse_config

    with pytest.raises(SystemExit) as e:
        parse_config(["--preset", "tiny", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and want in err[0], err


def test_a_presets_checkpointing_is_dropped_for_heads_only_training():
    cfg = _cfg(["--preset", "qwen2.5-vl-7b", "--trainable", "heads"])
    assert cfg.model.trainable == "heads" and not cfg.model.gradient_checkpointing


# ------------------------------------------------------------------ 5. numerics

def _tiny_gasp(tau: float):
    from model.loading import build_model_and_processor
    from model.wrapper import GaspConfig, GaspVLM

    vlm, _, adapter = build_model_and_processor("tiny")
    gasp = GaspVLM(vlm, GaspConfig(trainable="heads", tau=tau))
    gasp.init_heads()
    return gasp.eval(), adapter


def test_raw_scores_use_tau_007_whatever_the_training_tau(tiny_shards):
    from data.stream import SampleStream
    from losses.gasp import pair_view
    from losses.metrics import match_stats, raw_similarities

    g1, adapter = _tiny_gasp(0.07)
    g2, _ = _tiny_gasp(0.5)
    batch = next(iter(SampleStream([tiny_shards], adapter, batch_size=2, rank=0, world_size=1, split="val",
                                 batches_per_epoch=1)))
    b, inputs = g1.batch_to_device(batch, adapter, torch.device("cpu"), torch.float32)
    h1, r1 = g1.match(b, inputs)
    h2, r2 = g2.match(b, inputs)
    assert torch.equal(r1.max_prob, r2.max_prob) and torch.equal(r1.dist, r2.dist)
    assert not torch.equal(h1.max_prob, h2.max_prob)  # the heads' confidences follow the training tau
    feats = g1.capture(b, inputs)
    pf = b["pair_frames"]
    fa, fb = feats[:, pf[:, 0]], feats[:, pf[:, 1]]
    assert torch.allclose(r2.max_prob, match_stats(raw_similarities(fa, fb, 0.07), pair_view(b)).max_prob)


def test_non_metric_depth_is_stored_finely_enough(tmp_path):
    """A COLMAP-scale scene (depth ~0.05-0.2 units, metric_depth false): stored depth, D_b and z_b
    within 0.1% of the unquantised truth (millimetre steps were percent errors at this scale)."""
    from conftest import build_shards
    from data import synthetic
    from data.adapter import CellGrid
    from data.labels import cell_depth, clip_labels
    from data.shardformat import decode_sample
    from data.stream import tar_samples

    scale = 0.04
    root = tmp_path / "corpus"
    synthetic.write_scene(str(root), "scene_0000", seed=3, n_frames=16, width=160, height=120)
    cams = json.loads((root / "scene_0000" / "cameras.json").read_text())
    truth = {}
    for fr in cams["frames"]:
        from PIL import Image

        png = root / "scene_0000" / fr["depth"]
        d = np.asarray(Image.open(png)).astype(np.float32) / cams["depth_scale"] * scale
        npy = png.with_suffix(".npy")
        np.save(npy, d)
        truth[fr["name"]] = d
        fr["depth"] = os.path.relpath(npy, root / "scene_0000")
        T = np.asarray(fr["cam2world"], dtype=np.float64)
        T[:3, 3] *= scale
        fr["cam2world"] = T.tolist()
    cams["metric_depth"] = False
    (root / "scene_0000" / "cameras.json").write_text(json.dumps(cams))
    out = tmp_path / "shards"
    build_shards(str(root), str(out), fmt="posed", clip_frames=3, clip_window=8, clips_per_scene=3,
                 samples_per_shard=8, max_side=160, val_fraction=0.0)
    grid = CellGrid(size=(160, 120), cell_px=20, rows=6, cols=8)
    n = 0
    for raw in tar_samples(str(out / "train-000000.tar"), lambda r, m: None):
        s = decode_sample(raw)
        lab = clip_labels(s, [grid] * s.n_frames)
        for k in range(s.n_frames):
            d_true = truth[s.meta["frames"][k]]
            ok = d_true > 0
            rel = np.abs(s.depth[k][ok] - d_true[ok]) / d_true[ok]
            assert rel.max() < 1e-3, rel.max()
        for p in lab.pairs:
            want, _ = cell_depth(truth[s.meta["frames"][p.j]], grid)
            v = lab.depth_valid[p.j]
            assert np.all(np.abs(lab.depth[p.j][v] - want[v]) / want[v] < 1e-3)
            n += 1
    assert n >= 3


@pytest.mark.slow
def test_bf16_head_masters_hold_the_exact_svd_init(tiny_shards, tmp_path):
    """Under the real launcher (2 ranks, ZeRO-3, bf16): the heads' fp32 masters equal the SVD of each
    gathered q_proj, not its bf16 rounding (DeepSpeed makes masters from the bf16 working copy)."""
    from model.head import svd_init
    from model.loading import build_preset_model
    from model.presets import get_preset

    out = tmp_path / "run"
    launch = Launch(["--ds_config", ZERO3_JSON, "--preset", "tiny", "--precision", "bf16", "--shards", tiny_shards,
                     "--steps", "1", "--val-every", "0", "--val-batches", "1", "--no-mlflow", "--no-export",
                     "--num-workers", "0", "--output-dir", str(out)], str(tmp_path / "launch.log"),
                    cwd=str(tmp_path), env={"GASP_DEBUG_HEAD_MASTER": "1"})
    assert launch.wait(timeout=500) == 0, launch.tail()
    saved = torch.load(out / "heads_master.pt")  # the default MLP head: w1 (L, 2d, D), w2 (L, d, 2d) float32
    masters, w2 = saved["w1"], saved["w2"]
    vlm = build_preset_model(get_preset("tiny"), dtype=torch.bfloat16)
    d = masters.shape[1] // 2
    W = torch.stack([svd_init(layer.self_attn.q_proj.weight.float(), d) for layer in vlm.model.language_model.layers])
    want = torch.cat([W, -W], dim=1)  # [W; -W]
    eye = torch.eye(d)
    assert torch.equal(w2, torch.cat([eye, -eye], dim=1).expand_as(w2))  # [I, -I]
    assert masters.dtype == torch.float32 and torch.equal(masters, want)
    assert not torch.equal(want, want.bfloat16().float())  # bf16 masters would differ: the test can fail


# ------------------------------------------------------------------ 6. similarity memory guard

def test_similarity_estimate_covers_the_loss_peak():
    """similarity_bytes >= the measured peak of the training loss (`pair_loss_terms`, forward and backward,
    beyond the features it is given: the profiler's allocation records), and not far above it, for one
    layer a chunk and all layers in one chunk, from features and with the head inside the chunks (as
    training runs it); the head's own input is not part of it.

    (Revised with the chunked loss: the estimate was of what autograd kept through the whole
    (L, P, N_a, N_b) similarities, measured with saved_tensors_hooks; the loss now keeps only the
    features and recomputes the similarities per chunk, so its peak is measured instead.)"""
    import torch.nn.functional as F

    from conftest import cpu_peak_bytes
    from losses.gasp import LossTerms, combine, pair_loss_terms, similarity_bytes
    from model.head import FusedCorrespondenceHead

    L, K, N, d, D = 3, 4, 96, 8, 32
    pf = torch.tensor([(i, j) for i in range(K) for j in range(i + 1, K)])
    P = len(pf)
    for M in (4, 48, 96):
        for chunk_bytes in (1, 2 ** 40):
            g = torch.Generator().manual_seed(M)
            batch = {"pair_frames": pf, "cell_mask": torch.ones(K, N, dtype=torch.bool),
                     "depth": torch.rand(K, N, generator=g) + 1, "depth_valid": torch.ones(K, N, dtype=torch.bool),
                     "anchor_a": torch.stack([torch.randperm(N, generator=g)[:M] for _ in range(P)]),
                     "target_b": torch.randint(0, N, (P, M), generator=g),
                     "anchor_mask": torch.ones(P, M, dtype=torch.bool), "z_b": torch.rand(P, M, generator=g) + 1}
            f = F.normalize(torch.randn(L, K, N, d, generator=g), dim=-1).requires_grad_()

            def step():
                combine(pair_loss_terms(f, batch, chunk_bytes=chunk_bytes))[0].backward()

            peak = cpu_peak_bytes(step)
            est = similarity_bytes(L, P, N, N, anchors=M, dim=d, frames=K, chunk_bytes=chunk_bytes)
            assert peak <= est <= 2.0 * peak, (M, chunk_bytes, peak, est)
            # the default is the worst case (every cell an anchor)
            assert similarity_bytes(L, P, N, N, dim=d, frames=K, chunk_bytes=chunk_bytes) >= est

            # what training runs: the head inside the chunks (its input x is not part of the estimate)
            head = FusedCorrespondenceHead(L, D, head_dim=d, kind="mlp")
            x = torch.randn(L, K, N, D, generator=g).requires_grad_()

            def head_step():
                combine(LossTerms.of(*head(x, loss=dict(batch=batch, chunk_bytes=chunk_bytes))))[0].backward()

            peak = cpu_peak_bytes(head_step)
            est = similarity_bytes(L, P, N, N, anchors=M, dim=d, frames=K, chunk_bytes=chunk_bytes, hidden=D)
            assert peak <= est <= 2.0 * peak, ("head", M, chunk_bytes, peak, est)


def test_memory_guard_refuses_at_start_naming_max_pixels(tiny_shards, capsys):
    msg = _train_error(["--preset", "qwen2.5-vl-7b", "--shards", tiny_shards, "--max-pixels", str(3519 * 784),
                        "--batch-size", "2", "--sim-memory-gib", "0.5"], capsys)
    assert "3519x3519 cells" in msg and "--max-pixels" in msg and "L=28 layers" in msg and "GiB" in msg
