"""How much position alone predicts correspondence on synthetic clips of each camera motion (by hand).

    python tests/benchmarks/position_baseline.py                       # walk, orbit, sweep; K = 8, window 48
    python tests/benchmarks/position_baseline.py --motions orbit --scenes 12 --json runs/position_baseline.json

For each motion of `data.synthetic` (MOTIONS) it renders `--scenes` rooms with per-pixel object
ids, shards them into K-frame clips in windows of `--clip-window` (the shard job's own stages, in
this process), and probes the untrained tiny preset on them without heads (`launch/probe_lib`).
It prints, per motion, chance and the same-cell baseline (the anchor's own grid position in B as
the guess: what a purely positional feature scores) at PCK@0, @1 and @2patch, the largest frame
distance scored, and the look-alike subset (anchors whose B shows a look-alike of their object at
another depth) with its same-cell baseline. Issue [9 of 12] asks for data where the same-cell
baseline's PCK@2patch is at most 0.15. Corpora and shards are cached under --work per setting.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build(work: str, motion: str, args) -> str:
    """Shards of `args.scenes` rooms of this motion (cached); returns the shard folder."""
    from data import synthetic
    from data.pairs import ClipConfig
    from data.scenes import list_scenes
    from pipeline import stages

    tag = (f"{motion}_s{args.scenes}_f{args.frames}_{args.width}x{args.height}_k{args.clip_frames}"
           f"_w{args.clip_window}_c{args.clips_per_scene}_o{args.max_overlap}_fov{args.hfov:g}")
    corpus, out = os.path.join(work, tag, "corpus"), os.path.join(work, tag, "shards")
    if glob.glob(os.path.join(out, "train-*.tar")):
        return out
    for i in range(args.scenes):
        if not os.path.isfile(os.path.join(corpus, f"scene_{i:04d}", "cameras.json")):
            synthetic.write_scene(corpus, f"scene_{i:04d}", seed=7000 + i, n_frames=args.frames, width=args.width,
                                  height=args.height, motion=motion, objects=True, hfov=args.hfov)
        print(f"[baseline] {motion}: rendered {i + 1}/{args.scenes} scenes", flush=True)
    cfg = stages.JobConfig(input=corpus, format="synthetic", output=out,
                           clips=ClipConfig(clip_frames=args.clip_frames, clip_window=args.clip_window,
                                            clips_per_scene=args.clips_per_scene, max_overlap=args.max_overlap),
                           samples_per_shard=16, max_side=max(args.width, args.height), val_fraction=0.0)
    os.makedirs(out, exist_ok=True)
    scans = [stages.scan_scene(u, cfg) for u in list_scenes(corpus, "synthetic")]
    plan = stages.make_plan(scans, cfg)
    for entry in plan["shards"]:
        st = stages.write_shard(entry, cfg)
        if not st["ok"]:
            raise SystemExit(f"shard {entry['name']} failed: {st}")
    stages.write_json(os.path.join(out, "plan.json"), plan)
    return out


def measure(shards: str, out: str, max_pixels: int) -> dict:
    from launch.probe_lib import ProbeArgs, run_probe

    res = run_probe(ProbeArgs(preset="tiny", shards=[shards], output=out, head=False, mlflow=False, split="train",
                              max_pixels=max_pixels, num_workers=0), emit=lambda s: None)
    raw = res["raw"]
    la = raw.get("lookalike") or {}
    dts = sorted({d for layer in raw["layers"][:1] for c in layer["temporal"].values() for d in c["dt"]})
    return {"clips": res["data"]["clips"], "pairs": res["data"]["pairs"], "anchors": res["data"]["anchors"],
            "chance": res["chance"], "same_cell": {k: res["baselines"]["same_cell"][k] for k in
                                                   ("pck0", "pck1", "pck2patch")},
            "dt_max": max(dts) if dts else None, "dt_n": len(dts),
            "lookalike_anchors": la.get("n_anchors"), "lookalike_same_cell_pck2patch": la.get("same_cell_pck2patch"),
            "lookalike_chance2": la.get("chance2")}


def main(argv: list[str] | None = None) -> int:
    from data.synthetic import MOTIONS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--motions", default=",".join(MOTIONS))
    ap.add_argument("--scenes", type=int, default=6)
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--clip-frames", type=int, default=8)
    ap.add_argument("--clip-window", type=int, default=48)
    ap.add_argument("--clips-per-scene", type=int, default=4)
    ap.add_argument("--max-overlap", type=float, default=0.98, help="the shard job's --max-overlap (near-duplicates)")
    ap.add_argument("--hfov", type=float, default=70.0, help="horizontal field of view of the rendered rooms, degrees")
    ap.add_argument("--max-pixels", type=int, default=448 * 336, help="per-view budget (448x336: 16x12 cells)")
    ap.add_argument("--work", default=os.path.join(ROOT, "runs", "position_baseline"))
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    motions = [m for m in args.motions.split(",") if m]
    bad = [m for m in motions if m not in MOTIONS]
    if bad:
        ap.error(f"--motions: unknown {', '.join(bad)}; choose from {', '.join(MOTIONS)}")
    rows = {}
    for m in motions:
        shards = build(args.work, m, args)
        rows[m] = measure(shards, os.path.join(args.work, f"probe_{m}"), args.max_pixels)
    f = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    print(f"\nPosition alone on synthetic clips (K = {args.clip_frames}, window {args.clip_window}, max overlap "
          f"{args.max_overlap}, hfov {args.hfov:g}, {args.scenes} rooms "
          f"x {args.frames} frames at {args.width}x{args.height}, {args.max_pixels} px views)")
    print("motion  clips  pairs  anchors  dt max | chance @0/@1/@2p        | same-cell @0/@1/@2p     | "
          "look-alike anchors, same-cell @2p, chance @2p")
    for m, r in rows.items():
        c, s = r["chance"], r["same_cell"]
        print(f"{m:6s} {r['clips']:6d} {r['pairs']:6d} {r['anchors']:8d} {r['dt_max'] or 0:6d} | "
              f"{f(c['pck0'])} {f(c['pck1'])} {f(c['pck2patch'])}  | {f(s['pck0'])} {f(s['pck1'])} "
              f"{f(s['pck2patch'])}  | {r['lookalike_anchors']}, {f(r['lookalike_same_cell_pck2patch'])}, "
              f"{f(r['lookalike_chance2'])}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"config": vars(args), "motions": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
