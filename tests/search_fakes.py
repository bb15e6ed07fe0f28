"""A stand-in for the training runner in search tests: each trial run "trains" two epochs in
milliseconds (reporting through the epoch hook, as the real runner's sinks do) and ends with a
validation AUC drawn from its run id, so studies run end to end without TensorFlow."""
from __future__ import annotations

import random
import time

from cxr_core.storage import runs as store
from cxr_core.training import runner

EPOCHS = 2


def fake_process_run(db, run_id, *, progress=None, epoch_hook=None):
    auc = random.Random(run_id).uniform(0.55, 0.99)
    for epoch in range(1, EPOCHS + 1):
        time.sleep(0.02)
        why = epoch_hook(epoch, {"val_auc": auc * epoch / EPOCHS}) if epoch_hook else None
        with db.session() as s:
            stop = store.should_stop(session=s, run_id=run_id)
        if why or stop:
            error = why or "cancelled on request"
            db.write(lambda s, error=error: store.finish_run(
                session=s, run_id=run_id, status="cancelled", error=error, only_if="running"))
            return runner.RunOutcome(run_id, "cancelled", epoch, error=error)
        db.write(lambda s, e=epoch: store.set_epochs_done(session=s, run_id=run_id,
                                                          epochs_done=e))
    db.write(lambda s: store.finish_run(session=s, run_id=run_id, status="finished",
                                        summary={"val": {"auc": auc}}, only_if="running"))
    return runner.RunOutcome(run_id, "finished", EPOCHS, {"auc": auc})


def install() -> None:
    """Replace the runner in this process (the search's trial runner calls it by module)."""
    runner.process_run = fake_process_run
