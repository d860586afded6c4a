"""Accuracy of the nerfstudio reader's lens undistortion (run by hand; prints a table).

    python tests/benchmarks/lens_accuracy.py

A DL3DV-like scene (OPENCV camera, k1 -0.12, k2 0.02, p1 0.001, p2 -0.0015) is ray-cast
through the lens by tests/corpus_writers.py; the reader's undistorted RGB and depth are
compared with the pinhole renders of the same K, and a pair's photometric self-check
error with and without undoing the lens. tests/test_readers.py asserts bounds on the same scene.
"""
from __future__ import annotations

import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE)]

import numpy as np
from PIL import Image

LENS = (-0.12, 0.02, 0.0, 0.0, 0.001, -0.0015)


def main() -> int:
    import corpus_writers as cw
    from data import geometry, pairs
    from data.scenes.nerfstudio import NerfstudioScene

    root = tempfile.mkdtemp()
    truth = cw.write_nerfstudio_scene(root, "lens", seed=7, n_frames=4, dist=LENS)
    url = os.path.join(root, "lens")
    scene = NerfstudioScene(url)
    rows = []
    for f, rgb_true, z_true in zip(scene.frames, truth.rgb, truth.depth):
        rgb, depth = scene.load(f)
        raw = np.asarray(Image.open(os.path.join(url, f.extra["rgb"])).convert("RGB")).astype(float)
        v = (depth > 0) & (z_true > 0)
        rows.append((np.abs(rgb.astype(float) - rgb_true)[v].mean(), np.abs(raw - rgb_true)[v].mean(),
                     float(np.median(np.abs(depth[v] - z_true[v]) / z_true[v]))))

    def photo(sc, b):
        fa, fb = sc.frames[0], sc.frames[b]
        (ra, da), (rb, db) = sc.load(fa), sc.load(fb)
        tol = geometry.visibility_tolerance(sc.metric_depth, float(np.median(da[da > 0])))
        corr = pairs.correspondences(da, fa.K, fa.cam2world, db, fb.K, fb.cam2world, np.random.default_rng(0),
                                     stride=4, abs_tol=tol)
        return pairs.photo_check(ra, rb, corr, np.random.default_rng(1))[0]

    undone = [photo(scene, b) for b in (1, 2, 3)]
    for f in scene.frames:
        f.extra.pop("dist")
    ignored = [photo(scene, b) for b in (1, 2, 3)]
    r = np.array(rows)
    print(f"lens {LENS}, 4 frames of 320x240")
    print(f"{'check':<48}{'lens undone':>14}{'lens ignored':>14}")
    print(f"{'RGB error vs the pinhole view (grey levels)':<48}{r[:, 0].mean():>14.2f}{r[:, 1].mean():>14.2f}")
    print(f"{'depth, median relative error':<48}{100 * r[:, 2].mean():>13.3f}%{'':>14}")
    print(f"{'pair photo error (frames 0-1, 0-2, 0-3)':<48}{min(undone):>7.2f}-{max(undone):.2f}"
          f"{min(ignored):>8.2f}-{max(ignored):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
