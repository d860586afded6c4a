"""One rank of the multi-process stream test (started by the `deepspeed` launcher).

    deepspeed --num_gpus 2 tests/dist_stream_worker.py --shards DIR --out DIR [--batch-size 2] [--workers 2]

Each rank joins a gloo process group, reads one epoch of its share with DataLoader
workers, checks with a collective that every rank yields the same number of batches
(an uneven end would hang here), and writes what it read to OUT/rank{r}.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", required=True, help="shard source (folder, manifest, pattern)")
    ap.add_argument("--out", required=True, help="folder for rank{r}.json")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--local_rank", type=int, default=0, help="added by the deepspeed launcher")
    args = ap.parse_args(argv)

    import torch.distributed as dist

    from data.stream import SampleStream
    from model.loading import build_preset_processor
    from model.presets import get_preset
    from model.qwen import QwenAdapter

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        preset = get_preset("tiny")
        adapter = QwenAdapter(build_preset_processor(preset), family=preset.family)
        stream = SampleStream([args.shards], adapter, batch_size=args.batch_size, rank=rank, world_size=world,
                            num_workers=args.workers, seed=7)
        epochs = []
        for epoch in range(args.epochs):
            stream.set_epoch(epoch)
            batches = []
            for batch in stream:
                batches.append(batch["keys"])
                dist.barrier()  # a collective per batch, as in training: an uneven end hangs here
            epochs.append(batches)
        counts = [None] * world
        dist.all_gather_object(counts, [len(b) for b in epochs])
        with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
            json.dump({"rank": rank, "world_size": world, "epochs": epochs, "batches_per_epoch": len(stream),
                       "all_counts": counts, "stats": stream.stats()}, f)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
