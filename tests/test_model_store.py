"""model_store: run / file / default references, labels, thresholds, predict and decide."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cxr_core.evaluation import operating_points as ops
from cxr_core.models import refs
from cxr_core.models import store as ms
from cxr_core.core.errors import ConfigError, ModelError
from cxr_core.storage import open_db


def save_tiny_model(path: Path, *, units: int = 1, size: int = 16, channels: int = 1,
                    seed: int = 0, card: dict | None = None) -> Path:
    """A tiny flat functional model (Conv → GAP → predictions) saved as .keras (+ card)."""
    import keras

    init = keras.initializers.GlorotUniform(seed=seed)
    inp = keras.Input((size, size, channels), name="image")
    x = keras.layers.Rescaling(1 / 255.0, name="pre_rescale")(inp)
    x = keras.layers.Conv2D(4, 3, activation="relu", kernel_initializer=init, name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
    out = keras.layers.Dense(units, activation="sigmoid" if units == 1 else "softmax",
                             kernel_initializer=init, bias_initializer=keras.initializers.Constant(
                                 0.0), name="predictions")(x)
    path.parent.mkdir(parents=True, exist_ok=True)
    keras.Model(inp, out).save(path)
    if card is not None:
        (path.parent / ms.CARD_NAME).write_text(json.dumps(card))
    return path


def make_run(db, name: str) -> int:
    """A finished run row, through the runs storage module."""
    from cxr_core.storage import runs

    def add(s) -> int:
        run_id = runs.create_run(session=s, name=name, config={})
        runs.finish_run(session=s, run_id=run_id, status="finished")
        return run_id
    return db.write(add)


BINARY_CARD = {"name": "tiny", "model": "tiny", "labels": ["NORMAL", "PNEUMONIA"],
               "label_scheme": "binary", "image_size": 16, "channels": 1,
               "saliency_layer": "conv",
               "operating_point": {"threshold": 0.3, "method": "sensitivity", "target": 0.95,
                                   "sensitivity": 0.95, "specificity": 0.5}}


def test_file_without_card_infers_binary_and_flags_the_threshold(tmp_path):
    loaded = refs.load_model_ref(str(save_tiny_model(tmp_path / "m.keras")))
    assert loaded.labels == ("NORMAL", "PNEUMONIA") and loaded.label_scheme == "binary"
    assert (loaded.image_size, loaded.channels) == (16, 1)
    assert loaded.threshold == 0.5 and loaded.threshold_source == ms.NO_THRESHOLD
    assert not loaded.has_operating_point
    assert loaded.saliency_layer == "conv" and loaded.card == {} and loaded.run_id is None


def test_file_with_card_uses_its_labels_and_threshold(tmp_path):
    loaded = refs.load_model_ref(str(save_tiny_model(tmp_path / "m.keras", card=BINARY_CARD)))
    assert loaded.threshold == 0.3 and loaded.threshold_source == "model card"
    assert loaded.has_operating_point and loaded.card["name"] == "tiny"


@pytest.mark.parametrize("units, labels, scheme", [
    (2, ("NORMAL", "PNEUMONIA"), "binary"),
    (3, ("NORMAL", "BACTERIA", "VIRUS"), "three_class"),
])
def test_output_width_gives_the_labels(tmp_path, units, labels, scheme):
    loaded = refs.load_model_ref(str(save_tiny_model(tmp_path / "m.keras", units=units)))
    assert loaded.labels == labels and loaded.label_scheme == scheme
    assert loaded.threshold == (None if units == 3 else 0.5)


@pytest.mark.parametrize("ref, card, match", [
    ("model.h5", None, "a model reference is"),
    ("missing.keras", None, "model file not found"),
    ("m.keras", {"labels": ["A", "B", "C"]}, "lists 3 labels"),
    ("m.keras", {"image_size": 32}, "model card says image_size=32"),
    ("m.keras", {"operating_point": {"threshold": 1.5}}, "must be in"),
])
def test_bad_references_and_cards_are_model_errors(tmp_path, ref, card, match):
    save_tiny_model(tmp_path / "m.keras", card=card)
    with pytest.raises(ModelError, match=match):
        refs.load_model_ref(str(tmp_path / ref))


def test_default_is_a_clear_error_until_shipped(tmp_path):
    with pytest.raises(ModelError, match="no default model shipped yet"):
        refs.load_model_ref("default", models_dir=tmp_path)


def test_default_loads_from_the_models_dir(tmp_path):
    save_tiny_model(tmp_path / "default" / "model.keras", card=BINARY_CARD)
    loaded = refs.load_model_ref("default", models_dir=tmp_path / "default")
    assert loaded.ref == "default" and loaded.threshold == 0.3


def test_run_threshold_comes_from_the_db_then_follows_a_manual_change(cxr_home):
    db = open_db()
    run_id = make_run(db, "r")
    save_tiny_model(cxr_home / "runs" / str(run_id) / "best.keras", card=BINARY_CARD)
    assert refs.load_model_ref(str(run_id), db=db).threshold_source == "model card"
    y = np.array([0, 0, 1, 1, 1, 0, 1, 0])
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.9, 0.2, 0.6, 0.7])
    op = ops.set_operating_point(db, run_id=run_id, y_true=y, p_pos=p, target=1.0)
    loaded = refs.load_model_ref(f"run:{run_id}", db=db)
    assert loaded.ref == f"run:{run_id}" and loaded.run_id == run_id
    assert loaded.threshold == op.threshold == 0.35
    assert ms.decide(loaded, [[0.62, 0.38], [0.7, 0.3]]) == ["PNEUMONIA", "NORMAL"]
    ops.set_manual_threshold(db, run_id=run_id, threshold=0.5, changed_by="dr a", note="fewer FPs")
    loaded = refs.load_model_ref(f"run:{run_id}", db=db)
    assert loaded.threshold == 0.5 and "manual" in loaded.threshold_source
    assert ms.decide(loaded, [[0.62, 0.38], [0.4, 0.6]]) == ["NORMAL", "PNEUMONIA"]


def test_run_without_model_file_is_a_model_error(cxr_home):
    db = open_db()
    with pytest.raises(ModelError, match="has no model file"):
        refs.load_model_ref(f"run:{make_run(db, 'r')}", db=db)


def test_predict_probs_converts_channels_and_checks_size(tmp_path):
    loaded = refs.load_model_ref(str(save_tiny_model(tmp_path / "m.keras")))
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (3, 16, 16, 1), dtype=np.uint8)
    probs = ms.predict_probs(loaded, gray)
    assert probs.shape == (3, 2) and np.allclose(probs.sum(axis=1), 1.0)
    rgb = np.repeat(gray, 3, axis=3)
    assert np.allclose(ms.predict_probs(loaded, rgb), probs, atol=1e-5)
    with pytest.raises(ConfigError, match="images must be"):
        ms.predict_probs(loaded, rng.integers(0, 256, (1, 20, 20, 1), dtype=np.uint8))


@pytest.mark.parametrize("units", [1, 3])
def test_predict_probs_matches_model_predict_in_any_chunking(tmp_path, units):
    loaded = refs.load_model_ref(str(save_tiny_model(tmp_path / "m.keras", units=units)))
    x = np.random.default_rng(1).integers(0, 256, (5, 16, 16, 1), dtype=np.uint8)
    before = ms.to_probs(loaded.model.predict(x.astype(np.float32), batch_size=32, verbose=0))
    np.testing.assert_allclose(ms.predict_probs(loaded, x), before, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ms.predict_probs(loaded, x, batch_size=2), before, atol=1e-6)
    assert ms.predict_probs(loaded, x[:0]).shape == (0, 2 if units == 1 else 3)
    with pytest.raises(ConfigError, match="batch_size=0"):
        ms.predict_probs(loaded, x, batch_size=0)


def test_decide_never_silently_uses_half(tmp_path):
    loaded = refs.load_model_ref(str(save_tiny_model(tmp_path / "m.keras", card=BINARY_CARD)))
    probs = np.array([[0.65, 0.35], [0.75, 0.25]])
    assert ms.decide(loaded, probs) == ["PNEUMONIA", "NORMAL"]  # 0.3, not 0.5
    assert ms.decide(replace(loaded, threshold=0.2), probs) == ["PNEUMONIA", "PNEUMONIA"]
    three = refs.load_model_ref(str(save_tiny_model(tmp_path / "t" / "m.keras", units=3)))
    assert ms.decide(three, [[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]]) == ["VIRUS", "NORMAL"]


def test_the_shipped_card_readme_is_rendered_from_its_json_and_names_its_split():
    """models/default/README.md is card_markdown(model_card.json): the split its numbers
    come from is stated (a random patient split: in-distribution, said so), and a card with
    a calibration slice headlines figures its threshold was not chosen on."""
    import json

    from cxr_core.models.card import headline
    from cxr_core.models.card import card_markdown

    folder = Path(__file__).resolve().parents[1] / "models" / "default"
    card = json.loads((folder / "model_card.json").read_text())
    text = (folder / "README.md").read_text()
    assert text == card_markdown(card)
    split = card["training_config"].get("split", "patient")
    if split == "patient":
        assert "random patient" in text and "in-distribution" in text
    else:
        assert split in text
    if card["operating_point"].get("chosen_on") == "calibration":
        first = headline(card["measured"])[0]
        assert first["validation"] == split and not first["threshold_chosen_here"]
        assert first["threshold"] == pytest.approx(card["operating_point"]["threshold"])
        assert "evaluation_id" not in first  # no local ids shipped


def test_card_markdown_headlines_temporal_figures_and_marks_the_calibration_slice():
    """A card with a 'measured' list: temporal validation first, in-distribution second,
    the slice the threshold was chosen on only in the full table, marked."""
    import json

    from cxr_core.models.card import card_markdown

    card = json.loads((ms.DEFAULT_MODELS_DIR / "model_card.json").read_text())
    base = {"dataset": "d", "n": 100, "n_patients": 90, "ci_unit": "patient", "threshold": 0.7,
            "label_source": "original"}
    card["operating_point"] = {**card["operating_point"], "chosen_on": "calibration",
                               "calibration_n": 240}
    card["measured"] = [
        {**base, "split": "calibration", "role": "calibration", "validation": "temporal",
         "auc": 0.99, "auc_ci": [0.98, 1.0], "sensitivity": 0.95, "sensitivity_ci": [0.9, 1.0],
         "specificity": 0.97, "specificity_ci": [0.9, 1.0], "chosen_on": "calibration",
         "threshold_chosen_here": True},
        {**base, "split": "test", "role": "independent", "validation": None, "auc": 0.95,
         "auc_ci": [0.93, 0.97], "sensitivity": 0.96, "sensitivity_ci": [0.94, 0.98],
         "specificity": 0.8, "specificity_ci": [0.75, 0.85], "chosen_on": "calibration",
         "threshold_chosen_here": False},
        {**base, "split": "val", "role": "selection", "validation": "temporal", "auc": 0.98,
         "auc_ci": [0.97, 0.99], "sensitivity": 0.955, "sensitivity_ci": [0.93, 0.97],
         "specificity": 0.88, "specificity_ci": [0.84, 0.92], "chosen_on": "calibration",
         "threshold_chosen_here": False}]
    text = card_markdown(card)
    head = text.split("## Headline")[1].split("## Measured on every split")[0]
    bullets = [line for line in head.splitlines() if line.startswith("- ")]
    assert bullets[0].startswith("- **temporal validation: d [val], 100 images**: AUC 0.980 "
                                 "[0.970, 0.990], sensitivity 0.955 [0.930, 0.970]")
    assert bullets[1].startswith("- **evaluation: d [test]") and len(bullets) == 2
    table = text.split("## Measured on every split")[1]
    assert "calibration slice (temporal validation): d [calibration], 100 images (threshold " \
           "chosen here)" in table
    assert "chosen on the calibration slice (240 validation images" in text
