"""The three-class reading (issue 30): a subtype step trained on pneumonia films, class priors on
the card moving its outputs to the target prior, and the hierarchical model (pneumonia at the
binary model's operating point, then the subtype), through Predict's and Evaluate's paths."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_model_store import BINARY_CARD, save_tiny_model

from cxr_core.core.errors import ModelError
from cxr_core.core.labels import SUBTYPE_CLASSES, scheme_label, scheme_of_classes
from cxr_core.models import hierarchy, refs
from cxr_core.models import store as ms
from cxr_core.stats.metrics import predict

SUBTYPE_CARD = {"name": "sub", "model": "tiny", "labels": ["BACTERIA", "VIRUS"],
                "label_scheme": "subtype", "image_size": 16, "channels": 1,
                "operating_point": {"threshold": 0.5, "method": "priors"},
                "priors": {"classes": ["BACTERIA", "VIRUS"], "train": [0.5, 0.5],
                           "target": [0.65, 0.35],
                           "target_source": "the training images' class frequencies"}}


@pytest.mark.parametrize("label, subtype, expected", [
    ("NORMAL", None, None), ("PNEUMONIA", "bacteria", "BACTERIA"),
    ("PNEUMONIA", "virus", "VIRUS"), ("PNEUMONIA", None, None),
])
def test_the_subtype_scheme_has_a_class_only_for_pneumonia_with_a_stated_subtype(
        label, subtype, expected):
    assert scheme_label(label, subtype, "subtype") == expected
    assert scheme_of_classes(SUBTYPE_CLASSES) == "subtype"


def test_a_threshold_on_three_classes_is_the_two_step_reading():
    probs = np.array([[0.7, 0.2, 0.1],    # P(pneumonia) 0.3 < 0.4: NORMAL
                      [0.55, 0.1, 0.35],  # 0.45 >= 0.4, viral more probable: VIRUS
                      [0.5, 0.3, 0.2]])   # 0.5 >= 0.4: BACTERIA (argmax would say NORMAL)
    assert predict(probs, threshold=0.4).tolist() == [0, 2, 1]
    assert predict(probs).tolist() == [0, 0, 0]


@pytest.fixture()
def steps(tmp_path):
    pneu = save_tiny_model(tmp_path / "pneumonia" / "model.keras", seed=1,
                           card={**BINARY_CARD, "operating_point": {"threshold": 0.45}})
    sub = save_tiny_model(tmp_path / "subtype" / "model.keras", seed=2, card=SUBTYPE_CARD)
    return tmp_path, pneu, sub


def test_a_cards_priors_move_the_subtype_outputs_to_the_target_prior(steps):
    _, _, sub = steps
    loaded = ms.load_single(str(sub))
    assert loaded.priors["target"] == [0.65, 0.35]
    x = np.random.default_rng(0).integers(0, 255, (6, 16, 16, 1), dtype=np.uint8)
    raw = ms.to_probs(loaded.model.predict_on_batch(x.astype(np.float32)))
    got = ms.predict_probs(loaded, x)
    w = raw * np.array([0.65, 0.35]) / 0.5
    np.testing.assert_allclose(got, w / w.sum(1, keepdims=True), atol=1e-6)
    site = ms.with_target_prior(loaded, [0.3, 0.7], "site B's confirmed films")
    assert site.card["priors"]["target_source"] == "site B's confirmed films"
    assert (ms.predict_probs(site, x)[:, 1] > got[:, 1]).all()  # a more viral site
    with pytest.raises(ModelError, match="one value per class"):
        ms.with_target_prior(loaded, [1.0], "x")
    binary = ms.load_single(str(steps[1]))
    assert binary.priors is None  # decided at its operating point, never moved
    with pytest.raises(ModelError, match="no class priors"):
        ms.with_target_prior(binary, [0.5, 0.5], "x")


def test_the_hierarchical_model_decides_pneumonia_first_then_the_subtype(steps):
    _, pneu, sub = steps
    ref = hierarchy.hierarchical_ref(str(pneu), str(sub))
    loaded = refs.load_model_ref(ref)
    assert loaded.is_hierarchical and loaded.labels == ("NORMAL", "BACTERIA", "VIRUS")
    assert loaded.threshold == 0.45 and "two steps" in loaded.threshold_source
    x = np.random.default_rng(1).integers(0, 255, (8, 16, 16, 1), dtype=np.uint8)
    p = ms.predict_probs(loaded.members[0], x)[:, 1]
    q = ms.predict_probs(loaded.members[1], x)
    probs = ms.predict_probs(loaded, x)
    np.testing.assert_allclose(probs, np.column_stack([1 - p, p * q[:, 0], p * q[:, 1]]),
                               atol=1e-6)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    expected = ["NORMAL" if pi < 0.45 else ("BACTERIA" if qi[0] >= qi[1] else "VIRUS")
                for pi, qi in zip(p, q)]
    assert ms.decide(loaded, probs) == expected


def test_the_shipped_layout_loads_and_its_steps_are_checked(steps, tmp_path):
    folder, pneu, sub = steps
    (folder / "model_card.json").write_text(json.dumps({"name": "three", "measured": []}))
    loaded = hierarchy.load_hierarchical("three_class", models_dir=folder)
    assert loaded.ref == "three_class" and loaded.card["name"] == "three"
    assert loaded.card["steps"]["subtype"]["priors"]["target"] == [0.65, 0.35]
    with pytest.raises(ModelError, match="pneumonia step must be a binary"):
        refs.load_model_ref(hierarchy.hierarchical_ref(str(sub), str(sub)))
    with pytest.raises(ModelError, match="subtype step must be"):
        refs.load_model_ref(hierarchy.hierarchical_ref(str(pneu), str(pneu)))
    with pytest.raises(ModelError, match="two single models"):
        refs.load_model_ref("hier:run:1")
    with pytest.raises(ModelError, match="no three-class model shipped"):
        hierarchy.load_hierarchical("three_class", models_dir=tmp_path / "none")
    bare = save_tiny_model(tmp_path / "bare" / "model.keras", seed=3,
                           card={k: v for k, v in BINARY_CARD.items()
                                 if k != "operating_point"})
    with pytest.raises(ModelError, match="no stored operating point"):
        refs.load_model_ref(hierarchy.hierarchical_ref(str(bare), str(sub)))


def test_predict_says_both_steps_and_saliency_maps_the_deciding_step(steps):
    from cxr_core.predict import explain, inference

    _, pneu, sub = steps
    ref = hierarchy.hierarchical_ref(str(pneu), str(sub))
    loaded = refs.load_model_ref(ref)
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 40), dtype=np.uint8)).save(
        buf, format="PNG")
    result = inference.predict_batch(loaded, [inference.ImageInput("film.png", buf.getvalue())])
    [pred] = result.predictions
    text = inference.decision_text(result, pred)
    assert ("step 1 of 2" in text) if pred.label == "NORMAL" else ("then **" in text)
    assert explain.saliency_unavailable(ref) is None
    explainer = explain.make_explainer(loaded)
    assert isinstance(explainer, explain.StepExplainer)
    for k in range(3):
        m = explain.saliency_map(explainer, pred.pixels, "gradcam", k)
        assert m.shape == (16, 16) and 0.0 <= m.min() and m.max() <= 1.0
    assert "step that decided" in explain.method_title(explainer, "gradcam")
    assert "no model file" in explain.saliency_unavailable(
        hierarchy.hierarchical_ref(str(pneu), "/nope/model.keras"))


# -- Through the worker, on real films ---------------------------------------------------------

@pytest.fixture()
def films(shared_data, tmp_path):
    """A small real Kaggle-layout folder: train 24 normal, 24 bacterial, 24 viral films; and a
    site of 10 of each from the external sample (file names carry the subtype)."""
    def link(src, dst, k, pick):
        dst.mkdir(parents=True, exist_ok=True)
        files = [f for f in sorted(src.glob("*.jpeg")) if pick(f.name)]
        for f in files[::max(1, len(files) // k)][:k]:
            (dst / f.name).symlink_to(f)

    train = shared_data / "chest_xray_224" / "train"
    ours = tmp_path / "ours"
    link(train / "NORMAL", ours / "train" / "NORMAL", 24, lambda n: True)
    for kind in ("bacteria", "virus"):
        link(train / "PNEUMONIA", ours / "train" / "PNEUMONIA", 24, lambda n, k=kind: k in n)
    ext = shared_data / "chest_xray_224_external"
    site = tmp_path / "site"
    link(ext / "NORMAL", site / "NORMAL", 10, lambda n: True)
    for kind in ("bacteria", "virus"):
        link(ext / "PNEUMONIA", site / "PNEUMONIA", 10, lambda n, k=kind: k in n)
    return ours, site


@pytest.mark.slow
def test_a_subtype_run_and_a_hierarchical_evaluation_through_the_worker(cxr_home, films):
    from cxr_core import app
    from cxr_core.data.indexing import index_dataset
    from cxr_core.evaluation import evaluate as es
    from cxr_core.storage import open_db
    from cxr_core.storage import runs as store
    from cxr_core.training import service

    ours, site = films
    db = open_db()
    index_dataset(db, ours, name="ours")
    index_dataset(db, site, name="site", external=True)
    base = dict(recipe="cpu128", model="small3_50", image_size=32, epochs=1, batch_size=16,
                augment="none", dataset="ours")
    ids = {}
    for scheme, extra in (("binary", {"calibration_fraction": 0.3}),
                          ("subtype", {"monitor": "val_loss"}),
                          ("three_class", {"monitor": "val_loss"})):
        cfg = service.make_config(db, {**base, **extra, "label_scheme": scheme})
        ids[scheme] = service.queue_run(db, cfg)
        (outcome,) = app.run_worker(once=True, db=db)["runs"]
        assert outcome["status"] == "finished", outcome
    cards = {}
    for scheme, rid in ids.items():
        with db.session() as s:
            run = store.get_run(session=s, run_id=rid)
        cards[scheme] = json.loads((Path(run.artifact_dir) / "model_card.json").read_text())
    assert "priors" not in cards["binary"]  # decided at its operating point
    sub = cards["subtype"]
    assert sub["labels"] == ["BACTERIA", "VIRUS"] and "NORMAL" not in sub["dataset"]["counts"][
        "train"]  # normal films have no class in the subtype step
    assert sub["priors"]["train"] == [0.5, 0.5]  # class weights balance the classes
    counts = sub["priors"]["train_counts"]
    assert sub["priors"]["target"] == pytest.approx([c / sum(counts) for c in counts], abs=1e-5)
    assert sub["operating_point"]["method"] == "priors"
    assert cards["three_class"]["priors"]["classes"] == ["NORMAL", "BACTERIA", "VIRUS"]

    ref = hierarchy.hierarchical_ref(f"run:{ids['binary']}", f"run:{ids['subtype']}")
    ev_id, report = es.evaluate_model(db, ref, "site")
    assert report.labels == ("NORMAL", "BACTERIA", "VIRUS") and report.n == 30
    binary = refs.load_model_ref(f"run:{ids['binary']}", db=db)
    assert report.threshold == pytest.approx(binary.threshold)  # the pneumonia step decides
    preds = es.load_predictions(db, ev_id)
    expected = predict(preds.probs, threshold=binary.threshold)
    assert report.confusion_matrix.sum() == 30
    assert (np.asarray(report.confusion_matrix).sum(0)
            == np.bincount(expected, minlength=3)).all()

    # Shipped as models/three_class (here a temporary folder): both steps and the composite
    # card, its external figures cross-fitted.
    from cxr_core.training.export import export_three_class

    out = cxr_home / "three_class"
    es.evaluate_model(db, f"run:{ids['binary']}", "site")  # the site threshold is chosen there
    card = export_three_class(f"run:{ids['binary']}", ids["subtype"], db=db, out_dir=out,
                              external="site", site_prior=True, n_boot=50)
    for step in ("pneumonia", "subtype"):
        assert (out / step / "model.keras").is_file() and (out / step / "model_card.json").is_file()
    [m] = card["measured"]
    fit = m["hierarchical_crossfit"]
    assert m["n"] == 30 and fit["chosen"] == "pneumonia threshold, prior"
    assert fit["accuracy_ci"][0] <= fit["accuracy"] <= fit["accuracy_ci"][1]
    assert sum(map(sum, fit["confusion"])) == 30
    shipped = hierarchy.load_hierarchical("three_class", models_dir=out)
    assert shipped.members[1].priors["target_source"] == "site's labelled pneumonia films"
    assert shipped.members[1].priors["target"] == pytest.approx([11 / 22, 11 / 22])  # 10+1 each
    assert shipped.members[0].card["operating_point"]["chosen_on"] == "site"
    readme = (out / "README.md").read_text()
    assert "two steps, cross-fitted (pneumonia threshold, prior chosen" in readme
    assert "At a new site: `site` (30 films" in readme
