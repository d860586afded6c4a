"""A tiny preset is the same model with and without ZeRO-3 (training, probe and evaluation agree)."""
import os

import pytest
import torch

from conftest import free_port


@pytest.mark.parametrize("name", ["tiny", "tiny-llava-ov"])
def test_preset_weights_are_identical_under_zero3(name, monkeypatch):
    import deepspeed
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig

    from model.loading import build_preset_model
    from model.presets import get_preset

    preset = get_preset(name)
    plain = {n: p.detach().clone() for n, p in build_preset_model(preset).named_parameters()}
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)
    if not dist.is_initialized():
        deepspeed.init_distributed("gloo", verbose=False)
        from launch.distributed import release_shm_buffer_at_exit

        release_shm_buffer_at_exit()
    keep = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
    try:
        model = build_preset_model(preset)
        params = list(model.named_parameters())
        assert all(hasattr(p, "ds_id") for _, p in params), "not partitioned"
        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            for n, p in params:
                assert torch.equal(p, plain[n]), n
    finally:
        del keep
