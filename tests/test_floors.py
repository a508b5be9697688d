"""The declared lowest versions are the tested ones: setup.py and tools/floors.txt (what
tools/check_floors.sh installs and tests, a CI step) name the same floors."""
import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _setup_floors():
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            reqs = ast.literal_eval(node.value)
            break
    else:
        raise AssertionError("setup.py has no install_requires")
    floors = {}
    for r in reqs:
        m = re.match(r"^([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)", r)
        if m:
            floors[m.group(1).lower()] = m.group(2)
    return floors


def _tested_floors():
    out = {}
    for line in (REPO / "tools" / "floors.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, ver = line.split("==")
            out[name.strip().lower()] = ver.strip()
    return out


def test_every_declared_floor_is_the_tested_one():
    declared, tested = _setup_floors(), _tested_floors()
    torch_floor = declared.pop("torch")     # the named exception: README says what ran
    assert torch_floor
    norm = lambda d: {k: tuple(int(x) for x in v.split(".")) + (0,) * (3 - v.count(".") - 1)
                      for k, v in d.items()}  # noqa: E731
    assert norm(declared) == norm(tested)
