"""REPRODUCTION.md's tables are exactly what the committed command prints from the committed results."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reproduction_tables_come_from_the_committed_results_file():
    results = os.path.join(ROOT, "docs", "reproduction", "results.json")
    out = subprocess.run([sys.executable, "-m", "launch.reproduce", "--report", results], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = open(os.path.join(ROOT, "REPRODUCTION.md")).read()
    embedded = doc.split("<!-- tables:begin -->\n", 1)[1].split("\n<!-- tables:end -->", 1)[0]
    assert embedded.strip() == out.stdout.strip()


def test_results_file_summarises_the_committed_probe_files():
    from launch.reproduce import summarise

    d = os.path.join(ROOT, "docs", "reproduction")
    results = json.load(open(os.path.join(d, "results.json")))
    assert summarise(json.load(open(os.path.join(d, "probe-before.json")))) == results["before"]
    for name, summary in results["runs"].items():
        assert summarise(json.load(open(os.path.join(d, f"probe-{name}.json")))) == summary, name
    # three seeds for the main result, the two ablations
    assert set(results["runs"]) == {"main-s0", "main-s1", "main-s2", "no-depth", "last-layer"}
