"""The house rules, checked on the source (no imports are executed).

Layers, top to bottom; a module may import its own layer (without closing a circle) and the
layers below it, never one above:

  5  benchmarks/, tools/             scripts
  4  pipelines/<program>/            story_iter, train, candidates, studio, world_build;
                                     a program never imports another program
  3  pipelines/*.py, pipelines/<shared package>/
                                     shared modules, the backbones, the story world and the
                                     ViStoryBench adapter (world and vistorybench carry a
                                     small command of their own that imports nothing above)
  2  storyattn/                      public API, handles, processors, caches
  1  storyattn/backends/             one registry for every op, custom ops
  0  storyattn/kernels/, storyattn._C launch code only

An import is every ``import``/``from`` statement anywhere in a module (function-level ones
too: they run sooner or later) and every module named by a string in a module that calls
``importlib.import_module`` (the registry loads its backends that way, and a circle through a
string is still a circle).  ``python tests/test_house.py`` prints the numbers.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
TREES = ("storyattn", "pipelines", "benchmarks", "tools")
MAX_LINES = 600
PROGRAMS = ("story_iter", "train", "candidates", "studio", "world_build")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> Dict[str, Path]:
    found = {}
    for tree in TREES:
        for path in sorted((ROOT / tree).rglob("*.py")):
            found[module_name(path)] = path
    return found


# compiled, so no .py to read: a leaf of layer 0 (built from csrc/ by setup.py)
COMPILED = {"storyattn._C"}


def layer(mod: str) -> int:
    parts = mod.split(".")
    if parts[0] in ("benchmarks", "tools"):
        return 5
    if parts[0] == "pipelines":
        return 4 if len(parts) > 1 and parts[1] in PROGRAMS else 3
    if parts[:2] in (["storyattn", "kernels"], ["storyattn", "_C"]):
        return 0
    if parts[:2] == ["storyattn", "backends"]:
        return 1
    return 2


def program(mod: str):
    parts = mod.split(".")
    return parts[1] if parts[0] == "pipelines" and len(parts) > 1 and parts[1] in PROGRAMS else None


def _package(mod: str, path: Path) -> str:
    return mod if path.name == "__init__.py" else mod.rpartition(".")[0]


def _resolve(name: str, known: Set[str]) -> str:
    """The longest known module that ``name`` names (``a.b.attr`` -> ``a.b``), or ''."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name


def imports_of(mod: str, path: Path, known: Set[str]) -> Set[str]:
    tree = ast.parse(path.read_text(), str(path))
    pkg = _package(mod, path)
    scripts = mod.split(".")[0] in ("benchmarks", "tools")  # `import _common` is a sibling
    out: Set[str] = set()

    def absolute(name: str, level: int) -> str:
        if not level:
            return name
        base = pkg.split(".")
        base = base[:len(base) - (level - 1)]
        return ".".join(base + ([name] if name else []))

    def add(name: str) -> None:
        target = _resolve(name, known)
        if not target and scripts:
            target = _resolve(f"{mod.rpartition('.')[0]}.{name}", known)
        if target and target != mod:
            out.add(target)

    dynamic = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom):
            base = absolute(node.module or "", node.level)
            for a in node.names:  # `from pkg import submodule` imports the submodule
                add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
        elif isinstance(node, ast.Call):
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            dynamic |= fname in ("import_module", "__import__")
    if dynamic:
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                s = node.value
                if s.startswith(".") and s.strip(".").replace(".", "").isidentifier():
                    level = len(s) - len(s.lstrip("."))
                    add(absolute(s.lstrip("."), level))
                elif s in known:
                    add(s)
    return out


def graph() -> Dict[str, Set[str]]:
    mods = modules()
    known = set(mods) | COMPILED
    g = {m: imports_of(m, p, known) for m, p in mods.items()}
    g.update({m: set() for m in COMPILED})
    return g


def circles(g: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    found: List[List[str]] = []
    counter = 0
    for start in sorted(g):
        if start in index:
            continue
        work: List[Tuple[str, list]] = [(start, sorted(g[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, todo = work[-1]
            if todo:
                w = todo.pop()
                if w not in g:
                    continue
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, sorted(g[w])))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def upward(g: Dict[str, Set[str]]) -> List[Tuple[str, str]]:
    return sorted((a, b) for a, bs in g.items() for b in bs if layer(b) > layer(a))


def across_programs(g: Dict[str, Set[str]]) -> List[Tuple[str, str]]:
    return sorted((a, b) for a, bs in g.items() for b in bs
                  if program(a) and program(b) and program(a) != program(b))


def long_files() -> List[Tuple[int, str]]:
    sizes = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0].startswith(".") or "build" in rel.parts[:1]:
            continue
        sizes.append((len(path.read_text().splitlines()), str(rel)))
    return sorted(sizes, reverse=True)


def test_no_import_circles():
    assert circles(graph()) == []


def test_imports_only_run_downward():
    assert upward(graph()) == []


def test_no_program_imports_another_program():
    assert across_programs(graph()) == []


def test_no_file_over_the_limit():
    assert [f for f in long_files() if f[0] > MAX_LINES] == []


def test_the_checker_sees_function_level_and_importlib_imports():
    # the rules are only as good as the graph: a module named in a string handed to
    # importlib, a function-level import and a relative one must all be edges
    g = graph()
    assert "storyattn.backends.torch_backend" in g["storyattn.backends"]
    assert "pipelines.story_iter.run" in g["pipelines.story_iter.cli"]  # inside main()
    assert "storyattn.grca" in g["storyattn"]                            # the lazy exports


def test_the_checker_finds_a_circle_and_an_upward_import():
    g = {"storyattn.a": {"storyattn.b"}, "storyattn.b": {"storyattn.a", "pipelines.x"},
         "pipelines.x": set()}
    assert circles(g) == [["storyattn.a", "storyattn.b"]]
    assert upward(g) == [("storyattn.b", "pipelines.x")]
    assert across_programs({"pipelines.train.a": {"pipelines.studio.b"}}) == [
        ("pipelines.train.a", "pipelines.studio.b")]


if __name__ == "__main__":
    g = graph()
    cs, up, cross = circles(g), upward(g), across_programs(g)
    print(f"modules {len(g)}, imports {sum(map(len, g.values()))}")
    print(f"circles {len(cs)}")
    for c in cs:
        print("  ", " <-> ".join(c))
    print(f"upward imports {len(up)}")
    for a, b in up:
        print(f"   {a} ({layer(a)}) -> {b} ({layer(b)})")
    print(f"program -> program imports {len(cross)}")
    for a, b in cross:
        print(f"   {a} -> {b}")
    files = long_files()
    print(f"files over {MAX_LINES} lines {sum(n > MAX_LINES for n, _ in files)}; largest:")
    for n, f in files[:8]:
        print(f"   {n:5d} {f}")
    sys.exit(1 if cs or up or cross else 0)
