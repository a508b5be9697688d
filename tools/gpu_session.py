"""One short pass over everything that needs a CUDA GPU, sized for a lent machine.

GPU machines come rarely and for a few minutes (this project gets 15 minutes of device
time in all, machine start included, at most 10 per command), so the pass is a list of
stages in priority order, each with a time budget that is enforced, and a budget for the
whole run (default 540 s = 9 min).  A stage that overruns is killed and marked
``timeout``; the next one still runs if time is left.  Results are written under the
output folder as each stage ends, so a run cut short keeps what it measured:

    OUT/summary.json    one entry per stage: status, seconds, budget, return code
    OUT/session.log     every stage's output, in order
    OUT/results.tgz     what the stages wrote (benchmark JSON/Markdown/PNG, build log)

Three files only: the device tool brings back at most 8 files from OUT.

    bash tools/gpu_session.sh                 # on the GPU machine, from the repo root
    bash tools/gpu_session.sh --dry-run       # every stage on the CPU at toy sizes
    bash tools/gpu_session.sh --only device,build --budget 120

``--dry-run`` exists so that the script is known to work before a GPU is lent: the test
run executes it (tests/test_gpu_session.py).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_DEVICE_PY = r"""
import importlib, platform, sys, torch
print("python", sys.version.split()[0], platform.machine())
print("torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), f"cc {p.major}.{p.minor}",
          f"{p.total_memory / 2**30:.1f} GiB", f"{p.multi_processor_count} SMs")
else:
    print("device cpu (no CUDA device)")
for name in ("triton", "diffusers", "transformers", "peft", "accelerate", "safetensors",
             "flash_attn", "xformers", "storyattn"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"), getattr(m, "__file__", ""))
    except Exception as e:  # a missing optional package is a fact to record, not a failure
        print(name, "missing:", type(e).__name__, str(e).splitlines()[0][:120])
import storyattn
print("backends", storyattn.available_backends())
"""

_EXT_PY = ("import storyattn._C as c, storyattn; print('storyattn._C', c.__file__); "
           "print('backends', storyattn.available_backends())")


# the files that hold tests marked gpu (tests/test_gpu_session.py checks this list)
GPU_TEST_FILES = ("test_cuda_ext.py", "test_segment_attention.py",
                  "test_segment_attention_triton.py", "test_qk_norm_rope.py")


@dataclass
class Stage:
    name: str
    budget_s: int
    gpu: list          # commands (argv lists or shell strings) run on the GPU machine
    dry: list          # the same stage on the CPU at toy sizes
    why: str
    keep_going: bool = False   # run the stage's later commands after one fails


def _py() -> str:
    return os.environ.get("PYTHON", sys.executable)


def stages() -> list[Stage]:
    py = _py()
    return [
        Stage("device", 30,
              [["nvidia-smi"], [py, "-c", _DEVICE_PY]],
              [[py, "-c", _DEVICE_PY]],
              "device, driver and library versions"),
        Stage("build", 200,
              # in place: storyattn/_C*.so beside the sources, no install needed
              [f"STORYATTN_FORCE_CUDA_BUILD=1 TORCH_CUDA_ARCH_LIST=${{TORCH_CUDA_ARCH_LIST:-9.0}} "
               f"MAX_JOBS=${{MAX_JOBS:-16}} {shlex.quote(py)} setup.py build_ext --inplace "
               f"> \"$RESULTS/build.log\" 2>&1; rc=$?; tail -25 \"$RESULTS/build.log\"; exit $rc",
               [py, "-c", _EXT_PY]],
              # no CUDA torch here: compile one real source for sm_90 with nvcc (the
              # whole csrc/ check is tools/check_cuda_compile.sh, which CI runs)
              ["if command -v nvcc >/dev/null; then nvcc -std=c++17 -arch=sm_90 -c "
               "csrc/merge_states.cu -o \"$RESULTS/merge_states.o\" && ls -la \"$RESULTS\"/*.o; "
               "else echo 'no nvcc here: build stage not exercised'; fi"],
              "build storyattn._C (csrc/) for sm_90"),
        # One process per file: a CUDA fault is sticky for the process that hit it, so one
        # bad kernel must not turn every later test into an error.
        Stage("gpu_tests", 180,
              [[py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"tests/{f}"]
               for f in GPU_TEST_FILES],
              # on the CPU every gpu test skips with its reason: collection and markers
              [[py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                "tests/test_segment_attention.py", "tests/test_qk_norm_rope.py"]],
              "every test marked gpu", keep_going=True),
        Stage("bench_op", 75,
              [[py, "benchmarks/bench_gsa.py", "--reps", "5", "--no-flex"]],
              [[py, "benchmarks/bench_gsa.py", "--smoke", "--cpu", "--no-flex",
                            "--reps", "1"]],
              "segment attention at FLUX sizes against concat+SDPA, flash, FlexAttention"),
        Stage("bench_e2e", 90,
              [[py, "benchmarks/bench_gsa_e2e.py"]],
              [[py, "benchmarks/bench_gsa_e2e.py", "--smoke", "--cpu", "--reps", "1",
                            "--no-memory"]],
              "one denoising step: in-batch vs cached replay vs per-step concatenation"),
        Stage("bench_train", 60,
              [[py, "benchmarks/bench_train.py"]],
              [[py, "benchmarks/bench_train.py", "--config", "tiny", "--device", "cpu",
                            "--reps", "1"]],
              "a LoRA train step: storyattn attention vs naive concatenation"),
        Stage("bench_cuda", 60,
              [[py, "benchmarks/bench_cuda.py"]],
              [[py, "benchmarks/bench_cuda.py", "--quick"]],
              "csrc kernels vs triton vs naive (needs the build stage)"),
    ]


def _run_one(cmd, env, budget: float, log) -> tuple[int | None, bool]:
    """Run one command in its own process group; kill the group at the budget."""
    shell = isinstance(cmd, str)
    log.write(f"$ {cmd if shell else shlex.join(cmd)}\n")
    log.flush()
    p = subprocess.Popen(cmd, shell=shell, cwd=ROOT, env=env, stdout=log,
                         stderr=subprocess.STDOUT, start_new_session=True,
                         executable="/bin/bash" if shell else None)
    try:
        return p.wait(timeout=max(1.0, budget)), False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        return None, True


def _save(out: Path, results: Path, summary: dict) -> None:
    """Write what is known so far; each file is replaced atomically."""
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out / "summary.json")
    tmp = out / ".results.tgz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(results, arcname="results")
    os.replace(tmp, out / "results.tgz")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="run every stage on the CPU at toy sizes (no GPU needed)")
    ap.add_argument("--budget", type=float, default=540.0,
                    help="seconds for the whole run (default 540 = 9 min)")
    ap.add_argument("--only", default="", help="comma-separated stage names")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_out",
                    help="output folder (default $OUT, else gpu_out)")
    args = ap.parse_args(argv)

    all_stages = stages()
    names = [s.name for s in all_stages]
    chosen = [n for n in args.only.split(",") if n] or names
    bad = [n for n in chosen if n not in names]
    if bad:
        print(f"gpu_session: unknown stage {', '.join(bad)}; stages: {', '.join(names)}",
              file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results" if args.dry_run else ROOT / "gpu_results"
    results = Path(os.environ.get("GPU_SESSION_WORK", results)).resolve()
    results.mkdir(parents=True, exist_ok=True)

    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in
                                        env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["STORYATTN_RESULTS_DIR"] = str(results)   # benchmarks write here, not into the repo
    env["RESULTS"] = str(results)
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["TRITON_INTERPRET"] = "1"

    t_start = time.monotonic()
    summary = {"mode": "dry-run" if args.dry_run else "gpu", "budget_s": args.budget,
               "started": time.strftime("%Y-%m-%d %H:%M:%S"), "stages": []}
    with open(out / "session.log", "a") as log:
        for st in all_stages:
            if st.name not in chosen:
                continue
            left = args.budget - (time.monotonic() - t_start)
            budget = min(st.budget_s, left)
            entry = {"stage": st.name, "what": st.why, "budget_s": round(budget, 1)}
            if budget < 10:
                entry.update(status="skipped", reason="whole-run budget spent")
                summary["stages"].append(entry)
                print(f"[{st.name}] skipped: the whole-run budget is spent", flush=True)
                _save(out, results, summary)
                continue
            log.write(f"\n===== {st.name} (budget {budget:.0f} s): {st.why}\n")
            print(f"[{st.name}] {st.why} (budget {budget:.0f} s)", flush=True)
            t0 = time.monotonic()
            status, rc = "ok", 0
            for cmd in (st.dry if args.dry_run else st.gpu):
                rc, timed_out = _run_one(cmd, env, budget - (time.monotonic() - t0), log)
                if timed_out:
                    status = "timeout"
                    break
                if rc != 0:
                    status = "failed"
                    if not st.keep_going:
                        break
            entry.update(status=status, rc=rc, seconds=round(time.monotonic() - t0, 1))
            log.write(f"===== {st.name}: {status} in {entry['seconds']} s\n")
            log.flush()
            summary["stages"].append(entry)
            summary["elapsed_s"] = round(time.monotonic() - t_start, 1)
            _save(out, results, summary)
            print(f"[{st.name}] {status} in {entry['seconds']} s", flush=True)
    bad = [e["stage"] for e in summary["stages"] if e["status"] not in ("ok",)]
    print(f"gpu_session: {len(summary['stages']) - len(bad)}/{len(summary['stages'])} stages ok "
          f"in {summary.get('elapsed_s', 0)} s; results in {out}", flush=True)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
