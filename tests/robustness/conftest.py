"""Robustness suite (issue 8): one CXR_HOME and SQLite DB shared by the whole suite, a
snapshot check that bad inputs lose or change nothing already stored, and the end-of-run tally.

Every test here is marked ``robustness`` (``pytestmark`` in each module); after the run one
line tallies the outcomes of the robustness-marked tests, e.g. ``robustness: tried 41, passed
41``. It is computed from the terminal reporter's own stats, so it needs no module state (which
``--import-mode=importlib`` could duplicate) and also counts pytest-xdist workers' reports.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import write_image

MARKER = "robustness"


# -- The tally ------------------------------------------------------------------------------

# Worst first: a test counts as failed if any phase failed or errored.
_PRECEDENCE = ("failed", "error", "xpassed", "xfailed", "skipped", "passed")


def robustness_outcomes(stats: dict[str, list]) -> dict[str, str]:
    """nodeid -> outcome of every robustness-marked test, from the terminal reporter's stats.

    The stats hold every report, also those sent by pytest-xdist workers, so nothing has to be
    counted in a hook or kept in module state.
    """
    out: dict[str, str] = {}
    for category in _PRECEDENCE:
        for report in stats.get(category, []):
            if MARKER in getattr(report, "keywords", {}) and report.nodeid not in out:
                out[report.nodeid] = "failed" if category == "error" else category
    return out


def tally(outcomes: dict[str, str]) -> str:
    """``robustness: tried N, passed P`` plus any other outcome that occurred."""
    counts = {k: sum(1 for v in outcomes.values() if v == k)
              for k in ("passed", "failed", "xfailed", "xpassed", "skipped")}
    tried = len(outcomes) - counts["skipped"]
    extra = "".join(f", {k} {n}" for k, n in counts.items() if k != "passed" and n)
    return f"robustness: tried {tried}, passed {counts['passed']}{extra}"


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    outcomes = robustness_outcomes(terminalreporter.stats)
    if outcomes:  # only when robustness tests ran
        terminalreporter.write_line(tally(outcomes))


# -- One state folder for the whole suite ---------------------------------------------------

@pytest.fixture(scope="session")
def robust_home(tmp_path_factory) -> Path:
    """CXR_HOME shared by every robustness test: the final test checks its DB's integrity."""
    return tmp_path_factory.mktemp("robustness_home")


@pytest.fixture(autouse=True)
def _robust_env(robust_home, monkeypatch) -> Path:
    monkeypatch.setenv("CXR_HOME", str(robust_home))
    monkeypatch.delenv("CXR_DB_URL", raising=False)
    monkeypatch.delenv("CXR_DATA_DIR", raising=False)
    return robust_home


@pytest.fixture(scope="session")
def db(robust_home):
    """The suite's database (migrated once)."""
    from cxr_core.core.settings import get_settings
    from cxr_core.storage import open_db

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CXR_HOME", str(robust_home))
        mp.delenv("CXR_DB_URL", raising=False)
        database = open_db(get_settings())
    yield database
    database.engine.dispose()


def make_dataset(root: Path, *, normal: int, pneumonia: int, seed: int = 0) -> Path:
    """A Kaggle-layout ``train/`` folder of 32 px noise JPEGs with Kermany names (one
    patient per image), so splits by patient work."""
    for i in range(normal):
        write_image(root / "train" / "NORMAL" / f"IM-{i:04d}-0001.jpeg", seed=seed + i)
    for i in range(pneumonia):
        kind = "virus" if i % 2 else "bacteria"
        write_image(root / "train" / "PNEUMONIA" / f"person{i}_{kind}_{i}.jpeg",
                    seed=seed + 1000 + i)
    return root


@pytest.fixture(scope="session")
def base_data(db, robust_home, tmp_path_factory) -> dict:
    """What is already stored before any bad input: an indexed dataset, a relabel, a saved
    augmentation preset and a (cancelled) run row."""
    from cxr_core.data import presets
    from cxr_core.review import queues as review
    from cxr_core.data.augment_config import AugmentConfig
    from cxr_core.data.indexing import index_dataset
    from cxr_core.storage import datasets as ds_store
    from cxr_core.storage import runs

    root = make_dataset(tmp_path_factory.mktemp("base") / "base", normal=4, pneumonia=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CXR_HOME", str(robust_home))
        rep = index_dataset(db, root, name="base")
        with db.session() as s:
            first = min(r.id for r in ds_store.list_images(session=s, dataset_id=rep.dataset_id))
        review.submit_relabel(db, image_id=first, choice=review.LabelChoice("PNEUMONIA", "virus"),
                              reviewer="dr base", note="before the bad inputs")
        presets.save(db, "base-preset", AugmentConfig(rotation=5.0, hflip=True))
        run_id = db.write(lambda s: runs.create_run(session=s, name="base run", config={}))
        db.write(lambda s: runs.request_cancel(session=s, run_id=run_id))
    return {"root": root, "dataset_id": rep.dataset_id, "run_id": run_id}


# -- Nothing stored is lost or changed -----------------------------------------------------

def snapshot(db) -> dict[str, dict[int, tuple]]:
    """Every row of every table, by rowid (SQLite)."""
    with db.engine.connect() as conn:
        tables = [r[0] for r in conn.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")]
        return {t: {row[0]: tuple(row[1:]) for row in
                    conn.exec_driver_sql(f'SELECT rowid, * FROM "{t}"')} for t in tables}


def changed_rows(before: dict, after: dict, *, allow: set[tuple[str, int]] = frozenset()
                 ) -> list[str]:
    """Rows present before that are gone or different after (``allow``: (table, rowid))."""
    out = []
    for table, rows in before.items():
        for rowid, row in rows.items():
            if (table, rowid) in allow:
                continue
            now = after.get(table, {}).get(rowid)
            if now != row:
                out.append(f"{table}[{rowid}]: {row} -> {now}")
    return out


@pytest.fixture()
def stored_intact(db, base_data) -> Iterator[Callable[..., None]]:
    """Snapshot the DB before the test; after it, every row stored before must be unchanged.

    The test may call the yielded function to allow rows it legitimately updates.
    """
    allow: set[tuple[str, int]] = set()
    before = snapshot(db)
    yield lambda table, rowid: allow.add((table, rowid))
    problems = changed_rows(before, snapshot(db), allow=allow)
    assert not problems, "stored rows lost or changed:\n" + "\n".join(problems[:20])


@pytest.fixture(scope="session")
def train_set(db, robust_home, tmp_path_factory) -> str:
    """An indexed 40-image dataset ("trainset", 32 px noise films) for real training runs."""
    from cxr_core.data.indexing import index_dataset

    root = make_dataset(tmp_path_factory.mktemp("trainset") / "trainset", normal=20,
                        pneumonia=20, seed=100)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CXR_HOME", str(robust_home))
        index_dataset(db, root, name="trainset")
    return "trainset"


@pytest.fixture(scope="session")
def tiny_run() -> dict:
    """A tiny run config: 32 px, a 3-conv CNN, batches of 8 (5 an epoch), each epoch
    checkpointed."""
    return dict(recipe="cpu128", model="small3_50", image_size=32, batch_size=8,
                augment="none", balancing="class_weights")


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str,
              interval: float = 0.05) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="session")
def wait_for() -> Callable[..., None]:
    """``wait_for(predicate, timeout, what)``: poll until true, else fail naming ``what``."""
    return _wait_for
