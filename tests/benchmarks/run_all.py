"""`make bench`: every CPU benchmark in turn, each printing its table (run by hand, never in CI).

GPU ones are run separately on a GPU machine:
    python tests/benchmarks/bench_head.py --device cuda --shape 7b
    python tests/benchmarks/gpu_mfu.py --shape 3b --trainable full --pairs 16
    bash tests/benchmarks/gpu_session.sh      # all GPU measurements of issue [7 of 10] in one go
"""
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHES = ["bench_shard.py", "bench_readers.py", "bench_stream.py", "bench_head.py", "bench_vision.py",
           "bench_syncs.py", "lens_accuracy.py", "bench_plan.py", "bench_train.py", "bench_instruct.py",
           "bench_assembled.py"]


def main() -> int:
    failed = []
    for name in BENCHES:
        print(f"\n######## {name} ########", flush=True)
        t0 = time.time()
        rc = subprocess.run([sys.executable, os.path.join(HERE, name)]).returncode
        print(f"######## {name}: exit {rc}, {time.time() - t0:.0f}s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
