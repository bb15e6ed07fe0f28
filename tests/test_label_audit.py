"""Label audits (issue 27 items 1-2): K patient-grouped, class-stratified folds trained as
ordinary runs with the audit as their parent, every image's out-of-fold probabilities stored
with the audit's label snapshot, confident learning over them, the CLI, resume after a kill."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cxr_core import app
from cxr_core.auth import policy
from cxr_core.cli import main
from cxr_core.core.errors import ConfigError, DatasetError, QuotaExceeded
from cxr_core.core.records import ImageRecord
from cxr_core.data.indexing import index_dataset
from cxr_core.data.splits import grouped_folds
from cxr_core.review import actions as review_actions
from cxr_core.review import queues as review
from cxr_core.storage import audit as audit_log
from cxr_core.storage import label_audits as store
from cxr_core.storage import open_db
from cxr_core.storage import runs as run_store
from cxr_core.training import actions, label_audit
from cxr_core.training import service as svc
from cxr_core.training import service as training_service

REPO = Path(__file__).resolve().parents[1]
TINY = dict(recipe="cpu128", model="small3_50", image_size=32, epochs=1, batch_size=16,
            augment="none", balancing="class_weights")
ISSUE_KEYS = {"audit_id", "dataset", "label_scheme", "labels", "folds", "label_source",
              "snapshot", "n_images", "thresholds", "noise_matrix", "issues"}
SCI = policy.Principal(identity="ds@h.org", roles=frozenset({"viewer", "reviewer",
                                                              "scientist"}))


@pytest.fixture(scope="module")
def films(shared_data, tmp_path_factory) -> Path:
    """18 NORMAL + 18 PNEUMONIA real 224 px films (Kermany names), linked in a train folder."""
    root = tmp_path_factory.mktemp("audit") / "films"
    for cls in ("NORMAL", "PNEUMONIA"):
        found = sorted((shared_data / "chest_xray_224" / "train" / cls).glob("*.jpeg"))
        (root / "train" / cls).mkdir(parents=True)
        for f in found[::max(1, len(found) // 18)][:18]:
            (root / "train" / cls / f.name).symlink_to(f)
    return root


@pytest.fixture()
def db(cxr_home, films):
    db = open_db()
    index_dataset(db, films, name="films")
    return db


def start(db, p=SCI, folds=3, **changes):
    cfg = training_service.label_audit_config(db, "films", {**TINY, **changes})
    return actions.start_label_audit(db, p, cfg, folds=folds, start_worker=False)


def rec(i: int, patient: str | None, sha: str | None, label: str = "NORMAL") -> ImageRecord:
    return ImageRecord(i, 1, f"train/{label}/{i}.png", "train", label, None, patient, sha,
                       32, 32, "L", 100)


# -- The folds ------------------------------------------------------------------------------

def test_folds_keep_patients_and_duplicates_together_and_stratify():
    records = [rec(i, f"p{i // 2}", f"h{i}", "NORMAL" if i < 40 else "PNEUMONIA")
               for i in range(80)]
    records[5] = rec(5, "lonely", "h70", "NORMAL")  # same bytes as image 70
    labels = [r.label for r in records]
    folds = grouped_folds(records, labels, folds=4, seed=3)
    assert sorted(folds) == [r.id for r in records]  # every image in exactly one fold
    assert all(folds[2 * k] == folds[2 * k + 1] for k in range(40) if k != 2)  # patients
    assert folds[5] == folds[70] == folds[71]  # duplicates (and 70's patient) together
    per_fold = [[labels[i] for i in folds if folds[i] == k] for k in range(4)]
    assert all(8 <= f.count("NORMAL") <= 12 for f in per_fold)  # stratified
    assert grouped_folds(records, labels, folds=4, seed=3) == folds  # seeded
    with pytest.raises(ConfigError, match="folds must be an integer >= 2"):
        grouped_folds(records, labels, folds=1)
    with pytest.raises(DatasetError, match="need at least 5 patient groups"):
        grouped_folds(records[:4], labels[:4], folds=5)


# -- Starting: ordinary runs with the audit as parent ---------------------------------------

def test_an_audit_queues_k_ordinary_runs_with_the_audit_as_their_parent(db, monkeypatch):
    audit_id, run_ids = start(db)
    with db.session() as s:
        audit = store.require_audit(session=s, audit_id=audit_id)
        runs = [run_store.require_run(session=s, run_id=i) for i in run_ids]
        images = store.audit_images(session=s, audit_id=audit_id)
        n_active = audit_log.count_active_runs(session=s, created_by="ds@h.org")
        events = audit_log.list_events(session=s, limit=3, action="label_audit")
    assert (audit.status, audit.folds, audit.labels, audit.label_scheme, audit.label_source) == \
        ("running", 3, ("NORMAL", "PNEUMONIA"), "binary", "current")
    assert [r.status for r in runs] == ["queued"] * 3
    assert [r.parent for r in runs] == [f"audit:{audit_id}"] * 3
    assert [r.config["holdout"] for r in runs] == [
        {"audit": audit_id, "fold": k, "folds": 3} for k in range(3)]
    assert all(r.created_by == "ds@h.org" for r in runs)
    assert len(images) == audit.n_images == 36 and {i.fold for i in images} == {0, 1, 2}
    assert all(i.probs is None for i in images)
    assert n_active == 1  # the audit's three fold runs count once against per-user caps
    assert [(e.outcome, e.target) for e in events] == [("ok", f"label_audit:{audit_id}")]
    # A cap of one active run: the audit fits, a second one does not.
    monkeypatch.setenv("CXR_MAX_ACTIVE_RUNS_PER_USER", "1")
    with pytest.raises(QuotaExceeded):
        start(db)


def test_bad_audit_requests_are_refused_before_anything_is_stored(db):
    viewer = policy.Principal(identity="v@h.org", roles=frozenset({"viewer", "reviewer"}))
    with pytest.raises(Exception, match="scientist or admin"):
        start(db, p=viewer)
    with pytest.raises(ConfigError, match="folds must be an integer from 2 to 20"):
        start(db, folds=1)
    with pytest.raises(ConfigError, match="no extra datasets and no max_images"):
        start(db, max_images=20)
    with pytest.raises(DatasetError, match="no indexed dataset 'nope'"):
        training_service.label_audit_config(db, "nope")
    with pytest.raises(ConfigError, match="leave its dataset out"):
        training_service.label_audit_config(db, "films", {"dataset": "other"})
    assert label_audit.list_audits(db) == []


def test_cli_errors_are_one_line(db, capsys):
    assert main(["label-audit", "--json"]) == 2
    assert "label-audit needs --dataset NAME" in capsys.readouterr().err
    assert main(["label-audit", "--dataset", "films", "--folds", "1", "--json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: folds must be") and err.count("\n") == 1
    assert main(["label-audit", "show", "99", "--json"]) == 2
    assert "no label audit with this id" in capsys.readouterr().err


# -- Training the folds, confident learning -------------------------------------------------

def test_out_of_fold_probabilities_and_the_issues_json(db, capsys, tmp_path):
    image = None
    audit_id, run_ids = start(db)
    # A relabel after the audit started: the folds still train on the audit's snapshot.
    with db.session() as s:
        first = store.audit_images(session=s, audit_id=audit_id)[0]
        image = first.image_id
    review_actions.relabel(db, SCI, image_id=image, choice=review.LabelChoice(
        "PNEUMONIA" if first.given == 0 else "NORMAL", None if first.given else "virus"))
    out = app.run_worker(once=True, db=db)
    assert [r["status"] for r in out["runs"]] == ["finished"] * 3, out
    with db.session() as s:
        audit = store.require_audit(session=s, audit_id=audit_id)
        rows = store.audit_images(session=s, audit_id=audit_id)
        trained = {rid: set(svc_run_images(s, rid)) for rid in run_ids}
    assert audit.status == "finished" and audit.result["n_scored"] == 36
    # Out of fold: each image scored once, by the fold run that never trained or selected on it.
    assert all(r.probs is not None and len(r.probs) == 2 for r in rows)
    assert all(r.image_id not in trained[r.run_id] for r in rows)
    assert {r.run_id for r in rows} == set(run_ids)
    assert next(r for r in rows if r.image_id == image).given == first.given  # the snapshot
    rc = main(["label-audit", "show", str(audit_id), "--json"])
    shown = json.loads(capsys.readouterr().out)
    assert rc == 0 and ISSUE_KEYS <= set(shown)
    assert (shown["audit_id"], shown["dataset"], shown["label_scheme"], shown["folds"],
            shown["label_source"], shown["n_images"]) == (audit_id, "films", "binary", 3,
                                                          "current", 36)
    assert shown["labels"] == ["NORMAL", "PNEUMONIA"]
    assert set(shown["thresholds"]) == {"NORMAL", "PNEUMONIA"}
    assert shown["noise_matrix"]["labels"] == ["NORMAL", "PNEUMONIA"]
    matrix = np.array(shown["noise_matrix"]["matrix"])
    assert matrix.shape == (2, 2) and matrix.sum(axis=0) == pytest.approx([1, 1], abs=1e-5)
    issues = shown["issues"]
    assert len(issues) == shown["n_issues"] == audit.result["n_issues"]
    assert [i["rank"] for i in issues] == list(range(1, len(issues) + 1))
    assert [i["score"] for i in issues] == sorted(i["score"] for i in issues)
    for i in issues:
        assert set(i) == {"path", "image_id", "patient", "given", "suggested", "score", "rank"}
        assert i["given"] != i["suggested"] and i["path"].startswith("train/")
    # The stored flags are exactly confident learning's (and cleanlab's, where installed).
    y = np.array([r.given for r in rows])
    p = np.array([r.probs for r in rows])
    from cxr_core.stats.confident_learning import find_label_issues

    assert {rows[k].image_id for k in np.flatnonzero(find_label_issues(y, p).flagged)} == \
        {i["image_id"] for i in issues}
    cleanlab_filter = pytest.importorskip("cleanlab.filter")
    theirs = cleanlab_filter.find_label_issues(y, p, filter_by="confident_learning")
    assert {rows[k].image_id for k in np.flatnonzero(theirs)} == {i["image_id"] for i in issues}
    top = main(["label-audit", "show", str(audit_id), "--top", "1", "--json"])
    assert top == 0 and len(json.loads(capsys.readouterr().out)["issues"]) == min(1, len(issues))


def svc_run_images(session, run_id):
    from db.models import RunImage

    return [i for (i,) in session.query(RunImage.image_id).filter_by(run_id=run_id)]


def test_cli_trains_the_folds_in_process_and_prints_the_audit(db, capsys, tmp_path):
    config = tmp_path / "fold.json"
    config.write_text(json.dumps(TINY))
    rc = main(["label-audit", "--dataset", "films", "--folds", "2", "--config", str(config),
               "--top", "3", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["status"] == "finished", out
    assert out["folds"] == 2 and [f["status"] for f in out["fold_runs"]] == ["finished"] * 2
    assert len(out["issues"]) <= 3 and out["config"]["model"] == "small3_50"
    rc = main(["label-audit", "--dataset", "films", "--folds", "2", "--config", str(config),
               "--detach", "--json"])
    queued = json.loads(capsys.readouterr().out)
    assert rc == 0 and queued["status"] == "queued" and queued["issues"] == []


@pytest.mark.slow
def test_a_fold_run_killed_mid_epoch_resumes_and_the_audit_finishes(db, cxr_home, capsys):
    audit_id, run_ids = start(db, folds=2, epochs=4, early_stopping=False)
    env = dict(os.environ, CXR_HOME=str(cxr_home), PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "cxr_core", "worker", "--once"], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if svc.get_run(db, run_ids[0]).epochs_done >= 1:
                break
            time.sleep(0.5)
        else:
            pytest.fail("the first fold never finished an epoch")
    finally:
        proc.send_signal(signal.SIGKILL)  # mid-fold: no clean-up, no last write
        proc.wait()
    killed = svc.get_run(db, run_ids[0])
    assert killed.status == "running" and 1 <= killed.epochs_done < 4
    assert svc.refresh(db) == [run_ids[0]]  # the pid is gone: the fold run is failed
    audit = label_audit.finalize(db, audit_id)
    assert audit.status == "running" and "resume it" in audit.error
    rc = main(["label-audit", "resume", str(audit_id), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["status"] == "finished" and out["resumed_runs"] == [run_ids[0]], out
    with db.session() as s:
        logs = [x.message for x in run_store.get_logs(session=s, run_id=run_ids[0])]
        rows = store.audit_images(session=s, audit_id=audit_id)
        epochs = run_store.get_metrics(session=s, run_ids=[run_ids[0]], kind="epoch",
                                       keys=["loss"])
    assert any("resuming from epoch" in x for x in logs)
    assert [m.step for m in epochs] == [1, 2, 3, 4]  # each epoch once
    assert all(r.probs is not None for r in rows) and len(rows) == 36
    assert svc.get_run(db, run_ids[1]).status == "finished"  # the other fold was untouched


def test_three_class_and_original_label_audits_store_their_scheme(db):
    cfg = training_service.label_audit_config(db, "films", TINY, label_scheme="three_class",
                                              label_source="original")
    audit_id, runs = actions.start_label_audit(db, SCI, cfg, folds=2, start_worker=False)
    with db.session() as s:
        audit = store.require_audit(session=s, audit_id=audit_id)
        given = {i.given for i in store.audit_images(session=s, audit_id=audit_id)}
        fold_cfg = run_store.require_run(session=s, run_id=runs[0]).config
    assert (audit.labels, audit.label_source) == (("NORMAL", "BACTERIA", "VIRUS"), "original")
    assert given == {0, 1, 2}
    assert (fold_cfg["label_scheme"], fold_cfg["label_source"], fold_cfg["monitor"]) == \
        ("three_class", "original", "val_loss")
