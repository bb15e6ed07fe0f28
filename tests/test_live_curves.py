"""Live curves within an epoch: batch rows thinned in SQL, the chart's rows and the ETA."""
from __future__ import annotations

import pytest
from test_postgres import pg_url  # noqa: F401  (fixture: the CI PostgreSQL, clean schema)

from cxr_core.training import service as svc
from cxr_core.storage import open_db
from cxr_core.storage import runs as store

STEPS = 10  # batches per epoch in the fake run


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, cxr_home):
    if request.param == "sqlite":
        return open_db()
    return open_db(url=request.getfixturevalue("pg_url"))


def _run_with_batches(db, n_batches: int, *, epochs: int = 3) -> int:
    run_id = db.write(lambda s: store.create_run(session=s, name="live",
                                                 config={"epochs": epochs}))

    def write(s) -> None:
        for step in range(1, n_batches + 1):
            store.add_metrics(session=s, run_id=run_id, kind="batch", step=step, values={
                "loss": 1.0 / step, "accuracy": 0.5, "auc": 0.6,
                "epoch_progress": step / STEPS, "eta_s": float(epochs * STEPS - step)})
    db.write(write)
    return run_id


def test_thinning_keeps_the_newest_row_and_spaces_the_rest(db):
    run_id = _run_with_batches(db, 1000)
    with db.session() as s:
        rows = store.get_metrics_thinned(session=s, run_ids=[run_id], kind="batch",
                                         keys=["loss"], max_points=50)
        everything = store.get_metrics_thinned(session=s, run_ids=[run_id], kind="batch",
                                               keys=["loss"], max_points=5000)
        newest = store.get_metrics_thinned(session=s, run_ids=[run_id], kind="batch",
                                           keys=["loss", "eta_s"], max_points=1)
    steps = [r.step for r in rows]
    assert len(steps) == 50 and steps[-1] == 1000 and steps == sorted(steps)
    assert {b - a for a, b in zip(steps, steps[1:])} == {20}  # evenly spaced
    assert len(everything) == 1000
    assert {(r.key, r.step) for r in newest} == {("loss", 1000), ("eta_s", 1000)}
    with pytest.raises(ValueError, match="max_points"):
        with db.session() as s:
            store.get_metrics_thinned(session=s, run_ids=[run_id], kind="batch",
                                      keys=["loss"], max_points=0)


def test_live_rows_place_batches_at_fractional_epochs_before_any_epoch_ends(db):
    run_id = _run_with_batches(db, 7)  # 70% into the first epoch, no epoch row yet
    rows = svc.live_curves(db, [run_id])
    assert {r["kind"] for r in rows} == {"during epoch"}
    assert {r["key"] for r in rows} == {"loss", "accuracy", "auc"}
    loss = [r for r in rows if r["key"] == "loss"]
    assert [r["epoch"] for r in loss] == pytest.approx([s / STEPS for s in range(1, 8)])
    db.write(lambda s: store.add_metrics(session=s, run_id=run_id, kind="epoch", step=1,
                                         values={"loss": 0.2, "val_loss": 0.3}))
    ends = [r for r in svc.live_curves(db, [run_id]) if r["kind"] == "epoch end"]
    assert {(r["key"], r["epoch"]) for r in ends} == {("loss", 1), ("val_loss", 1)}
    progress = svc.run_progress(db, [run_id])
    assert progress[run_id].epoch_progress == pytest.approx(0.7)
    assert progress[run_id].eta_s == pytest.approx(3 * STEPS - 7)


def test_batch_rows_without_a_position_are_left_out(db):
    """Rows written before batch rows carried ``epoch_progress`` cannot be placed."""
    run_id = db.write(lambda s: store.create_run(session=s, name="old", config={}))
    db.write(lambda s: store.add_metrics(session=s, run_id=run_id, kind="batch", step=1,
                                         values={"loss": 0.9}))
    assert svc.live_curves(db, [run_id]) == [] and svc.run_progress(db, [run_id]) == {}
