"""Folders the studio tests serve: a Story-Iter run in report.py's layout and a candidate
set in candidates.json's layout (pictures are flat colours, so tests know each pixel),
plus a studio server in a subprocess on a free loopback port."""
import contextlib
import json
import os
import threading
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from PIL import Image

from pipelines.candidate_sets import MANIFEST
from pipelines.candidate_sets import new_manifest as _manifest
from pipelines.candidates.scenarios import Scenario
from pipelines.run_folder import atomic_write_json, frame_path
from pipelines.world_build.studio_child import free_port

REPO = Path(__file__).resolve().parents[1]


def colour(r, i):
    return (30 * i % 256, 60 * r % 256, 200)


def make_run(root: Path, name="runs/demo", frames=25, rounds=2) -> Path:
    run = root / name
    for r in range(rounds + 1):
        for i in range(frames):
            p = frame_path(run, r, i)
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (64, 64), colour(r, i)).save(p)
    atomic_write_json(run / "manifest.json", {
        "format": "storyattn.story_iter/1",
        "config": {"backbone": "flux", "frames": frames, "rounds": rounds, "steps": 3,
                   "guidance": 3.5, "seed": 0},
        "prompts": [f"prompt of frame {i}" for i in range(frames)],
        "seeds": list(range(100, 100 + frames)),
        "rounds": {str(r): {"scale": 0.3 + 0.1 * r, "wall_s": 2.0 + r, "encoder_images": frames,
                            "cache_bytes": 3 << 20} for r in range(rounds + 1)},
        "status": "complete", "story": {"title": "Demo story"}})
    return run


def cand_value(s, k):
    """Brightness of candidate k of scenario s: the labeller's rule reads it back."""
    return (40 + 50 * k + 7 * s) % 256


def make_set(root: Path, name="sets/a", scenarios=3, k=4) -> Path:
    out = root / name
    scen = [Scenario(f"s{s}", f"scenario {s}: a fox in the snow", [Path(f"/src/{s}.png")], ["fox"])
            for s in range(scenarios)]
    m = _manifest({"model": "test", "loras": [], "candidates": k, "seed": 0, "steps": 1,
                   "height": 64, "width": 64, "guidance": 1.0}, scen)
    m["status"] = "complete"
    for s, e in enumerate(m["scenarios"]):
        for r in e["references"]:
            (out / r).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (64, 64), (200, 90, 20)).save(out / r)
        for kk, c in enumerate(e["candidates"]):
            v = cand_value(s, kk)
            Image.new("RGB", (64, 64), (v, v, v)).save(out / c["file"])
    (out / MANIFEST).write_text(json.dumps(m))
    return out


class Server:
    """``python -m pipelines.studio ROOT --port P`` in a subprocess."""

    def __init__(self, root: Path, port: int = None):
        self.root, self.port = root, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self):
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "pipelines.studio", str(self.root),
                                      "--port", str(self.port)], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"studio exited: {self.proc.stdout.read().decode()[-2000:]}")
            try:
                urllib.request.urlopen(self.url + "/api/runs", timeout=1).read()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("studio did not start in 60 s")

    def kill(self):
        """SIGKILL: no shutdown handler runs, as when the machine loses power."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@contextlib.contextmanager
def thread_server(root: Path):
    """The studio app under uvicorn in a thread (same process): yields its base URL."""
    import uvicorn

    from pipelines.studio.app import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(root), host="127.0.0.1", port=port,
                                           log_level="error"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        if not th.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        th.join(10)
