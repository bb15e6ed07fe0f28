"""AppTest: the Compare page on two real tiny runs evaluated on the same images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest
from test_model_store import save_tiny_model

from cxr_core.evaluation import compare as cs
from cxr_core.evaluation import evaluate as es
from cxr_core.evaluation import operating_points as ops
from cxr_core.storage import open_db
from cxr_core import app

PAGE = str(Path(__file__).resolve().parents[2] / "app_pages" / "compare.py")


def comparison_charts(at: AppTest) -> list:
    """The comparison's charts (not the shipped model's site round in the Site threshold
    section, drawn whenever models/default/site_round.json is there)."""
    return [c for c in at.get("plotly_chart") if getattr(c, "key", None) != "site_round_chart"]


@pytest.fixture(autouse=True)
def launched(monkeypatch) -> list:
    """The tests play the worker; the page's launch requests are recorded, not run."""
    from cxr_core.jobs import launcher

    calls: list = []
    monkeypatch.setattr(launcher, "ensure_worker", lambda db, **kw: calls.append(kw) or None)
    return calls


def _page() -> AppTest:
    return AppTest.from_file(PAGE, default_timeout=120).run()


def test_empty_page_explains_what_to_do(cxr_home):
    at = _page()
    assert not at.exception
    assert any("No two evaluations share the same images" in i.value for i in at.info)


def test_compare_two_runs_renders_matrices_metrics_and_mcnemar(two_runs):
    at = _page()
    assert not at.exception, at.exception
    assert len(comparison_charts(at)) == 2 * 2 + 3  # 2 runs × (counts, normalised) + 3 curves
    assert [m.label for m in at.metric] == ["McNemar p-value"]
    assert 0.0 <= float(at.metric[0].value) <= 1.0
    metrics = at.dataframe[0].value
    assert {"alpha", "beta"} <= set(metrics.columns) and "auc" in set(metrics["metric"])
    assert any("threshold 0.600" in m.value for m in at.markdown)  # the stored operating point
    at.toggle(key="compare_matched").set_value(True).run()
    assert not at.exception
    assert any("matched sensitivity 0.95" in m.value.replace("\\", "") for m in at.markdown)


def test_intervals_are_a_worker_job_kept_per_thresholds(two_runs):
    """The page shows point estimates at once and never resamples; a worker computes the
    bootstrap intervals once per (evaluations, labels, thresholds)."""
    from cxr_core.jobs import queue

    at = _page()
    table = at.dataframe[0].value
    assert not table["alpha"].str.contains("–").any()  # no interval drawn on the page
    assert any("Bootstrap 95% intervals" in p.proto.text for p in at.get("progress"))
    (job,) = queue.recent_jobs(open_db(), "compare_ci")
    assert job.params["n_boot"] == 500 and job.params["thresholds"] == {"alpha": 0.6,
                                                                        "beta": 0.6}
    assert app.run_worker(once=True, kinds="jobs")["jobs"] == [job.id]
    at.run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert table.loc[table["metric"] == "auc", "alpha"].str.contains("–").all()
    assert any("500 bootstrap resamples over patients" in c.value for c in at.caption)
    at.toggle(key="compare_matched").set_value(True).run()  # other thresholds: another job
    assert len(queue.recent_jobs(open_db(), "compare_ci")) == 2
    at.toggle(key="compare_matched").set_value(False).run()  # back: the kept result
    assert len(queue.recent_jobs(open_db(), "compare_ci")) == 2
    assert at.dataframe[0].value["alpha"].str.contains("–").any()


def test_manual_threshold_change_is_recorded_and_shown(two_runs):
    alpha, _ = two_runs
    at = _page()
    at.number_input(key="compare_op_threshold").set_value(0.55)
    at.text_input(key="compare_op_who").set_value("Dr Lee")
    at.text_input(key="compare_op_note").set_value("fewer false positives")
    next(b for b in at.button if b.label == "Set operating point").click().run()
    assert not at.exception
    history = ops.operating_point_history(open_db(), alpha)
    assert [h.method for h in history] == ["manual", "sensitivity"]
    assert history[0].threshold == 0.55 and history[0].changed_by == "Dr Lee"
    assert any("threshold 0.550" in m.value for m in at.markdown)


def test_send_a_disagreement_to_review(two_runs):
    from cxr_core.storage import reviews

    at = _page()
    at.toggle(key="compare_matched").set_value(True).run()  # per-run thresholds: disagreements
    sends = [b for b in at.button if b.label == "Send to review"]
    if not sends:
        pytest.skip("the two tiny runs happen to agree on every image")
    assert all(b.disabled for b in sends)  # a name is required first
    at.text_input(key="compare_sent_by").set_value("Dr Lee").run()
    next(b for b in at.button if b.label == "Send to review").click().run()
    assert not at.exception
    with open_db().session() as s:
        [item] = reviews.list_review_items(session=s)
    assert item.source == "compare" and item.sent_by == "Dr Lee"


def test_evaluate_form_queues_a_job_that_a_worker_runs(two_runs, launched):
    """The page only queues the evaluation; a worker process decodes and predicts."""
    from cxr_core.jobs import queue

    at = _page()
    at.selectbox(key="compare_eval_ref").set_value(f"run:{two_runs[0]}")
    at.selectbox(key="compare_eval_split").set_value("test")
    at.button(key="compare_eval_go").click().run()
    assert not at.exception and launched and all(k == {"kinds": "jobs"} for k in launched)
    job = queue.get_job(open_db(), at.session_state["compare_job"])
    assert job.status == "queued" and len(es.list_evaluations(open_db())) == 2  # not run here
    out = app.run_worker(once=True, kinds="jobs")  # what the launched worker does
    assert job.id in out["jobs"] and out["runs"] == []
    at.run()
    assert not at.exception
    newest = es.list_evaluations(open_db())[0]
    assert newest.split == "test" and newest.n == 4 and newest.run_id == two_runs[0]
    assert np.array(newest.metrics["confusion_matrix"]).sum() == 4
    assert queue.get_job(open_db(), job.id).result == {"evaluation_id": newest.id}


def test_a_failed_evaluation_job_shows_its_error(two_runs, monkeypatch):
    from cxr_core.jobs import queue
    from cxr_core.jobs import launcher

    monkeypatch.setattr(launcher, "ensure_worker", lambda db, **kw: None)
    db = open_db()
    job_id = queue.submit(db, "evaluate", {"model_ref": "run:999", "data": "tiny"})
    assert app.run_job(db, job_id).status == "failed"
    at = AppTest.from_file(PAGE, default_timeout=120)
    at.session_state["compare_job"] = job_id
    at.run()
    assert not at.exception and any("999" in e.value for e in at.error)


def test_multiclass_compare_renders_without_thresholds(cxr_home, tiny_dataset, tmp_path):
    db = open_db()
    for seed in (1, 2):
        model = save_tiny_model(tmp_path / f"m{seed}" / "m.keras", units=3, seed=seed)
        es.evaluate_model(db, str(model), str(tiny_dataset))
    at = _page()
    assert not at.exception, at.exception
    assert at.toggle(key="compare_matched").disabled
    assert len(comparison_charts(at)) == 2 * 2 + 3
    assert any("argmax" in m.value for m in at.markdown)
    assert any("multi-class uses the argmax" in i.value for i in at.info)


def test_page_says_which_labels_every_number_uses_and_warns_of_seen_data(two_runs):
    db = open_db()
    from cxr_core.storage import runs as run_store

    with db.session() as s:  # alpha trained on two of the train images it was evaluated on
        ids = [r for r in es.load_predictions(db, es.list_evaluations(db)[-1].id).image_ids][:2]
    db.write(lambda s: run_store.set_run_images(session=s, run_id=two_runs[0], train_ids=ids,
                                                val_ids=[]))
    es.evaluate_model(db, f"run:{two_runs[0]}", "tiny", split="train")  # re-evaluated: warned
    at = _page()
    assert not at.exception, at.exception
    caption = next(c.value for c in at.caption if "Every number below" in c.value)
    assert "current labels" in caption and "bootstrap over patients" in caption
    assert any("in its training set" in w.value for w in at.warning)
    at.radio(key="compare_truth").set_value("original").run()
    assert not at.exception, at.exception
    caption = next(c.value for c in at.caption if "Every number below" in c.value)
    assert "original labels" in caption
    table = at.dataframe[-1].value
    assert list(table.columns[:3]) == ["evaluation", "stored against", "compared against"]


def test_intervals_of_changed_thresholds_are_refused(two_runs):
    from cxr_core.core.errors import ConfigError

    ids = [e.id for e in es.list_evaluations(open_db())]
    kw = dict(mode="operating_point", target=0.95, truth="current", as_of_relabel_id=None,
              n_boot=20)
    out = cs.comparison_intervals(open_db(), ids, thresholds={"alpha": 0.6, "beta": 0.6}, **kw)
    assert out["n_boot"] == 20 and out["ci_unit"] == "patient"
    with pytest.raises(ConfigError, match="operating point changed"):
        cs.comparison_intervals(open_db(), ids, thresholds={"alpha": 0.1, "beta": 0.6}, **kw)


def test_subgroup_metrics_by_site_from_metadata_and_by_subtype(two_runs, tiny_dataset):
    from cxr_core.evaluation import subgroups
    from cxr_core.data.indexing import index_dataset

    rows = ["path,site,age"]
    for n, p in enumerate(sorted((tiny_dataset / "train").rglob("*.jpeg"))):
        rows.append(f"{p.relative_to(tiny_dataset).as_posix()},{'a' if n % 2 else 'b'},{n}")
    (tiny_dataset / "metadata.csv").write_text("\n".join(rows) + "\n")
    index_dataset(open_db(), tiny_dataset, name="tiny")
    ids = [e.id for e in es.list_evaluations(open_db())]
    cmp = cs.compare_evaluations(open_db(), ids, truth="current", n_boot=0)
    by_site = subgroups.subgroup_rows(open_db(), cmp, "site")
    assert {r["Site"] for r in by_site} == {"a", "b"}
    assert sum(r["images"] for r in by_site if r["run"] == "alpha") == len(cmp.y_true)
    whole = next(r for r in cmp.metrics_rows() if r["run"] == "alpha" and r["metric"] == "auc")
    assert whole["value"] is not None
    bands = {r["Age band"] for r in subgroups.subgroup_rows(open_db(), cmp, "age_band")}
    assert bands <= {"<1 y", "1–2 y", "3–5 y", "6–11 y", "12+ y"}
    at = _page()
    at.selectbox(key="compare_subgroups_by").set_value("subtype").run()
    assert not at.exception, at.exception
    table = next(d.value for d in at.dataframe if "Subtype (file name)" in d.value.columns)
    assert set(table["Subtype (file name)"]) <= {"bacteria", "virus", "(unknown)"}
    assert set(table["run"]) == {"alpha", "beta"}


def test_an_ensemble_is_evaluated_by_the_job_and_compared_with_its_members(two_runs):
    """A named ensemble is in the Evaluate picker; its evaluation joins its members' image set
    and is compared at its own operating point."""
    from cxr_core.models import ensembles
    from cxr_core.jobs import queue

    ensembles.create_ensemble(open_db(), "pair", [f"run:{r}" for r in two_runs],
                              threshold=0.55, changed_by="dr a", note="by hand")
    at = _page()
    assert "pair (ensemble of run:1, run:2)" in at.selectbox(key="compare_eval_ref").options
    at.selectbox(key="compare_eval_ref").set_value("ensemble:pair")
    at.selectbox(key="compare_eval_split").set_value("train")
    at.button(key="compare_eval_go").click().run()
    assert not at.exception, at.exception
    job = queue.get_job(open_db(), at.session_state["compare_job"])
    assert job.id in app.run_worker(once=True, kinds="jobs")["jobs"]
    newest = es.list_evaluations(open_db())[0]
    assert newest.model_ref == "ensemble:pair" and newest.run_id is None
    assert newest.metrics["threshold"] == 0.55
    at = _page()
    assert not at.exception, at.exception
    [picked] = [m for m in at.multiselect if m.label.startswith("Evaluations")]
    assert len(picked.value) == 3  # the ensemble and its two members, on the same images
    assert any("threshold 0.550" in m.value and "ensemble operating point" in m.value
               for m in at.markdown)


def test_the_ensemble_form_makes_a_named_ensemble_as_the_user(two_runs):
    """Compare → Named ensembles: the members' shared validation outputs are chosen on when
    they have them (these runs have none: a clear refusal); by hand, with a note, it is made
    once by a worker job (the members are loaded there, not in the page), recorded as the
    signed-in user, and listed for Predict and Compare."""
    from cxr_core.auth import admin as actions
    from cxr_core.auth import policy
    from cxr_core.models import ensembles

    def make(at):
        next(b for b in at.button if b.label == "Make ensemble").click().run()
        assert not at.exception
        app.run_worker(once=True, kinds="jobs")
        at.run()
        assert not at.exception

    at = _page()
    at.multiselect(key="ens_members").set_value([f"run:{r}" for r in two_runs])
    at.text_input(key="ens_name").set_value("pair")
    make(at)
    assert any("cannot choose the ensemble's operating point" in e.value.replace("\\", "")
               for e in at.error), [e.value for e in at.error]
    assert ensembles.list_ensembles() == []
    at.toggle(key="ens_manual").set_value(True)
    at.number_input(key="ens_threshold").set_value(0.6)
    at.text_input(key="ens_note").set_value("site sample")
    make(at)
    assert any("ensemble:pair" in s.value.replace("\\", "") for s in at.success)
    [made] = ensembles.list_ensembles()
    assert (made.members, made.threshold, made.note) == (
        tuple(f"run:{r}" for r in two_runs), 0.6, "site sample")
    local = policy.local_principal()
    assert made.created_by == local.identity
    events = actions.audit_log(open_db(), local, action="set_operating_point")
    assert [(e.actor, e.detail["name"], e.detail["kind"]) for e in events] == [
        (local.identity, "pair", "create_ensemble")] * 2  # both asks, the refused one too
    at = _page()
    assert "pair (ensemble of run:1, run:2)" in at.selectbox(key="compare_eval_ref").options
    at.multiselect(key="ens_members").set_value([f"run:{r}" for r in two_runs])
    at.text_input(key="ens_name").set_value("pair")
    at.toggle(key="ens_manual").set_value(True)
    make(at)
    assert any("exists" in e.value for e in at.error)  # a name never changes meaning
    assert len(ensembles.list_ensembles()) == 1
