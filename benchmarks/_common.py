"""Shared benchmark utilities: one FLOP counter, one timer, one memory meter,
environment capture and result writers (JSON + Markdown + PNG)."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

# STORYATTN_RESULTS_DIR redirects every benchmark's files (tools/gpu_session.py uses it
# so that a session's figures land in its output folder, not in the checkout).
RESULTS_DIR = (os.environ.get("STORYATTN_RESULTS_DIR")
               or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))


def attn_flops(B: int, Lq: int, Lkv: int, H: int, D: int, backward: bool = False) -> float:
    """Matmul FLOPs of softmax attention: 2 GEMMs of 2*Lq*Lkv*D each per head."""
    f = 4.0 * B * Lq * Lkv * H * D
    return f * 2.5 if backward else f


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, warmup: int = 1, reps: int = 5) -> float:
    """Median wall time in milliseconds (device events via do_bench on GPU)."""
    if device.startswith("cuda"):
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def time_round_robin(fns: Dict[str, Callable[[], object]], device: str, reps: int = 9
                     ) -> Dict[str, float]:
    """Median ms per method.  On CPU the methods are timed in turn, one repeat
    each per round, so slow drifts of a shared machine affect all of them alike."""
    if device.startswith("cuda"):
        return {n: time_fn(f, device) for n, f in fns.items()}
    first = {}
    for n, f in fns.items():
        t0 = time.perf_counter()
        f()
        first[n] = time.perf_counter() - t0
    # Small cases are noise-dominated: repeat until each method has ~0.5 s of samples.
    reps = max(reps, min(200, int(0.5 / max(1e-6, min(first.values())))))
    ts: Dict[str, List[float]] = {n: [] for n in fns}
    for _ in range(reps):
        for n, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[n].append((time.perf_counter() - t0) * 1e3)
    return {n: statistics.median(v) for n, v in ts.items()}


def peak_extra_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak bytes allocated *during* fn beyond what was live before it.

    CUDA: the caching allocator's peak counter.  CPU: the process's resident-set
    high-water mark (Linux), see _cpu_peak_rss_delta.  Includes the result.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        res = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del res
        return int(peak)
    return _cpu_peak_rss_delta(fn)


_MALLOC_SET = False


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _cpu_peak_rss_delta(fn) -> int:
    """CPU: resident-set high-water mark during fn minus the RSS before it (Linux).

    glibc is told to serve every block of 64 KiB or more with mmap, so a freed
    tensor leaves the resident set at once and the high-water mark (reset by
    writing 5 to /proc/self/clear_refs) sees the true peak of the call.
    """
    global _MALLOC_SET
    if not _MALLOC_SET:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_MMAP_THRESHOLD = -3
        libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
        _MALLOC_SET = True
    import gc
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kb("VmRSS")
    res = fn()
    peak = _status_kb("VmHWM")
    del res
    return max(0, peak - base) * 1024


def environment(device: str) -> Dict[str, object]:
    env = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "device": device,
        "cpu_threads": torch.get_num_threads(),
    }
    for mod in ("triton", "diffusers", "flash_attn", "xformers"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["gpu"] = None
        env["cpu"] = platform.processor() or platform.machine()
    return env


def write_results(name: str, env: Dict, rows: List[Dict], md_table: str, notes: str = "",
                  plot: Optional[Callable[[str], None]] = None,
                  out_dir: Optional[str] = None) -> List[str]:
    """Write ``{name}_{cpu|gpu}.json`` and ``.md`` (and ``.png`` with ``plot``) to ``out_dir``
    (None: ``RESULTS_DIR``); return their paths."""
    out_dir = out_dir or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    tag = "gpu" if env.get("gpu") else "cpu"
    base = os.path.join(out_dir, f"{name}_{tag}")
    with open(base + ".json", "w") as f:
        json.dump({"environment": env, "rows": rows, "notes": notes}, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(f"# {name} ({tag})\n\n")
        f.write("Environment: " + ", ".join(f"{k}={v}" for k, v in env.items() if v is not None))
        f.write("\n\n" + md_table + "\n")
        if notes:
            f.write("\n" + notes + "\n")
    paths = [base + ".json", base + ".md"]
    if plot is not None:
        try:
            import matplotlib
            matplotlib.use("Agg")
            plot(base + ".png")
            paths.append(base + ".png")
        except ImportError as e:
            print(f"(no plot: {e}; pip install matplotlib)")
    return paths


def markdown_table(headers: List[str], rows: List[List[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(headers: List[str], rows: List[List[object]]) -> str:
    cols = [headers] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cols) for i in range(len(headers))]
    fmt = lambda r: "  ".join(str(c).rjust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([fmt(headers), fmt(["-" * x for x in w])] + [fmt(r) for r in cols[1:]])
