"""Regenerate the golden shard `tests/golden/train-000000.tar` (shard format version 1).

    python tests/golden/make_golden.py              # rewrite the committed file
    python tests/golden/make_golden.py --out DIR    # write DIR/train-000000.tar instead

Input: one synthetic room (data.synthetic, seed 7, 8 frames at 160x120), written to a
temporary folder and named by the relative path `corpus/golden_scene`, so that the
json `source` does not depend on where this runs. Pipeline: pipeline.stages scan ->
plan -> write in this process (no Ray), 2 pairs in one train shard.
tests/test_shard_job.py reads the committed file back and checks that this script,
run with the current code, gives the same bytes: a change of the writer (or of the
format) cannot slip in unnoticed. Bytes also depend on Pillow's libjpeg and zlib.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

GOLDEN_DIR = os.path.join(ROOT, "tests", "golden")
NAME = "train-000000.tar"


def build(out_dir: str) -> str:
    """Write the golden shard to out_dir/train-000000.tar; returns its path."""
    from data import synthetic
    from data.pairs import PairConfig
    from pipeline import stages

    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            synthetic.write_scene("corpus", "golden_scene", seed=7, n_frames=8, width=160, height=120)
            os.makedirs("shards")
            cfg = stages.JobConfig(input="corpus", format="synthetic", output=os.path.join(tmp, "shards"),
                                   pairs=PairConfig(min_gap=1, max_gap=6, gap_buckets=(1, 3), pairs_per_scene=2,
                                                    max_corr=200),
                                   samples_per_shard=2, max_side=160, val_fraction=0.0, seed=0)
            scan = stages.scan_scene("corpus/golden_scene", cfg)
            assert scan["ok"] and len(scan["pairs"]) == 2, scan
            plan = stages.make_plan([scan], cfg)
            assert [e["name"] for e in plan["shards"]] == [NAME], plan["shards"]
            st = stages.write_shard(plan["shards"][0], cfg)
            assert st["ok"] and st["samples"] == 2, st
            dst = os.path.join(out_dir, NAME)
            shutil.copyfile(os.path.join(tmp, "shards", NAME), dst)
        finally:
            os.chdir(cwd)
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=GOLDEN_DIR, help="folder to write train-000000.tar to")
    path = build(p.parse_args(argv).out)
    print(f"{path}: {os.path.getsize(path)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
