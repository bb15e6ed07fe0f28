"""Per-class report and model size (issue 27 item 7): precision, recall, F1 and support per
class plus macro and weighted averages at the operating point (Compare, the model card, the
run view), parameter counts (total, trainable) on the card and the run view."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import classification_report

from cxr_core.models.card import card_markdown, card_per_class, parameters_text
from cxr_core.stats.reports import class_report, evaluate

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("k, threshold", [(2, 0.3), (2, 0.7), (3, None)])
def test_class_report_is_sklearns_classification_report(k, threshold):
    rng = np.random.default_rng(k)
    y = rng.integers(0, k, 300)
    p = rng.dirichlet(np.ones(k), 300)
    p[np.arange(300), y] += 0.3
    p /= p.sum(axis=1, keepdims=True)
    labels = ["NORMAL", "PNEUMONIA"] if k == 2 else ["NORMAL", "BACTERIA", "VIRUS"]
    rep = evaluate(y, p, labels, threshold=threshold, n_boot=0)
    pred = (p[:, 1] >= threshold).astype(int) if k == 2 else p.argmax(axis=1)
    want = classification_report(y, pred, target_names=labels, output_dict=True,
                                 zero_division=0)
    rows = {r["class"]: r for r in class_report(rep.per_class)}
    assert list(rows) == [*labels, "macro avg", "weighted avg"]
    for name, row in rows.items():
        for ours, theirs in (("precision", "precision"), ("recall", "recall"),
                             ("f1", "f1-score"), ("support", "support")):
            assert row[ours] == pytest.approx(want[name][theirs]), (name, ours)
    # The stored (JSON) form gives the same rows.
    assert class_report(rep.to_dict()["per_class"]) == class_report(rep.per_class)


def test_an_older_binary_cards_per_class_is_derived_exactly_from_its_own_figures():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(141, int), np.ones(408, int)]
    p1 = np.clip(y * 0.6 + rng.normal(0.2, 0.2, y.size), 0, 1)
    rep = evaluate(y, np.c_[1 - p1, p1], ["NORMAL", "PNEUMONIA"], threshold=0.47, n_boot=0)
    card = {"labels": ["NORMAL", "PNEUMONIA"],
            "val_metrics": {"sensitivity": rep.sensitivity, "specificity": rep.specificity,
                            "threshold": 0.47, "n": 549},
            "dataset": {"counts": {"val": {"NORMAL": 141, "PNEUMONIA": 408}}}}
    derived = card_per_class(card)
    for got, want in zip(derived["rows"], class_report(rep.per_class)):
        assert got["class"] == want["class"] and got["support"] == want["support"]
        assert got["precision"] == pytest.approx(want["precision"])
        assert got["f1"] == pytest.approx(want["f1"])
    assert "derived" in derived
    stored = {**card, "per_class": {"split": "val", "threshold": 0.47, "n": 549,
                                    "rows": class_report(rep.per_class)}}
    assert "derived" not in card_per_class(stored)  # a card's own report wins
    assert card_per_class({"labels": ["A", "B", "C"]}) is None


def test_the_shipped_card_shows_parameters_and_the_per_class_table():
    card = json.loads((REPO / "models" / "default" / "model_card.json").read_text())
    params = card["parameters"]
    assert params["total"] == params["trainable"] + params["non_trainable"] > 0
    text = card_markdown(card)
    assert f"| Parameters | {parameters_text(params)} |" in text
    assert "## Per class at the operating point" in text and "| weighted avg |" in text
    assert (REPO / "models" / "default" / "README.md").read_text() == text  # kept in step


def test_parameter_counts_are_keras_counts(tmp_path):
    import keras

    from cxr_core.models import graph, layers
    from tests.test_model_store import save_tiny_model

    model = layers.load_model(save_tiny_model(tmp_path / "m.keras"))
    model.get_layer("conv").trainable = False
    counts = graph.parameter_counts(model)
    assert counts["total"] == model.count_params() == 4 * 9 + 4 + 4 + 1
    assert counts["trainable"] == sum(int(np.prod(w.shape)) for w in model.trainable_weights) == 5
    assert counts["non_trainable"] == 40
    assert isinstance(keras.__version__, str)
