"""Regenerate the golden clip shard `tests/golden/v2/train-000000.tar` (shard format version 2).

    python tests/golden/make_golden.py              # rewrite the committed file
    python tests/golden/make_golden.py --out DIR    # write DIR/train-000000.tar instead

Input: one synthetic room (data.synthetic, seed 7, 12 frames at 160x120, 0.1 m a frame), written
to a temporary folder and named by the relative path `corpus/golden_scene`, so that the json
`source` does not depend on where this runs. Pipeline: pipeline.stages scan -> plan -> write in
this process (no Ray), 2 clips of 3 frames in one train shard. tests/test_shard_job.py reads
the committed file back and checks that this script, run with the current code, gives the
same bytes: a change of the writer (or of the format) cannot slip in unnoticed. Bytes also
depend on Pillow's libjpeg and zlib.

`tests/golden/train-000000.tar` beside it is the last version-1 (pair) shard the pair
pipeline wrote; no code writes version 1 any more, and the tests check that it still reads.
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

GOLDEN_DIR = os.path.join(ROOT, "tests", "golden", "v2")
NAME = "train-000000.tar"


def build(out_dir: str) -> str:
    """Write the golden clip shard to out_dir/train-000000.tar; returns its path."""
    from data import synthetic
    from data.pairs import ClipConfig
    from pipeline import stages

    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            synthetic.write_scene("corpus", "golden_scene", seed=7, n_frames=12, width=160, height=120, step=0.1)
            os.makedirs("shards")
            cfg = stages.JobConfig(input="corpus", format="synthetic", output=os.path.join(tmp, "shards"),
                                   clips=ClipConfig(clip_frames=3, clip_window=8, clips_per_scene=2, max_corr=120),
                                   samples_per_shard=2, max_side=160, val_fraction=0.0, seed=0)
            scan = stages.scan_scene("corpus/golden_scene", cfg)
            assert scan["ok"] and len(scan["clips"]) == 2, scan
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
