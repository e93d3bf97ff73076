"""The import graph of capsmodels, sweeps and analysis, read from the source (ast), checked against the
layering README's "What moved" describes: no import circle, and each package imports only what it may.

Every import counts, wherever it is written: at the top, inside a function (a lazy import is still a
dependency), under `if TYPE_CHECKING:`, and `importlib.import_module("a.literal")`.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("capsmodels", "sweeps", "analysis")


def _modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _imported(f: Path, name: str) -> set[str]:
    """Every module name `f` (module `name`) imports, as written (absolute; relative ones resolved)."""
    base = name.split(".") if f.name == "__init__.py" else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(f.read_text(), str(f))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)     # `from pkg import module`
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == \
                "import_module" and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            out.add(node.args[0].value)
    return out


def import_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between the project's modules, the top-level names each module imports)."""
    mods = _modules(root)

    def own(name: str):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges, tops = {}, {}
    for name, f in mods.items():
        names = _imported(f, name)
        edges[name] = {t for n in names if (t := own(n)) and t != name}
        tops[name] = {n.split(".")[0] for n in names}
    return edges, tops


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): each holds a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_cycle_finder_finds_a_circle_and_nothing_else():
    """The finder itself, on a made-up graph: a -> b -> c -> a is one circle, d -> a is none."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_typing_and_importlib_imports(tmp_path):
    """A circle hidden in a function, under TYPE_CHECKING or behind importlib is still found."""
    pkg = tmp_path / "capsmodels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from capsmodels import b\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from capsmodels.c import X\n")
    (pkg / "c.py").write_text("import importlib\nimportlib.import_module('capsmodels.a')\n")
    for other in ("sweeps", "analysis"):
        (tmp_path / other).mkdir()
    edges, _ = import_graph(tmp_path)
    assert cycles(edges) == [["capsmodels.a", "capsmodels.b", "capsmodels.c"]]


def test_no_import_circles(graph):
    edges, _ = graph
    assert len(edges) > 60          # the whole project was read
    assert cycles(edges) == []


def test_analysis_never_imports_sweeps_or_torch(graph):
    edges, tops = graph
    bad = sorted((m, t) for m, ts in edges.items() if m.startswith("analysis") for t in ts if t.startswith("sweeps"))
    assert [b for b in bad if b[1] != "analysis"] == []      # `from analysis import cli`: the package (empty) too
    assert sorted(m for m, ts in tops.items() if m.startswith("analysis") and ts & {"torch", "ray"}) == []


def test_capsmodels_never_imports_ray_mlflow_or_the_other_packages(graph):
    edges, tops = graph
    assert sorted(m for m, ts in tops.items() if m.startswith("capsmodels") and ts & {"ray", "mlflow", "optuna"}) == []
    assert sorted((m, t) for m, ts in edges.items() if m.startswith("capsmodels") for t in ts
                  if not t.startswith("capsmodels")) == []


def test_sweeps_reads_analysis_only_through_its_store_module_and_the_cli_entry(graph):
    """The writer reaches the reader through analysis/store.py (every module) and analysis/cli.py (the
    capsweep parser dispatches the read-only commands there), nothing else."""
    edges, _ = graph
    bad = sorted((m, t) for m, ts in edges.items() if m.startswith("sweeps") for t in ts if t.startswith("analysis")
                 and t != "analysis.store" and not (m == "sweeps.cli" and t == "analysis.cli"))
    assert [b for b in bad if b[1] != "analysis"] == []      # `from analysis import cli`: the package (empty) too


def test_contract_and_analysis_import_neither_ray_mlflow_nor_torch():
    """A laptop analyses a cluster's sweep without the training stack: checked in a fresh interpreter."""
    import os
    import subprocess
    import sys
    code = ("import sys, capsmodels.contract, analysis, analysis.load, analysis.verdict, analysis.report, "
            "analysis.cli, analysis.mlflowio, analysis.store, analysis.inspect\n"
            "print(sorted(m for m in ('ray', 'mlflow', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={**os.environ, "MPLBACKEND": "Agg"})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _calls(name: str) -> dict[str, int]:
    """Module -> how many calls of a function called `name` (plain or attribute) its source makes."""
    out = {}
    for mod, f in _modules().items():
        n = sum(1 for node in ast.walk(ast.parse(f.read_text(), str(f))) if isinstance(node, ast.Call) and
                (getattr(node.func, "id", None) == name or getattr(node.func, "attr", None) == name))
        if n:
            out[mod] = n
    return out


def test_a_trial_config_is_built_at_the_two_edges_only():
    """README "Where things live": the driver's readers ask the spec's TrialConfigs (sweeps/schema.py),
    and a worker builds its trial once, in the trainable; nobody else rebuilds a trial's config."""
    assert _calls("resolve_trial") == {"sweeps.schema": 1, "sweeps.trainable": 1}


def test_the_tracking_uri_is_resolved_in_one_place():
    """The walk of docs/ARCHITECTURE.md: $MLFLOW_TRACKING_URI is read by analysis/store.py's
    resolve_tracking_uri alone; every other module is handed the URI (the spec's, or a flag's)."""
    readers = set()
    for mod, f in _modules().items():
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("get", "getenv") and node.args:
                arg = node.args[0]
                if getattr(arg, "id", None) == "TRACKING_URI_ENV" or getattr(arg, "value", None) == "MLFLOW_TRACKING_URI":
                    readers.add(mod)
    assert readers == {"analysis.store"}
    assert set(_calls("resolve_tracking_uri")) <= {"sweeps.spec", "sweeps.cli", "analysis.cli", "analysis.load"}
