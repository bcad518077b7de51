"""The package's layout: its import graph has no cycle and follows the flow of data
(priors -> recon -> scales -> contrast -> viewer / eval / export; benchmarks, demo and cli on top).

The graph is read from the source with :mod:`ast` (nothing is imported): every ``import`` / ``from ... import``
statement anywhere in a module (module level, inside functions, under ``TYPE_CHECKING``), relative or absolute.
``from pepeseg3d_ns.x import y`` is an edge to the submodule ``pepeseg3d_ns.x.y`` when that module exists, else to
``pepeseg3d_ns.x``; importing ``pepeseg3d_ns.a.b`` also runs the package ``pepeseg3d_ns.a`` (an edge to its
``__init__``), except from inside that package. Run: ``python -m pytest tests/test_layout.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterable, List, Set, Tuple

import pytest

PKG = "pepeseg3d_ns"
ROOT = Path(__file__).resolve().parents[1] / PKG


def module_files(root: Path = ROOT) -> Dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the package (packages by their ``__init__``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> Iterable[Tuple[str, List[str]]]:
    """(absolute module, names imported from it) for each import statement of a module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target, [a.name for a in node.names]


def import_graph(root: Path = ROOT) -> Dict[str, Set[str]]:
    """Module -> the package's modules it imports (see the module docstring for what counts as an edge)."""
    files = module_files(root)
    graph: Dict[str, Set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for target, names in _imported_names(tree, mod, path.name == "__init__.py"):
            if not (target == PKG or target.startswith(PKG + ".")):
                continue
            hits = [f"{target}.{n}" for n in names if f"{target}.{n}" in files]
            if len(hits) < len(names) or not names:  # some names are attributes of `target` itself
                hits.append(target)
            for hit in hits:
                parts = hit.split(".")
                # importing a.b.c runs the packages a.b (and a) first; a module inside a package does not count
                # its own ancestors (the package may import it back while initialising, which Python allows)
                for k in range(2, len(parts) + 1):
                    dep = ".".join(parts[:k])
                    if dep in files and dep != mod and not mod.startswith(dep + "."):
                        graph[mod].add(dep)
    return graph


def strongly_connected(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Tarjan's strongly connected components (iterative), each sorted; only those of more than one module,
    or of one module importing itself."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    on_stack: Set[str] = set()
    stack: List[str] = []
    out: List[List[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1 or node in graph.get(node, ()):
                    out.append(sorted(comp))
    return out


def _in(module: str, area: str) -> bool:
    name = f"{PKG}.{area}"
    return module == name or module.startswith(name + ".")


# (importer area, areas it must not import); an area is a package or a module under pepeseg3d_ns
METHOD_AREAS = ("render", "priors", "data", "recon", "contrast", "viewer", "eval", "methods", "schedule",
                "schedulers", "trainer", "runs", "readback", "errors", "export", "segment", "decompose", "plyio")
FORBIDDEN = (
    [("priors", a) for a in ("recon", "contrast", "viewer", "eval")]
    + [("recon", a) for a in ("contrast", "viewer", "eval")]
    + [(m, a) for m in METHOD_AREAS for a in ("benchmarks", "demo", "cli")]
    + [("recipes", a) for a in ("demo", "cli", "eval.benchmark")]
)


def flow_violations(graph: Dict[str, Set[str]]) -> List[str]:
    bad = []
    for mod in sorted(graph):
        for dep in sorted(graph[mod]):
            for src, dst in FORBIDDEN:
                if _in(mod, src) and _in(dep, dst):
                    bad.append(f"{mod} imports {dep} ({src} must not import {dst})")
    return bad


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_graph_sees_the_package(graph):
    # the parser must see real edges, or the checks below pass vacuously
    assert len(graph) > 50
    assert "pepeseg3d_ns.recipes" in graph["pepeseg3d_ns.demo"]
    assert "pepeseg3d_ns.contrast.pca" in graph["pepeseg3d_ns.viewer.controls"]  # a function-level import
    assert "pepeseg3d_ns.viewer.controls" in graph["pepeseg3d_ns.contrast.model"]
    assert "pepeseg3d_ns.contrast.losses" in graph["pepeseg3d_ns.contrast.centroids"]  # relative import
    assert "pepeseg3d_ns.contrast.losses" in graph["pepeseg3d_ns.contrast.model"]  # from pkg import submodule


def test_no_import_cycle(graph):
    cycles = strongly_connected(graph)
    assert not cycles, "import cycles (strongly connected components):\n" + "\n".join(
        "  " + " <-> ".join(c) for c in cycles)


def test_imports_follow_the_flow(graph):
    bad = flow_violations(graph)
    assert not bad, "imports against the flow:\n" + "\n".join("  " + b for b in bad)


def test_checker_catches_a_cycle_and_a_back_edge(tmp_path):
    # the same checks on a tiny package with one cycle and one forbidden edge
    pkg = tmp_path / PKG
    for sub in ("priors", "recon", "contrast"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "priors" / "scales.py").write_text("def f():\n    from pepeseg3d_ns.recon import model\n")
    (pkg / "recon" / "model.py").write_text("from ..contrast.model import g\n")
    (pkg / "contrast" / "model.py").write_text("import pepeseg3d_ns.recon.model\ng = 1\n")
    g = import_graph(pkg)
    assert strongly_connected(g) == [[f"{PKG}.contrast.model", f"{PKG}.recon.model"]]
    bad = flow_violations(g)
    assert any(b.startswith(f"{PKG}.priors.scales imports {PKG}.recon.model") for b in bad)
    assert any(b.startswith(f"{PKG}.recon.model imports {PKG}.contrast.model") for b in bad)


def _unresolved_names(text: str) -> List[str]:
    """Dotted ``pepeseg3d_ns.…`` names in ``text`` that name no module, or no attribute of the deepest module."""
    import importlib
    import re

    bad = []
    for name in sorted(set(re.findall(r"\bpepeseg3d_ns(?:\.[A-Za-z_][A-Za-z_0-9]*)+", text))):
        parts = name.split(".")
        for k in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:k]))
            except ModuleNotFoundError:
                continue
            for attr in parts[k:]:
                obj = getattr(obj, attr, None)
                if obj is None:
                    bad.append(name)
                    break
            break
    return bad


def test_scripts_and_docs_name_modules_that_exist():
    """Shell scripts run Python snippets and the docs name modules; after a move those names must still resolve
    (a stale ``pepeseg3d_ns.render.bench`` in scripts/gpu_check.sh is only seen on a GPU machine otherwise)."""
    repo = ROOT.parent
    files = sorted(repo.glob("scripts/*")) + sorted(repo.glob("docs/*.md")) + [repo / "README.md"]
    bad = {str(p.relative_to(repo)): names for p in files if p.is_file()
           for names in [_unresolved_names(p.read_text(errors="replace"))] if names}
    assert not bad, bad


def test_unresolved_names_are_found():
    assert _unresolved_names("python -c 'from pepeseg3d_ns.render.bench import x'") == ["pepeseg3d_ns.render.bench"]
    assert _unresolved_names("pepeseg3d_ns.benchmarks.render.time_render") == []
    assert _unresolved_names("pepeseg3d_ns.benchmarks.render.no_such_function") == [
        "pepeseg3d_ns.benchmarks.render.no_such_function"]
