"""tools/gpu_session.py: the lent-GPU pass keeps to its budgets and keeps what it measured.

The whole dry run (every stage on the CPU at toy sizes) is a CI step in .ci/run; these
tests check the parts that make the script safe to hand to a short lease."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import gpu_session  # noqa: E402


def test_a_stage_over_its_budget_is_killed_with_its_children(tmp_path):
    t0 = time.monotonic()
    with open(tmp_path / "log", "w") as log:
        # the shell's child (sleep) must die too: the process group is killed
        rc, timed_out = gpu_session._run_one("sleep 30 & sleep 30; wait", {}, 1.0, log)
    assert timed_out and rc is None
    assert time.monotonic() - t0 < 15


def test_gpu_test_files_are_every_file_with_gpu_tests():
    has_gpu = sorted(p.name for p in (REPO / "tests").glob("test_*.py")
                     if p.name != Path(__file__).name and "pytest.mark.gpu" in p.read_text())
    assert sorted(gpu_session.GPU_TEST_FILES) == has_gpu


def _session(tmp_path, *args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "gpu_session.py"), *args,
                           "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=300, cwd=REPO,
                          env={"PATH": "/usr/bin:/bin", "GPU_SESSION_WORK": str(tmp_path / "w")})


def test_unknown_stage_is_one_line(tmp_path):
    r = _session(tmp_path, "--only", "device,nope")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "unknown stage nope" in r.stderr


def test_spent_budget_skips_stages_and_still_writes_the_summary(tmp_path):
    r = _session(tmp_path, "--dry-run", "--only", "device,bench_op", "--budget", "5")
    assert r.returncode == 1, r.stdout + r.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(s["stage"], s["status"]) for s in summary["stages"]] == [
        ("device", "skipped"), ("bench_op", "skipped")]
    assert (tmp_path / "out" / "results.tgz").is_file()


def test_device_stage_runs_and_records(tmp_path):
    r = _session(tmp_path, "--dry-run", "--only", "device", "--budget", "120")
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["stages"][0]["status"] == "ok"
    log = (tmp_path / "out" / "session.log").read_text()
    assert "torch 2." in log and "backends [" in log
