"""Layer rules, checked on the source with ``ast`` (no import runs, so a test fails on the
file that breaks a rule, with its line, whatever the import order of the suite):

* SQLAlchemy is imported only by the storage layer (``cxr_core/storage/``, ``db/``);
* pages (``app_pages/``, ``streamlit_app.py``) import nothing from the storage layer and open
  no database session: they call ``cxr_core`` services and pass the ``Database`` handle those
  return, unopened;
* pages call no writer beneath the checked actions (``cxr_core/<domain>/actions.py``: role
  check, caps and audit row through ``cxr_core.auth.gate``);
* the statistics and the label-provenance rules are pure: no storage, no Streamlit;
* only the modules that build, train or run models import TensorFlow when they are imported.

The package layers themselves (which package may import which) are import-linter contracts in
``.importlinter``, and no import cycle is allowed: ``tests/test_layers.py``.
"""
from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "cxr_core"
STORAGE = CORE / "storage"
PAGE_FILES = sorted((REPO / "app_pages").glob("*.py")) + [REPO / "streamlit_app.py"]
PURE_MODULES = (*sorted(p.relative_to(CORE).as_posix()[:-3] for p in (CORE / "stats").glob("*.py")),
                "core/json_safe", "core/labels", "data/provenance")


def python_files(*roots: Path) -> list[Path]:
    """Every ``.py`` file under ``roots`` (a file root is itself)."""
    return sorted(p for root in roots for p in ([root] if root.is_file() else root.rglob("*.py")))


def imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) of every import in the file, at any depth (functions included).

    ``from a import b`` yields both ``a`` and ``a.b`` (``b`` may be a submodule), so
    ``from cxr_core import storage`` is seen as ``cxr_core.storage``.
    """
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.lineno, node.module
            yield from ((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)


def is_within(module: str, package: str) -> bool:
    """Whether ``module`` is ``package`` or one of its submodules."""
    return module == package or module.startswith(package + ".")


def violations(files: list[Path], packages: tuple[str, ...]) -> list[str]:
    """``path:line imports module`` for every import of one of ``packages`` in ``files``."""
    return sorted({f"{p.relative_to(REPO)}:{line} imports {module}"
                   for p in files for line, module in imported_modules(p)
                   if any(is_within(module, pkg) for pkg in packages)})


def session_calls(path: Path) -> Iterator[int]:
    """Lines calling ``<anything>.session(...)`` (a database transaction)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "session"):
            yield node.lineno


def test_no_sqlalchemy_outside_storage():
    files = [p for p in python_files(CORE, *PAGE_FILES) if STORAGE not in p.parents]
    assert files, "no source files found"
    bad = violations(files, ("sqlalchemy",))
    assert not bad, "SQLAlchemy belongs in cxr_core/storage/ and db/ only:\n" + "\n".join(bad)


def test_pages_import_nothing_from_storage():
    bad = violations(PAGE_FILES, ("cxr_core.storage", "db", "sqlalchemy"))
    assert not bad, ("pages call cxr_core services, not storage (get the Database handle from a "
                     "service):\n" + "\n".join(bad))


def test_pages_open_no_database_session():
    bad = [f"{p.relative_to(REPO)}:{line}" for p in PAGE_FILES for line in session_calls(p)]
    assert not bad, "pages open no session; a service owns the transaction:\n" + "\n".join(bad)


# The writers beneath the checked actions: a page calling one would skip the role check, the
# per-user caps and the audit row (each domain's actions module wraps them, through
# cxr_core.auth.gate).
UNCHECKED_WRITERS = {
    "cxr_core.jobs.queue": {"submit", "submit_once"},
    "cxr_core.review.queues": {"submit_relabel", "submit_undo"},
    "cxr_core.predict.uploads": {"send_to_review"},
    "cxr_core.evaluation.compare": {"send_disagreement_to_review"},
    "cxr_core.training.service": {"queue_run", "run_in_process", "cancel_run", "resume_run"},
    "cxr_core.evaluation.operating_points": {"set_manual_threshold"},
    "cxr_core.evaluation.site_thresholds": {"record"},
    "cxr_core.data.presets": {"save"},
}


def unchecked_writer_uses(path: Path) -> Iterator[str]:
    """``line module.name`` of each import or ``alias.name`` use of an unchecked writer."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    aliases: dict[str, str] = {}  # local name -> module
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in UNCHECKED_WRITERS:
                    aliases[alias.asname or alias.name] = full
                elif alias.name in UNCHECKED_WRITERS.get(node.module, ()):
                    yield f"{node.lineno} {full}"
        elif isinstance(node, ast.Import):
            aliases.update({a.asname: a.name for a in node.names
                            if a.asname and a.name in UNCHECKED_WRITERS})
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.attr in UNCHECKED_WRITERS.get(aliases.get(node.value.id, ""), ())):
            yield f"{node.lineno} {aliases[node.value.id]}.{node.attr}"


def test_pages_call_no_unchecked_writer():
    bad = [f"{p.relative_to(REPO)}:{use}" for p in PAGE_FILES for use in unchecked_writer_uses(p)]
    assert not bad, ("pages act through the checked actions (role, caps, audit), not the "
                     "writers beneath them:\n" + "\n".join(bad))


def test_the_writer_rule_catches_a_page_that_skips_actions(tmp_path):
    page = tmp_path / "page.py"
    page.write_text("from cxr_core.jobs import queue as j\n"
                    "from cxr_core.review.queues import submit_undo\n"
                    "def f(db):\n    return j.submit_once(db, 'agreement', {})\n")
    assert sorted(unchecked_writer_uses(page)) == ["2 cxr_core.review.queues.submit_undo",
                                                   "4 cxr_core.jobs.queue.submit_once"]


def test_statistics_and_provenance_rules_are_pure():
    files = [CORE / f"{name}.py" for name in PURE_MODULES]
    bad = violations(files, ("cxr_core.storage", "db", "sqlalchemy", "streamlit"))
    assert not bad, "pure modules compute; services read and write:\n" + "\n".join(bad)


@pytest.mark.parametrize("source, expected", [
    ("import sqlalchemy", ["sqlalchemy"]),
    ("from sqlalchemy.orm import Session", ["sqlalchemy.orm", "sqlalchemy.orm.Session"]),
    ("def f():\n    from cxr_core import storage", ["cxr_core", "cxr_core.storage"]),
    ("from . import storage", []),  # relative imports stay inside their own package
])
def test_the_import_walk_sees_every_form(tmp_path, source, expected):
    path = tmp_path / "mod.py"
    path.write_text(source, encoding="utf-8")
    assert [module for _, module in imported_modules(path)] == expected


def test_the_rules_catch_a_violation(tmp_path):
    page = tmp_path / "page.py"
    page.write_text("from cxr_core.storage import open_db\nwith open_db().session() as s:\n"
                    "    pass\n", encoding="utf-8")
    assert any(is_within(m, "cxr_core.storage") for _, m in imported_modules(page))
    assert list(session_calls(page)) == [2]


# The modules that build, train or run models; everything else imports TensorFlow (Keras,
# tf-keras-vis) only inside the function that needs it (docs/architecture.md).
TF_MODULES = ("data/augment", "data/pipeline", "models/graph", "models/layers", "models/weights",
              "predict/saliency", "training/checkpoints", "training/fit", "training/runtime")


def top_level_imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) of the imports a module runs when it is imported (not inside functions)."""
    for node in ast.parse(path.read_text(encoding="utf-8"), str(path)).body:
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.lineno, node.module


def test_tensorflow_is_imported_at_load_only_by_the_model_modules():
    tf_free = [p for p in python_files(CORE, *PAGE_FILES)
               if p.relative_to(REPO).as_posix()[len("cxr_core/"):-3] not in TF_MODULES]
    bad = sorted(f"{p.relative_to(REPO)}:{line} imports {module}"
                 for p in tf_free for line, module in top_level_imports(p)
                 if any(is_within(module, pkg) for pkg in ("tensorflow", "keras", "tf_keras_vis")))
    assert not bad, ("only " + ", ".join(TF_MODULES) + " import TensorFlow at load; import it "
                     "inside the function that needs it:\n" + "\n".join(bad))
    for stem in TF_MODULES:  # the list names real modules that do import it
        assert any(is_within(m, pkg) for _, m in top_level_imports(CORE / f"{stem}.py")
                   for pkg in ("tensorflow", "keras", "tf_keras_vis")), stem


def test_the_code_licence_is_apache_2_in_pyproject_and_the_root_licence_file():
    import tomllib

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert meta["license"] == {"text": "Apache-2.0"}
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
