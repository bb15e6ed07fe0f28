"""The house: cxr_core is a few packages named for the field's concepts, imports point one way
between them (the import-linter contracts in ``.importlinter``), and no module imports itself
back through any chain (function-level imports count: a hidden import is still an import).
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from test_architecture import imported_modules

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "cxr_core"
PACKAGES = ("core", "storage", "auth", "jobs", "stats", "data", "models", "training",
            "evaluation", "predict", "review", "search")
TOP_LEVEL = {"__init__", "__main__", "app", "cli"}  # the composition root and the CLI only


def module_files(*roots: Path, base: Path = REPO) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``roots`` (relative to ``base``)."""
    out = {}
    for root in roots:
        for f in sorted(root.rglob("*.py")):
            name = ".".join(f.relative_to(base).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = f
    return out


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its file (a ``from a import b``
    edge goes to ``a.b`` when that is a module, else to ``a``)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for _, target in imported_modules(f):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != m:
                graph[m].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
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
                        out.append(sorted(comp))
    return out


def test_no_import_cycle_in_cxr_core_or_the_pages():
    found = cycles(import_graph(module_files(CORE, REPO / "app_pages")))
    assert not found, ("import cycles (break each by a mechanism: a handler registry, a "
                       "parameter, a shared leaf; not by hiding the import):\n"
                       + "\n".join(" <-> ".join(c) for c in found))


def test_the_cycle_finder_sees_a_function_level_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import c\n")
    (pkg / "c.py").write_text("def g():\n    from pkg.a import x\n")
    (pkg / "d.py").write_text("from pkg import a\n")
    graph = import_graph(module_files(pkg, base=tmp_path))
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_import_linter_contracts_hold():
    """The layers (top to bottom: the CLI and composition root, training, evaluation | review,
    predict, models, data, stats, jobs, auth, storage, core), review/evaluation independence,
    storage as the one database door, pages and the CLI off storage, no Streamlit in cxr_core,
    pure statistics."""
    from importlinter.cli import lint_imports

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        assert lint_imports(config_filename=str(REPO / ".importlinter"), no_cache=True) == 0
    finally:
        os.chdir(cwd)


def test_the_layers_contract_names_every_package():
    text = (REPO / ".importlinter").read_text()
    layers = text.split("[importlinter:contract:layers]")[1].split("[importlinter:")[0]
    for pkg in PACKAGES:
        assert f"    {pkg}" in layers or f"| {pkg}" in layers, pkg


def test_only_the_composition_root_and_the_cli_sit_at_the_top():
    top = {p.stem for p in CORE.glob("*.py")}
    assert top == TOP_LEVEL, f"modules belong in a package named for their concept: {top - TOP_LEVEL}"
    dirs = {p.name for p in CORE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert dirs == set(PACKAGES)


@pytest.mark.parametrize("pkg", PACKAGES)
def test_each_package_says_what_lives_there_and_what_it_may_import(pkg):
    doc = ast.get_docstring(ast.parse((CORE / pkg / "__init__.py").read_text()))
    assert doc and len(doc) > 120, f"cxr_core/{pkg}/__init__.py needs its paragraph"
    assert "import" in doc.lower(), f"cxr_core/{pkg}/__init__.py must say what it may import"
