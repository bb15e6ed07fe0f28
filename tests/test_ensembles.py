"""Ensembles: references, loading and refusals, the mean of the members' probabilities, the
ensemble's own operating point, named ensembles (CLI), saliency, evaluate and Compare."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from test_model_store import BINARY_CARD, make_run, save_tiny_model

from cxr_core import cli
from cxr_core.auth import admin
from cxr_core.jobs import actions
from cxr_core.auth import policy
from cxr_core.models import ensembles
from cxr_core.predict import explain
from cxr_core.predict import inference
from cxr_core.evaluation import compare as cs
from cxr_core.evaluation import evaluate as es
from cxr_core.models import refs
from cxr_core.models import store as ms
from cxr_core.evaluation import operating_points as ops
from cxr_core.core.errors import ConfigError, ModelError
from cxr_core.storage import open_db
from cxr_core.stats.thresholds import choose_threshold
from cxr_core import app

VAL_Y = np.array([0, 0, 0, 1, 1, 1, 0, 1])
VAL_P = {1: np.array([0.1, 0.5, 0.3, 0.6, 0.8, 0.4, 0.2, 0.9]),
         2: np.array([0.3, 0.2, 0.6, 0.5, 0.9, 0.7, 0.1, 0.4])}


def _run(db, home, seed: int, *, size: int = 16, units: int = 1, card: dict | None = None) -> int:
    """A finished run holding a tiny model (its card's image size follows ``size``)."""
    run_id = make_run(db, f"m{seed}")
    card = dict(card if card is not None else BINARY_CARD, image_size=size)
    save_tiny_model(home / "runs" / str(run_id) / "best.keras", seed=seed, size=size,
                    units=units, card=card)
    return run_id


def _store_val(db, run_id: int, p: np.ndarray, paths=None, target: float = 0.75) -> None:
    """What the worker stores at the end of training: validation outputs and the run's
    operating point chosen on them."""
    paths = paths or [f"/val/{i}.png" for i in range(len(p))]
    es.record_evaluation(db, run_id=run_id, model_ref=f"run:{run_id}", dataset_id=None,
                         split="val", labels=["NORMAL", "PNEUMONIA"],
                         image_ids=[None] * len(p), paths=paths, y_true=VAL_Y,
                         probs=np.column_stack([1 - p, p]), n_boot=0)
    ops.set_operating_point(db, run_id=run_id, y_true=VAL_Y, p_pos=p, target=target)


@pytest.fixture()
def pair(cxr_home):
    """Two runs (16 and 24 px inputs) with validation outputs on the same 8 images."""
    db = open_db()
    a, b = _run(db, cxr_home, 1, size=16), _run(db, cxr_home, 2, size=24)
    _store_val(db, a, VAL_P[1])
    _store_val(db, b, VAL_P[2])
    return db, a, b


def _png(seed: int, size: int = 40) -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# -- References and refusals ----------------------------------------------------------------

def test_refs_are_normalised_sorted_and_parsed():
    assert ensembles.ensemble_ref(["7", "run:3", "default"]) == "ensemble:run:3+run:7+default"
    assert ensembles.members_of("ensemble:run:5+3") == ("run:3", "run:5")
    assert ensembles.is_ensemble_ref(" ensemble:x") and not ensembles.is_ensemble_ref("run:3")


@pytest.mark.parametrize("ref, match", [
    ("ensemble:run:3", "at least 2 members"),
    ("ensemble:run:3+run:3", "must be distinct"),
    ("ensemble:run:3+model.h5", "an ensemble member is"),
    ("ensemble:run:3+ensemble:x", "cannot be a member"),
    ("ensemble:nosuch", "no ensemble named 'nosuch'"),
    ("ensemble:run:1+run:999", "run 999 has no model file"),
])
def test_bad_ensemble_refs_are_model_errors(pair, ref, match):
    with pytest.raises(ModelError, match=match):
        refs.load_model_ref(ref, db=pair[0])


def test_members_with_different_class_lists_are_refused(cxr_home):
    db = open_db()
    a = _run(db, cxr_home, 1)
    c = _run(db, cxr_home, 3, units=3, card={"labels": ["NORMAL", "BACTERIA", "VIRUS"],
                                           "label_scheme": "three_class"})
    with pytest.raises(ModelError, match="share one class list and label scheme"):
        refs.load_model_ref(f"ensemble:run:{a}+run:{c}", db=db)


# -- Outputs --------------------------------------------------------------------------------

def test_probs_are_the_mean_of_the_members_each_on_its_own_decode(pair):
    db, a, b = pair
    loaded = refs.load_model_ref(f"ensemble:run:{b}+run:{a}", db=db)
    assert loaded.ref == f"ensemble:run:{a}+run:{b}" and loaded.model is None
    assert (loaded.image_size, loaded.run_id, len(loaded.members)) == (24, None, 2)
    items = [inference.ImageInput(f"{i}.png", data=_png(i)) for i in range(3)]
    result = inference.predict_batch(loaded, items)
    singles = [inference.predict_batch(m, items) for m in loaded.members]
    for k, pred in enumerate(result.predictions):
        mean = np.mean([[s.predictions[k].probabilities[c] for c in loaded.labels]
                        for s in singles], axis=0)
        np.testing.assert_allclose([pred.probabilities[c] for c in loaded.labels], mean,
                                   atol=1e-6)
        assert pred.pixels.shape == (24, 24, 1)  # the largest member's view
    x = np.stack([p.pixels for p in result.predictions])
    np.testing.assert_allclose(ms.predict_probs(loaded, x), np.mean(
        [ms.predict_probs(loaded.members[0], ms._resized(x, 16)),
         ms.predict_probs(loaded.members[1], x)], axis=0), atol=1e-6)


def test_operating_point_is_chosen_on_the_mean_of_the_shared_validation_outputs(pair):
    db, a, b = pair
    loaded = refs.load_model_ref(f"ensemble:run:{a}+run:{b}", db=db)
    mean = (VAL_P[1] + VAL_P[2]) / 2
    expected = choose_threshold(VAL_Y, mean, method="sensitivity", target_sensitivity=0.75)
    assert loaded.threshold == pytest.approx(expected.threshold)
    assert loaded.has_operating_point and "mean of the members' val outputs, 8 images" \
        in loaded.threshold_source and "sensitivity 0.75" in loaded.threshold_source
    members = {m.threshold for m in loaded.members}
    assert loaded.threshold not in members  # not a member's threshold borrowed
    assert "Its own operating point" in ensembles.describe(loaded)


def test_members_calibration_slices_are_preferred_to_their_selection_split(pair):
    """Runs with a calibration slice store it as a "calibration" evaluation: the ensemble's
    threshold is chosen there, not on the images that chose the members' epochs."""
    db, a, b = pair
    cal_p = {a: np.array([0.2, 0.1, 0.4, 0.9, 0.7, 0.6, 0.3, 0.8]),
             b: np.array([0.1, 0.3, 0.2, 0.8, 0.6, 0.9, 0.4, 0.7])}
    for run_id in (a, b):
        p = cal_p[run_id]
        es.record_evaluation(db, run_id=run_id, model_ref=f"run:{run_id}", dataset_id=None,
                             split="calibration", labels=["NORMAL", "PNEUMONIA"],
                             image_ids=[None] * 8, paths=[f"/cal/{i}.png" for i in range(8)],
                             y_true=VAL_Y, probs=np.column_stack([1 - p, p]), n_boot=0)
    loaded = refs.load_model_ref(f"ensemble:run:{a}+run:{b}", db=db)
    mean = (cal_p[a] + cal_p[b]) / 2
    expected = choose_threshold(VAL_Y, mean, method="sensitivity", target_sensitivity=0.75)
    assert loaded.threshold == pytest.approx(expected.threshold)
    assert "members' calibration outputs, 8 images" in loaded.threshold_source


def test_no_shared_validation_images_means_no_operating_point_said_so(cxr_home):
    db = open_db()
    a, b = _run(db, cxr_home, 1), _run(db, cxr_home, 2)
    _store_val(db, a, VAL_P[1])
    _store_val(db, b, VAL_P[2], paths=[f"/other/{i}.png" for i in range(8)])
    loaded = refs.load_model_ref(f"ensemble:run:{a}+run:{b}", db=db)
    assert loaded.threshold == 0.5 and loaded.threshold_source == ms.NO_THRESHOLD
    assert "different images" in loaded.card["operating_point_note"]
    assert "decisions use 0.5" in ensembles.describe(loaded)


# -- Named ensembles ------------------------------------------------------------------------

def test_create_list_and_load_a_named_ensemble_through_the_cli(pair, capsys, monkeypatch):
    db, a, b = pair
    monkeypatch.setenv("CXR_CLI_IDENTITY", "ds@h.org")
    assert cli.main(["ensemble", "create", "--name", "typed", "--members", f"run:{a}", str(b),
                     "--by", "someone else"]) == 2
    assert "never a typed name" in capsys.readouterr().err
    monkeypatch.setenv("CXR_CLI_ROLES", "reviewer")
    assert cli.main(["ensemble", "create", "--name", "seeds", "--members", f"run:{a}",
                     str(b)]) == 2
    assert "may not set operating point" in capsys.readouterr().err
    monkeypatch.delenv("CXR_CLI_ROLES")
    assert cli.main(["ensemble", "create", "--name", "seeds", "--members", f"run:{a}", str(b),
                     "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert ensembles.read_named("seeds")["created_by"] == "cli:ds@h.org"
    [ok, denied] = admin.audit_log(db, policy.cli_principal({"CXR_CLI_ROLES": "admin"}),
                                     action="set_operating_point")
    assert (ok.actor, ok.outcome, ok.target) == ("cli:ds@h.org", "ok", "ensemble:seeds")
    assert denied.outcome == "denied"
    assert made["ensemble"] == "ensemble:seeds" and made["members"] == [f"run:{a}", f"run:{b}"]
    assert cli.main(["ensemble", "list", "--json"]) == 0
    [listed] = json.loads(capsys.readouterr().out)["ensembles"]
    assert listed["threshold"] == made["threshold"]
    loaded = refs.load_model_ref("ensemble:seeds", db=db)
    assert loaded.ref == "ensemble:seeds" and loaded.threshold == made["threshold"]
    assert "ensemble:seeds" in [o.ref for o in inference.model_options(db)]
    # A name is never rewritten: its evaluations keep meaning what they meant.
    assert cli.main(["ensemble", "create", "--name", "seeds", "--members", "1", "2"]) == 2
    assert "exists" in capsys.readouterr().err


def test_named_ensemble_without_shared_validation_needs_a_threshold_by_hand(cxr_home, tmp_path):
    db = open_db()
    a = _run(db, cxr_home, 1)
    save_tiny_model(tmp_path / "default" / "model.keras", seed=5, card=BINARY_CARD)
    path = str(tmp_path / "default" / "model.keras")
    with pytest.raises(ConfigError, match="--threshold"):
        ensembles.create_ensemble(db, "mixed", [f"run:{a}", path])
    with pytest.raises(ConfigError, match="needs who set it"):
        ensembles.create_ensemble(db, "mixed", [f"run:{a}", path], threshold=0.4)
    info = ensembles.create_ensemble(db, "mixed", [f"run:{a}", path], threshold=0.4,
                                     changed_by="dr a", note="site sample")
    assert info.threshold == 0.4 and info.threshold_source == \
        "ensemble operating point (manual, dr a)"
    assert refs.load_model_ref("ensemble:mixed", db=db).threshold == 0.4
    with pytest.raises(ConfigError, match="an ensemble name is"):
        ensembles.create_ensemble(db, "9lives", [f"run:{a}", path], threshold=0.4,
                                  changed_by="x")


# -- Saliency -------------------------------------------------------------------------------

def test_ensemble_saliency_is_the_mean_of_the_members_maps(pair):
    db, a, b = pair
    loaded = refs.load_model_ref(f"ensemble:run:{a}+run:{b}", db=db)
    pred = inference.predict_batch(loaded, [inference.ImageInput("x.png", data=_png(4))]) \
        .predictions[0]
    explainer = explain.make_explainer(loaded)
    heat = explain.saliency_map(explainer, pred.pixels, "gradcam", pred.class_index)
    assert heat.shape == (24, 24) and heat.dtype == np.float32
    assert np.isfinite(heat).all() and 0.0 <= heat.min() and heat.max() <= 1.0
    one = [explain.saliency_map(e, pred.pixels, "gradcam", pred.class_index)
           for e in explainer.members]
    assert [m.shape for m in one] == [(16, 16), (24, 24)]
    from cxr_core.predict.render import resize_maps

    np.testing.assert_allclose(heat, (resize_maps(one[0][None], 24, 24)[0] + one[1]) / 2,
                               atol=1e-6)
    # No class given: the ensemble's own decision is explained.
    np.testing.assert_allclose(explain.saliency_map(explainer, pred.pixels, "gradcam"), heat,
                               atol=1e-6)
    assert explain.method_title(explainer, "gradcam") == \
        "mean of 2 members' normalised Grad-CAM maps"
    assert explain.saliency_unavailable(loaded.ref) is None
    assert "run:999 has no model file" in explain.saliency_unavailable("ensemble:run:1+run:999")


# -- Evaluate and Compare -------------------------------------------------------------------

def test_evaluate_an_ensemble_and_compare_it_with_its_members(pair, tiny_dataset, capsys):
    db, a, b = pair
    from cxr_core.data.indexing import index_dataset

    index_dataset(db, tiny_dataset, name="tiny")
    members = [es.evaluate_model(db, f"run:{r}", "tiny", split="train")[0] for r in (a, b)]
    ref = f"ensemble:run:{a}+run:{b}"
    assert cli.main(["evaluate", "--model", ref, "--data", "tiny", "--split", "train",
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == ref and out["n"] == 14
    assert out["threshold"] == pytest.approx(refs.load_model_ref(ref, db=db).threshold)
    stored = es.load_predictions(db, out["evaluation_id"])
    np.testing.assert_allclose(stored.probs, np.mean(
        [es.load_predictions(db, i).probs for i in members], axis=0), atol=1e-6)
    [group] = cs.comparable_groups(db, min_size=3)
    assert {e.model_ref for e in group.evaluations} == {ref, f"run:{a}", f"run:{b}"}
    cmp = cs.compare_evaluations(db, [out["evaluation_id"], *members], n_boot=0)
    assert cmp.threshold_sources[ref] == "ensemble operating point, at evaluation"
    assert cmp.thresholds[ref] == pytest.approx(out["threshold"])


def test_the_page_makes_ensembles_in_a_worker_job_as_its_submitter(pair):
    """The page's path: a create_ensemble job (set_operating_point's roles), run by a worker
    (the members' TensorFlow load is never in the Streamlit thread), made by the submitter."""
    from cxr_core.core.errors import PermissionDenied

    db, a, b = pair
    ds = policy.Principal(identity="ds@h.org", roles=frozenset({"scientist"}))
    rad = policy.Principal(identity="rad@h.org", roles=frozenset({"reviewer"}))
    params = dict(name="seeds", members=[f"run:{a}", f"run:{b}"], threshold=None, note="n")
    with pytest.raises(PermissionDenied):
        actions.submit_job(db, rad, "create_ensemble", params, once=False)
    job_id = actions.submit_job(db, ds, "create_ensemble", params, once=False)
    assert ensembles.list_ensembles() == []  # nothing is loaded or written at submit
    assert job_id in app.run_worker(once=True, kinds="jobs")["jobs"]
    assert ensembles.read_named("seeds")["created_by"] == "ds@h.org"
    from cxr_core.jobs import queue

    assert queue.get_job(db, job_id).result["ensemble"] == "ensemble:seeds"
