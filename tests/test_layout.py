"""The house rules, read from the code's own imports (ast): no import cycle, dependencies point one
way between packages, nothing imports the CLI, modules stay small, no private name crosses a module,
and the README's test command is the one CI runs.

Every ``import`` counts, including the ones inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import re
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "klip_med"

LAYERS = {
    "score": set(),
    "physics": set(),
    "data": set(),
    "sampling": {"score"},
    "priors": {"score", "sampling", "physics", "data"},
    "calibration": {"score", "priors"},
    "io": {"score", "calibration"},
    "pipeline": {"score", "sampling", "physics", "priors", "data", "calibration", "io"},
    "monai": {"score", "physics", "priors", "calibration", "io", "pipeline"},
    "eval": {"score", "sampling", "physics", "priors", "data", "calibration", "io", "pipeline"},
    "bench": {"score", "sampling", "physics", "priors", "data", "calibration", "io", "pipeline"},
    "cli": {"score", "sampling", "physics", "priors", "data", "calibration", "io", "pipeline", "monai", "eval",
            "bench"},
}
"""Which packages of ours each package may import (besides ``errors``, ``_atomic`` and the package root)."""
BASE = {"errors", "_atomic", ""}
"""Importable from everywhere: the error type, atomic writes, ``klip_med`` itself (``__version__``)."""
SAMPLING_FROM_SCORE = {"klip_med.score.events"}
"""``sampling`` speaks to the estimator through the step event only."""
MAX_LINES = 400
TOP_LEVEL = {"errors", "_atomic", "__init__", "__main__"}


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root / klip_med``."""
    out = {}
    for f in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(f.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _resolve(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    """``(edges, private)``: module -> modules of ours it imports; and ``"a imports _x from b"`` lines."""
    mods = modules(root)
    edges: dict[str, set[str]] = defaultdict(set)
    private = []
    for name, path in mods.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[tuple[str, str | None]] = []
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node, name, is_package)
                targets = [((f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base), a.name) for a in node.names]
            for target, imported in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if not target or target == name or not target.startswith(PACKAGE):
                    continue
                if is_package and target.startswith(name + "."):  # a package re-exporting its own children
                    continue
                edges[name].add(target)
                if imported and imported.startswith("_") and not imported.startswith("__"):
                    private.append(f"{name} imports {imported} from {target}")
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    return found


def package_of(module: str) -> str:
    """``klip_med.score.kl`` -> ``score``; top-level modules -> their name; the root -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def problems(root: Path) -> list[str]:
    """Every broken rule of the tree at ``root``, one line each (empty when the house holds)."""
    edges, private = import_graph(root)
    out = [f"import cycle: {' <-> '.join(c)}" for c in cycles(edges)]
    package_edges: dict[str, set[str]] = defaultdict(set)
    for a, targets in edges.items():
        for b in targets:
            if package_of(a) != package_of(b):
                package_edges[package_of(a)].add(package_of(b))
    out += [f"package cycle: {' <-> '.join(c)}" for c in cycles(package_edges)]
    for a, targets in sorted(edges.items()):
        pa = package_of(a)
        for b in sorted(targets):
            pb = package_of(b)
            if pb == pa or pb in BASE:
                continue
            if pb == "cli" and a != f"{PACKAGE}.__main__":
                out.append(f"imports the CLI: {a} -> {b}")
            elif pa in LAYERS and pb not in LAYERS[pa]:
                out.append(f"forbidden edge: {a} -> {b} ({pa} may import {sorted(LAYERS[pa]) or 'nothing of ours'})")
            elif pa == "sampling" and pb == "score" and b not in SAMPLING_FROM_SCORE:
                out.append(f"forbidden edge: {a} -> {b} (sampling may import only {sorted(SAMPLING_FROM_SCORE)})")
    out += [f"private name across modules: {line}" for line in private]
    for name, path in modules(root).items():
        lines = sum(1 for _ in path.open(encoding="utf-8"))
        if lines > MAX_LINES:
            out.append(f"module over {MAX_LINES} lines: {name} ({lines})")
        if name.count(".") == 1 and path.stem not in TOP_LEVEL and path.name != "__init__.py":
            out.append(f"top-level module beyond errors / _atomic: {name}")
        if package_of(name) not in LAYERS and package_of(name) not in BASE | {"__main__"} and name.count(".") > 1:
            out.append(f"package outside the layout: {name}")
    return out


def test_the_house_holds():
    assert problems(ROOT) == []


def _copy_package(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / PACKAGE, tmp_path / PACKAGE, ignore=shutil.ignore_patterns("__pycache__", "shipped",
                                                                                       "cases"))
    return tmp_path


def test_the_check_fails_on_a_deliberate_cycle(tmp_path):
    """score/events.py importing the sampling loop closes a loop (sampling.base -> score.events)."""
    root = _copy_package(tmp_path)
    events = root / PACKAGE / "score" / "events.py"
    events.write_text(events.read_text(encoding="utf-8") + "\nfrom klip_med.sampling.base import SampleResult\n",
                      encoding="utf-8")
    found = problems(root)
    assert "import cycle: klip_med.sampling.base <-> klip_med.score.events" in found, found
    assert any(p.startswith("package cycle:") and "sampling" in p and "score" in p for p in found), found
    assert "forbidden edge: klip_med.score.events -> klip_med.sampling.base" in " | ".join(found)


@pytest.mark.parametrize(("where", "line", "expected"), [
    ("io/nifti.py", "from klip_med.sampling.dds import DDSSampler", "forbidden edge: klip_med.io.nifti -> klip_med.sampling.dds"),
    ("eval/metrics.py", "from klip_med.cli.common import RUN_DEFAULTS", "imports the CLI: klip_med.eval.metrics"),
    ("sampling/dds.py", "from klip_med.score.kl import step_pixel_kl", "sampling may import only"),
    ("pipeline/demo.py", "from klip_med.pipeline.volume import _seeds", "private name across modules"),
])
def test_the_check_fails_on_each_forbidden_kind_of_import(tmp_path, where, line, expected):
    root = _copy_package(tmp_path)
    path = root / PACKAGE / where
    path.write_text(path.read_text(encoding="utf-8") + f"\n{line}\n", encoding="utf-8")
    assert any(expected in p for p in problems(root)), problems(root)


def test_ci_runs_the_readme_test_command():
    """The README's second set-up command is, verbatim, the command ``.ci/run`` runs."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)\n```", readme.split("## Set up", 1)[1].split("\n## ", 1)[0], re.S)
    assert len(blocks) == 2, blocks  # exactly two set-up commands: the demo, the tests
    assert "pytest" in blocks[1] and "klip-med demo" in blocks[0]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert blocks[1].strip() in [line.strip() for line in ci]
    assert "sudo apt-get" not in blocks[1]  # typed as root without sudo it must still work
