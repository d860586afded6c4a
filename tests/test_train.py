"""Training under the real `deepspeed` launcher: 2 CPU ranks (gloo), ZeRO-3, the tiny preset.

One tracked reference run (`reference_run` in conftest.py: 24 steps, checkpoints every 4,
validation every 12, MLflow server on 127.0.0.1, partition dump on, a NaN loss injected
on rank 1 at step 3) is shared by the partition, loss, MLflow and export checks; the
resume and bad-step tests (test_train_resume.py) use it too. The normalisation test runs a worker script
(tests/train_worker_norm.py) through the trainer's own step code and compares it with
one process on the union batch.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from conftest import ROOT, ZERO3_JSON, Launch, read_jsonl

pytestmark = pytest.mark.slow

WORKER_NORM = os.path.join(ROOT, "tests", "train_worker_norm.py")


# ----------------------------------------------------------------------- helpers

def _ok(run) -> None:
    assert run.rc == 0, f"reference run failed (rc {run.rc})\n{run.launch.tail()}"


def _val_batch(shards: str, n: int = 1):
    """n fixed batches of the validation split and the tiny adapter (model inputs for comparisons)."""
    from data.stream import SampleStream
    from model.loading import build_model_and_processor

    _, _, adapter = build_model_and_processor("tiny")
    stream = SampleStream([shards], adapter, batch_size=2, rank=0, world_size=1, num_workers=0, seed=0, split="val",
                        batches_per_epoch=n)
    return [adapter.model_inputs(b) for b in stream]


def _gasp_from_checkpoint(ckpt_dir: str, trainable: str, tag: str | None = None):
    """GaspVLM (tiny preset) with the fp32 weights of a DeepSpeed checkpoint: the trained model with heads."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from model.loading import build_model_and_processor
    from model.wrapper import GaspConfig, GaspVLM

    state = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    tag = tag or open(os.path.join(ckpt_dir, "latest")).read().strip()
    flat = json.load(open(os.path.join(ckpt_dir, tag, "trainer_meta.json")))["config"]
    assert flat["model.trainable"] == trainable
    vlm, _, _ = build_model_and_processor("tiny")
    gasp = GaspVLM(vlm, GaspConfig(trainable=trainable, head=flat["loss.head"], lora_r=flat["model.lora_r"],
                                   lora_alpha=flat["model.lora_alpha"]))
    missing, unexpected = gasp.load_state_dict(state, strict=False)
    # `layers.*` is GaspVLM's alias of the LM's decoder layers (same tensors), `layer_weights` a buffer
    assert not [k for k in missing if not (k.startswith("layers.") or k == "layer_weights")], missing
    assert not unexpected, unexpected
    return gasp.eval(), state


def _hidden(model, inputs) -> torch.Tensor:
    """Last hidden state of the VLM body (no LM head)."""
    body = getattr(model, "model", model)
    with torch.no_grad():
        return body(**inputs, use_cache=False).last_hidden_state


def _check_export(export_dir: str, trained_vlm, inputs_list, rtol: float = 1e-5, atol: float = 1e-6) -> dict:
    """The exported model loads with its class and processor, has no heads, and matches `trained_vlm`."""
    from transformers import Qwen2VLForConditionalGeneration

    from model.loading import load_processor

    model_dir = os.path.join(export_dir, "model")
    model, info = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, output_loading_info=True,
                                                                  local_files_only=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    load_processor(model_dir, "qwen2_vl")  # the processor travels with it
    keys = list(model.state_dict())
    assert not [k for k in keys if k == "head.weight" or k.startswith("head.") or "lora_" in k], keys
    with open(os.path.join(model_dir, "model.safetensors"), "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    saved = [k for k in header if k != "__metadata__"]
    assert not [k for k in saved if "head.weight" in k and "lm_head" not in k or "lora_" in k], saved
    for inputs in inputs_list:
        got, want = _hidden(model.eval(), inputs), _hidden(trained_vlm, inputs)
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    return dict(model.named_parameters())


# ------------------------------------------------------------------------ issue 7

def test_zero3_partitions_every_parameter(reference_run):
    """Created partitioned (zero.Init), and after the engine is built each rank holds half of every tensor."""
    _ok(reference_run)
    dumps = [json.load(open(os.path.join(reference_run.dir, f"partition_rank{r}.json"))) for r in (0, 1)]
    assert [d["world_size"] for d in dumps] == [2, 2] and {d["zero_stage"] for d in dumps} == {3}
    assert all(d["created_partitioned"] for d in dumps), "the model was built whole, not under zero.Init"
    assert dumps[0]["params"].keys() == dumps[1]["params"].keys()
    total = 0
    for name, (local0, full, held0) in dumps[0]["params"].items():
        local1, full1, held1 = dumps[1]["params"][name]
        assert full == full1
        assert local0 == local1 == math.ceil(full / 2), (name, local0, local1, full)
        assert held0 == held1 == 0, f"{name}: a full copy stays on the rank"
        total += full
    assert "head.w1" in dumps[0]["params"] and "head.w2" in dumps[0]["params"] and total > 300_000


def test_ranks_leave_no_shared_memory_behind(reference_run):
    """DeepSpeed's CPU all-reduce workspace (/dev/shm, ~66 MB a rank) is unlinked when the ranks exit."""
    _ok(reference_run)
    port = reference_run.launch.cmd[reference_run.launch.cmd.index("--master_port") + 1]
    import glob

    from launch.distributed import SHM_BUFFER

    pattern = SHM_BUFFER.format(uid=os.getuid(), addr="127.0.0.1", port=port, rank="*")
    assert glob.glob(pattern) == [], glob.glob(pattern)


def test_loss_falls(reference_run):
    _ok(reference_run)
    rows = read_jsonl(os.path.join(reference_run.dir, "train_log.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert [r["step"] for r in rows if r["skipped"]] == [3]  # the injected NaN (TRAIN_ENV)
    losses = [r["loss"] for r in rows]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert all(math.isfinite(x) for x in losses)
    assert last < 0.8 * first, f"loss did not fall: first 4 mean {first:.3f}, last 4 mean {last:.3f}: {losses}"
    lrs = [r["lr"] for r in rows]
    assert lrs[0] < lrs[2] == pytest.approx(3e-3) and lrs[-1] < 0.2 * lrs[2], lrs  # warm-up, then cosine
    assert all(r["samples_per_s"] > 0 and 0 <= r["data_wait_share"] <= 1 for r in rows)


def test_mlflow_server_gets_the_run_from_rank_0_only(reference_run, mlflow_server):
    _ok(reference_run)
    client = mlflow_server.client()
    runs = mlflow_server.runs("gasp-tests", "reference")
    # rank 1 has a null tracker: had it tracked, it would have opened a second run of this name
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["optim.steps"] == "24" and p["world_size"] == "2" and p["zero_stage"] == "3"
    assert p["model.preset"] == "tiny" and p["data.grad_accum"] == "1"
    assert run.data.tags["git_commit"] and run.data.tags["kind"] == "train"
    # one value per step: nobody else logged into this run
    hist = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in hist) == list(range(1, 25))
    for name in ("train/lr", "train/samples_per_s", "train/tokens_per_s", "train/data_wait_s", "train/nce",
                 "train/depth", "train/skipped_steps"):
        assert len(client.get_metric_history(run.info.run_id, name)) == 24, name
    # the skipped step 3 (NaN injected on rank 1) is counted, and has no gradient norm
    skipped = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/skipped_steps")}
    assert skipped == {s: (0.0 if s < 3 else 1.0) for s in range(1, 25)}
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/grad_norm")) == \
        [s for s in range(1, 25) if s != 3]
    for kind in ("head", "raw"):
        for layer in range(4):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id,
                                                                   f"val/{kind}/pck1/layer_{layer:02d}"))
            assert steps == [12, 24], (kind, layer, steps)
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/panels.png" in arts and "plots/panels_step000024.png" in arts, arts
    png = client.download_artifacts(run.info.run_id, "plots/panels.png", reference_run.root)
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    configs = {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    assert {"config/zero3.json", "config/ds_config.resolved.json"} <= configs, configs
    # the same run id is recorded in the checkpoints (for resuming)
    meta = json.load(open(os.path.join(reference_run.dir, "checkpoints", "step00000024", "trainer_meta.json")))
    assert meta["mlflow_run_id"] == run.info.run_id


def test_zero3_step_equals_one_process_on_the_union_batch(tiny_shards, tmp_path):
    """Unequal anchor counts per rank, GAS 2, SGD: gradient and update of a ZeRO-3 step = one process.

    Step 2 gives rank 1 no anchor at all: it completes (no hang) and still matches.
    """
    from model.loading import build_model_and_processor
    from model.wrapper import GaspConfig, GaspVLM

    out = str(tmp_path / "norm")
    launch = Launch(["--shards", tiny_shards, "--out", out], str(tmp_path / "worker.log"), cwd=str(tmp_path),
                    script=WORKER_NORM)
    rc = launch.wait(timeout=400)
    assert rc == 0, launch.tail()
    res = torch.load(os.path.join(out, "result.pt"), weights_only=False)
    per_rank = [s["anchors_per_rank"] for s in res["steps"]]
    assert per_rank[0][1] == [3, 5] and per_rank[1][1] == [0, 0], per_rank  # rank 1: few anchors, then none
    assert min(per_rank[0][0] + per_rank[1][0]) > 5 and per_rank[0][0][0] != per_rank[0][0][1], \
        "the fixture data changed: pick other anchor counts"

    vlm, _, adapter = build_model_and_processor("tiny")
    model = GaspVLM(vlm, GaspConfig(trainable="full", head="mlp"))  # plain torch, one process, no DeepSpeed
    params = dict(model.named_parameters())
    assert sorted(params) == sorted(res["init"])
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(res["init"][n])
    trainable = res["trainable"]
    assert sorted(trainable) == sorted(n for n, p in params.items() if p.requires_grad)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    def flat(d) -> torch.Tensor:
        return torch.cat([d[n].flatten() for n in trainable])

    for s, step in enumerate(res["steps"]):
        micro = [mb for per_rank in step["micro"] for mb in per_rank]  # rank 0's two, then rank 1's two
        union = _union(micro)
        model.zero_grad(set_to_none=True)
        loss, parts = model(union, adapter.model_inputs(union))  # the union's own mean loss (combine)
        loss.backward()
        assert [parts["n_ab"], parts["n_ba"], parts["n_depth"], 0.0] == step["counts"]  # no LM labels in clips
        assert step["loss"] == pytest.approx(loss.item(), rel=1e-5)
        g_ref = flat({n: params[n].grad for n in trainable})
        g_ds = flat(step["grads"])
        assert rel(g_ds, g_ref) < 1e-5, f"step {s + 1}: ZeRO-3 gradient differs by {rel(g_ds, g_ref):.2e}"
        for n in trainable:
            if params[n].grad.norm() > 1e-3 * g_ref.norm() / len(trainable) ** 0.5:
                assert rel(step["grads"][n], params[n].grad) < 1e-4, n
        if s == 0:
            # the test can fail: the mean of per-micro-batch means is far off with these counts
            naive = _naive_grads(model, micro, adapter, trainable)
            assert rel(naive, g_ref) > 1e-2
        with torch.no_grad():
            before = flat(params).clone()
            for n in trainable:
                params[n].sub_(step["lr"][0 if n.startswith("head.") else -1] * params[n].grad)  # SGD
            d_ref = flat(params) - before
            d_ds = flat(step["after"]) - before
        assert rel(d_ds, d_ref) < 1e-5, f"step {s + 1}: update differs by {rel(d_ds, d_ref):.2e}"
        frozen = [n for n in params if n not in trainable]
        assert all(torch.equal(step["after"][n], res["init"][n]) for n in frozen)


def _union(batches: list[dict]) -> dict:
    """One clip batch of every clip of the step (conftest.union_batch)."""
    from conftest import union_batch

    return union_batch(batches)


def _naive_grads(model, micro, adapter, trainable) -> torch.Tensor:
    params = dict(model.named_parameters())
    saved = {n: params[n].grad.clone() for n in trainable}
    model.zero_grad(set_to_none=True)
    for mb in micro:
        loss, _ = model(mb, adapter.model_inputs(mb))  # each micro-batch's own mean
        (loss / len(micro)).backward()
    g = torch.cat([params[n].grad.flatten() for n in trainable])
    for n in trainable:
        params[n].grad = saved[n]
    return g


@pytest.mark.parametrize("case", ["bad_flag", "missing_ds_config"])
def test_config_errors_fail_in_one_line_on_every_rank(case, tiny_shards, tmp_path):
    args = {"bad_flag": ["--ds_config", ZERO3_JSON, "--shards", tiny_shards, "--bogus-flag", "1"],
            "missing_ds_config": ["--ds_config", str(tmp_path / "nope" / "zero9.json"), "--shards", tiny_shards]}[case]
    want = {"bad_flag": "unrecognized arguments: --bogus-flag 1", "missing_ds_config": "zero9.json: no such file"}[case]
    launch = Launch(args, str(tmp_path / "launcher.log"), cwd=str(tmp_path))
    rc = launch.wait(timeout=180)
    assert rc != 0, launch.tail()
    text = launch.text()
    errors = [line for line in text.splitlines() if "launch/train.py: error:" in line]
    assert len(errors) == 2 and all(want in line for line in errors), launch.tail()  # one line per rank
    assert errors[0].split("launch/train.py: error:")[1] == errors[1].split("launch/train.py: error:")[1]
    assert "Traceback" not in text, launch.tail()
    assert not (tmp_path / "runs").exists()  # failed before anything was started or written


def test_config_errors_in_process(tiny_shards, tmp_path, capsys):
    """main(argv) in-process: each bad input is one line on stderr and a non-zero status, before any start."""
    from launch.train import main

    cases = [(["--steps", "0"], "--steps must be >= 1"),
             (["--preset", "nonexistent"], "unknown --preset"),
             (["--ds_config", str(tmp_path / "x.json")], "no such file"),
             (["--shards", str(tmp_path / "none")], "no such file or folder"),
             (["--head-layers", "a,b"], "--head-layers")]
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    cases.append((["--ds_config", str(bad_json)], "not valid JSON"))
    clash = tmp_path / "clash.json"
    clash.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 3}}))
    cases.append((["--ds_config", str(clash), "--batch-size", "2"], "--batch-size gives 2"))
    for argv, want in cases:
        with pytest.raises(SystemExit) as e:
            main(["--shards", tiny_shards, "--output-dir", str(tmp_path / "run"), "--no-mlflow", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and want in err[0], (argv, err)
        assert err[0].startswith("launch/train.py: error:")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------- export (issue 8)

def test_export_loads_without_heads_and_matches_the_trained_model(reference_run, tiny_shards):
    from model.head import load_heads

    _ok(reference_run)
    export = os.path.join(reference_run.dir, "export")
    info = json.load(open(os.path.join(export, "export.json")))
    assert info["step"] == 24 and info["trainable"] == "full"
    gasp, state = _gasp_from_checkpoint(os.path.join(reference_run.dir, "checkpoints"), "full")
    _check_export(export, gasp._base_vlm(), _val_batch(tiny_shards, 1), rtol=0, atol=0)  # same fp32 weights: exact
    # the heads travel apart, equal to the checkpoint's
    heads, meta = load_heads(os.path.join(export, "heads.safetensors"), num_layers=4, hidden_size=64)
    for name in ("w1", "w2"):  # the default MLP head
        torch.testing.assert_close(heads[name], state[f"head.{name}"], rtol=0, atol=0)
    assert meta["step"] == 24 and meta["family"] == "qwen2_vl"


def test_export_cli_on_demand_from_a_checkpoint(reference_run, tiny_shards, tmp_path, capsys):
    """`launch/export.py --checkpoint DIR --tag T` on an intermediate checkpoint (in-process main)."""
    from launch.export import main as export_main

    _ok(reference_run)
    ckpt = os.path.join(reference_run.dir, "checkpoints")
    out = str(tmp_path / "exp12")
    assert export_main(["--checkpoint", ckpt, "--tag", "step00000012", "--output", out]) == 0
    assert json.load(open(os.path.join(out, "export.json")))["step"] == 12
    gasp, _ = _gasp_from_checkpoint(ckpt, "full", tag="step00000012")
    p12 = _check_export(out, gasp._base_vlm(), _val_batch(tiny_shards, 1), rtol=0, atol=0)
    p24 = _check_export(os.path.join(reference_run.dir, "export"), None, [])
    # between steps 12 and 24 the LM layers trained; the frozen vision tower and embeddings did not move
    assert any(not torch.equal(p12[n], p24[n]) for n in p12 if "language_model.layers.0." in n)
    assert all(torch.equal(p12[n], p24[n]) for n in p12 if ".visual." in n or "embed_tokens" in n)
    # one-line errors
    capsys.readouterr()
    assert export_main(["--checkpoint", str(tmp_path / "none")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert export_main(["--checkpoint", ckpt, "--tag", "step99999999", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a launch/train.py checkpoint" in err[0], err


def test_lora_run_exports_merged_weights(tiny_shards, tmp_path):
    """--trainable lora (one rank, plain python): the export has no LoRA tensors and equals the adapted model."""
    from conftest import free_port

    run_dir = str(tmp_path / "lora")
    launch = Launch(["--ds_config", ZERO3_JSON, "--shards", tiny_shards, "--output-dir", run_dir, "--trainable",
                     "lora", "--lora-r", "4", "--steps", "3", "--lr", "2e-2", "--warmup-steps", "0", "--val-every",
                     "0", "--val-batches", "1", "--num-workers", "0", "--no-mlflow"],
                    str(tmp_path / "train.log"), cwd=str(tmp_path), launcher=False,
                    env={"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                         "MASTER_PORT": str(free_port())})
    assert launch.wait(timeout=400) == 0, launch.tail()
    gasp, state = _gasp_from_checkpoint(os.path.join(run_dir, "checkpoints"), "lora")
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in state.items()), "LoRA did not train"
    # the trained model = the PEFT-wrapped LM with its adapters active
    exported = _check_export(os.path.join(run_dir, "export"), gasp._base_vlm(), _val_batch(tiny_shards, 1),
                             rtol=1e-4, atol=1e-5)
    q0 = "model.language_model.layers.0.self_attn.q_proj.weight"
    base_q0 = state["vlm.base_model.model." + q0.replace(".weight", ".base_layer.weight")]
    assert not torch.equal(exported[q0], base_q0), "the LoRA update was not merged into the weights"
    assert json.load(open(os.path.join(run_dir, "export", "export.json")))["trainable"] == "lora"


def test_fill_ds_config_fills_auto_and_refuses_what_breaks_the_trainer():
    from launch.config import TrainError, fill_ds_config, load_ds_config, tiny

    cfg = tiny()
    ds = fill_ds_config(load_ds_config(ZERO3_JSON), cfg, bf16=True, on_cuda=True, hidden=3584)
    assert ds["train_micro_batch_size_per_gpu"] == cfg.data.batch_size and ds["gradient_clipping"] == 1.0
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": True}  # the bad-step skip needs it
    assert ds["optimizer"]["params"]["torch_adam"] is False and ds["optimizer"]["params"]["lr"] == cfg.optim.lr
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 35840
    cpu = fill_ds_config(load_ds_config(ZERO3_JSON), cfg, bf16=False, on_cuda=False, hidden=64)
    assert cpu["optimizer"]["params"]["torch_adam"] is True and cpu["bf16"]["enabled"] is False
    for bad, want in (({"bf16": {"enabled": "auto", "check_grad_overflow": False}}, "check_grad_overflow"),
                      ({"scheduler": {"type": "WarmupLR"}}, "scheduler"),
                      ({"zero_optimization": {"stage": 2, "compute_grad_norm": False}}, "compute_grad_norm"),
                      ({"fp16": {"enabled": True}}, "fp16"),
                      ({"gradient_accumulation_steps": 4}, "--grad-accum gives 1")):
        with pytest.raises(TrainError, match=want):
            fill_ds_config(bad, cfg, bf16=True, on_cuda=True, hidden=64)


@pytest.mark.slow
def test_no_flags_trains_the_tiny_preset_on_the_embedded_shards_it_builds(tmp_path):
    """`deepspeed launch/train.py --ds_config launch/zero3.json` and nothing else (DESIGN §7)."""
    run = Launch(["--ds_config", "launch/zero3.json"], str(tmp_path / "log.txt"), cwd=str(tmp_path))
    rc = run.wait(timeout=900)
    _ok_rc = rc == 0
    log = run.tail()
    assert _ok_rc, log
    assert "has no shards yet: building them with pipeline/shard.py" in open(tmp_path / "log.txt").read()
    manifest = json.load(open(tmp_path / "runs" / "shards" / "manifest.json"))
    assert manifest["counts"]["clips_train"] > 0 and manifest["counts"]["clips_val"] > 0
    (run,) = [p for p in (tmp_path / "runs" / "train").iterdir() if p.name.startswith("tiny-")]  # tiny-<hash>
    steps = [r["step"] for r in read_jsonl(str(run / "train_log.jsonl"))]
    assert steps[-1] == 40  # the tiny preset's 40 steps
    assert (run / "export" / "heads.safetensors").is_file()
    assert (run / "export" / "model" / "gasp_training.json").is_file()
    assert (tmp_path / "runs" / "mlflow.db").is_file()  # tracked in the default local store


def test_a_stale_deepspeed_build_lock_is_removed_and_a_live_one_kept(tmp_path, monkeypatch, capsys):
    """A rank killed while JIT-building DeepSpeed's CPU comm op leaves torch's lock file; every later run then
    waited in init_distributed forever. A lock older than any build is removed with one line; a fresh one
    (a build in progress) is left alone."""
    import time

    from launch.distributed import SHM_OP, STALE_LOCK_S, clear_stale_build_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / SHM_OP / "lock"
    lock.parent.mkdir(parents=True)
    assert clear_stale_build_lock() is None  # no lock: nothing to do
    lock.touch()
    assert clear_stale_build_lock() is None and lock.exists()  # a build in progress
    old = time.time() - STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    assert clear_stale_build_lock() == str(lock) and not lock.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stale build lock" in err[0] and "min old" in err[0], err
