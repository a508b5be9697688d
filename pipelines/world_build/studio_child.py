"""A studio in a child process on a free loopback port, for programs that label through it
(the world build's ``dpo_data`` stage, the reader labeller's tests).

``with studio_process(root) as url:`` starts ``python -m pipelines.studio ROOT --port P``
(uvicorn, the same server a person runs), waits until ``GET /api/sets`` answers, yields
``http://127.0.0.1:P`` and stops the process (SIGTERM, then SIGKILL) on the way out.
"""
from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

__all__ = ["free_port", "studio_process"]


def free_port() -> int:
    """A port nobody listens on now (the OS picks it; a race with another program binding it
    before the child does is possible but not likely on loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def studio_process(root, timeout_s: float = 60.0) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.studio", str(Path(root)),
                             "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the studio exited with code {proc.returncode}: "
                                   f"{proc.stdout.read().decode(errors='replace')[-2000:]}")
            try:
                urllib.request.urlopen(url + "/api/sets", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the studio did not answer at {url} within "
                                       f"{timeout_s:.0f} s") from None
                time.sleep(0.1)
        yield url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        proc.stdout.close()
