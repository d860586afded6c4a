"""REPRODUCTION.md's tables are exactly what the committed command prints from the committed results."""
import json
import os
import subprocess
import sys

import pytest

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


# ----------------------------------------------------------------------------- v2 (launch/reproduce2.py)

V2 = os.path.join(ROOT, "docs", "reproduction", "v2")


def test_v2_tables_come_from_the_committed_results_file():
    out = subprocess.run([sys.executable, "-m", "launch.reproduce2", "--report", os.path.join(V2, "results.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = open(os.path.join(ROOT, "REPRODUCTION.md")).read()
    embedded = doc.split("<!-- v2:tables:begin -->\n", 1)[1].split("\n<!-- v2:tables:end -->", 1)[0]
    assert embedded.strip() == out.stdout.strip()


def test_v2_results_summarise_the_committed_probe_files_of_the_default_command():
    """Every run's summary is recomputed from its committed val and test probe.json; the results were made by
    the plain command (`python -m launch.reproduce2`, every setting at its default) with every run."""
    from dataclasses import asdict

    from launch.reproduce2 import RUNS, Repro2Args, summarise_pair

    results = json.load(open(os.path.join(V2, "results.json")))
    defaults = asdict(Repro2Args())
    assert {k: v for k, v in results["config"].items() if k != "output"} == \
        {k: v for k, v in defaults.items() if k != "output"}
    assert set(results["runs"]) == set(RUNS)

    def load(name, split):
        return json.load(open(os.path.join(V2, f"probe-{name}-{split}.json")))

    assert summarise_pair(load("start", "val"), load("start", "test")) == results["untrained"]
    for name, summary in results["runs"].items():
        assert summarise_pair(load(name, "val"), load(name, "test")) == summary, name
        # each test probe reports the layer its own val probe chose
        assert summary["head_layer"] == summary["val_layer"]["head"], name


def test_v2_figure_is_drawn_from_the_committed_probe_files(tmp_path):
    import shutil

    for name in ("start", "corr-only", "full-s0"):
        shutil.copy(os.path.join(V2, f"probe-{name}-test.json"), tmp_path)
    out = subprocess.run([sys.executable, "-m", "launch.reproduce2", "--figure", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert os.path.getsize(tmp_path / "three_panels.png") > 10_000
    assert os.path.isfile(os.path.join(V2, "three_panels.png"))


@pytest.mark.parametrize("flags,want", [
    (["--runs", "full-s0,bogus"], "--runs: unknown bogus"),
    (["--scenes", "4"], "leaves a split without scenes"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--report", "/nonexistent/results.json"], "no such file"),
])
def test_v2_bad_flags_fail_in_one_line(flags, want):
    out = subprocess.run([sys.executable, "-m", "launch.reproduce2", *flags], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert want in out.stderr and "Traceback" not in out.stderr


def test_v2_refuses_a_work_folder_of_other_settings(tmp_path):
    """Results made under other settings are never reused: the command refuses before any work."""
    (tmp_path / "repro2_args.json").write_text(json.dumps({"steps": 1}))
    out = subprocess.run([sys.executable, "-m", "launch.reproduce2", "--output", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "holds results of other settings" in out.stderr and "steps 1 -> 450" in out.stderr
    assert sorted(os.listdir(tmp_path)) == ["repro2_args.json"]


# ----------------------------------------------------------------------------- v2, the pretrained part
# (launch/reproduce2_pretrained.py)

V2P = os.path.join(ROOT, "docs", "reproduction", "v2", "pretrained")


def test_v2_pretrained_tables_come_from_the_committed_results_file():
    out = subprocess.run([sys.executable, "-m", "launch.reproduce2_pretrained", "--report",
                          os.path.join(V2P, "results.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = open(os.path.join(ROOT, "REPRODUCTION.md")).read()
    embedded = doc.split("<!-- v2-pretrained:tables:begin -->\n", 1)[1].split("\n<!-- v2-pretrained:tables:end -->",
                                                                              1)[0]
    assert embedded.strip() == out.stdout.strip()


def test_v2_pretrained_results_summarise_the_committed_probe_files_of_the_default_command():
    """Every model's summary is recomputed from its committed val and test probe.json; the results were made
    by the plain command (every setting at its default), on the tiny part's data settings."""
    from dataclasses import asdict

    from launch.reproduce2 import Repro2Args, Repro2Data
    from launch.reproduce2_pretrained import MODELS, PretrainedArgs, summarise_model

    results = json.load(open(os.path.join(V2P, "results.json")))
    defaults = asdict(PretrainedArgs())
    assert {k: v for k, v in results["config"].items() if k != "output"} == \
        {k: v for k, v in defaults.items() if k != "output"}
    # the same clips and instruction set as the tiny part (the same data settings, at their defaults)
    tiny = json.load(open(os.path.join(V2, "results.json")))["config"]
    assert {k: results["config"][k] for k in asdict(Repro2Data())} == {k: tiny[k] for k in asdict(Repro2Data())}
    assert set(asdict(Repro2Data())) < set(asdict(Repro2Args()))
    assert set(results["models"]) == set(MODELS)

    def load(name, split):
        return json.load(open(os.path.join(V2P, f"probe-{name}-{split}.json")))

    for name, summary in results["models"].items():
        assert summarise_model(load(name, "val"), load(name, "test")) == summary, name
        assert summary["raw_layer"] == summary["val_layer"]["raw"], name
        # every model is scored on the same test clips, with its projector row (the LM's input)
        assert summary["anchors"] == results["models"]["warmup"]["anchors"] and summary["projector"], name
        assert bool(summary.get("head_best")) == MODELS[name][1], name


def test_v2_pretrained_figure_is_drawn_from_the_committed_probe_files(tmp_path):
    import shutil

    from launch.reproduce2_pretrained import FIGURE_MODELS

    for _, name in FIGURE_MODELS:
        shutil.copy(os.path.join(V2P, f"probe-{name}-test.json"), tmp_path)
    out = subprocess.run([sys.executable, "-m", "launch.reproduce2_pretrained", "--figure", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert os.path.getsize(tmp_path / "three_panels.png") > 10_000
    assert os.path.isfile(os.path.join(V2P, "three_panels.png"))


@pytest.mark.parametrize("flags,want", [
    (["--image-size", "100"], "--image-size must be a multiple of 14"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--warmup-lr", "0"], "--warmup-lr must be > 0"),
    (["--scenes", "4"], "leaves a split without scenes"),
    (["--report", "/nonexistent/results.json"], "no such file"),
])
def test_v2_pretrained_bad_flags_fail_in_one_line(flags, want):
    out = subprocess.run([sys.executable, "-m", "launch.reproduce2_pretrained", *flags], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert want in out.stderr and "Traceback" not in out.stderr


def test_v2_pretrained_refuses_a_work_folder_of_other_settings(tmp_path):
    (tmp_path / "repro2_pretrained_args.json").write_text(json.dumps({"steps": 1}))
    out = subprocess.run([sys.executable, "-m", "launch.reproduce2_pretrained", "--output", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "holds results of other settings" in out.stderr and "steps 1 -> 120" in out.stderr
    assert sorted(os.listdir(tmp_path)) == ["repro2_pretrained_args.json"]


def test_a_failed_step_names_the_command_the_user_ran():
    """The reproductions share the demo's step runner: a failing step ends the command in one line that
    names that command (not "demo") and the step."""
    from launch.demo import run

    with pytest.raises(SystemExit) as e:
        run([sys.executable, "-c", "import sys; sys.exit(3)"], prog="python -m launch.reproduce2_pretrained")
    assert str(e.value).startswith("python -m launch.reproduce2_pretrained: step failed (exit 3): ")
    with pytest.raises(SystemExit) as e:
        run([sys.executable, "-c", "import sys; sys.exit(4)"])
    assert str(e.value).startswith("demo: step failed (exit 4): ")


@pytest.mark.parametrize("module,other", [("launch.reproduce2", V2P), ("launch.reproduce2_pretrained", V2)])
def test_report_of_the_other_parts_results_fails_in_one_line(module, other):
    out = subprocess.run([sys.executable, "-m", module, "--report", os.path.join(other, "results.json")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert f"python -m {module}: error: --report" in out.stderr and "not a results.json" in out.stderr
    assert "Traceback" not in out.stderr
