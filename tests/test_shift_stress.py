"""The synthetic-shift stress test (issue 14): fixed perturbations, the locked threshold, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
from test_ensembles import VAL_P, VAL_Y, _run, _store_val

from cxr_core import cli
from cxr_core.models import refs
from cxr_core.models import store as model_store
from cxr_core.evaluation import evaluate as es
from cxr_core.evaluation import stress
from cxr_core.core.errors import ConfigError, DatasetError
from cxr_core.storage import open_db

from conftest import write_image


def test_every_perturbation_is_deterministic_uint8_and_changes_the_image():
    rng = np.random.default_rng(0)
    images = rng.integers(30, 220, (3, 32, 32, 1), dtype=np.uint8)
    for name in stress.PERTURBATIONS:
        a, b = stress.perturb(images, name), stress.perturb(images, name)
        assert a.dtype == np.uint8 and a.shape == images.shape
        np.testing.assert_array_equal(a, b)
        if name == "none":
            np.testing.assert_array_equal(a, images)
        else:
            assert np.abs(a.astype(int) - images).mean() > 1, name
    flat = np.full((1, 8, 8, 1), 128, np.uint8)
    assert stress.perturb(flat, "darker").mean() < 128 < stress.perturb(flat, "brighter").mean()
    assert stress.perturb(images, "low_contrast").std() < images.std() < \
        stress.perturb(images, "high_contrast").std()
    with pytest.raises(ConfigError, match="unknown perturbation"):
        stress.perturb(images, "fog")


def test_score_reads_sensitivity_and_specificity_at_the_threshold():
    y = np.array([0, 0, 1, 1])
    auc, sens, spec = stress.score(y, np.array([0.1, 0.6, 0.7, 0.4]), 0.5)
    assert (auc, sens, spec) == (0.75, 0.5, 0.5)


@pytest.fixture()
def run_with_files(cxr_home, tmp_path):
    """A finished tiny run whose stored validation evaluation points at real image files."""
    db = open_db()
    run_id = _run(db, cxr_home, 1, size=16)
    paths = [str(write_image(tmp_path / "val" / f"{i}.png", seed=i)) for i in range(len(VAL_Y))]
    _store_val(db, run_id, VAL_P[1], paths=paths)
    return db, run_id


def test_stress_scores_the_same_model_at_its_locked_threshold(run_with_files):
    db, run_id = run_with_files
    ev_id = stress.run_val_evaluation(db, run_id)
    rows = stress.stress_evaluation(db, f"run:{run_id}", ev_id)
    assert [r.perturbation for r in rows] == list(stress.PERTURBATIONS)
    loaded = refs.load_model_ref(f"run:{run_id}", db=db)
    assert {r.threshold for r in rows} == {loaded.threshold} and {r.n for r in rows} == {8}
    # the "none" row is the model's own figures on those files, recomputed here
    from cxr_core.predict.inference import ImageInput, decode
    preds = es.load_predictions(db, ev_id)
    x = np.asarray([decode(ImageInput(p, path=p), 16, 1)[0] for p in preds.paths])
    p = model_store.to_probs(loaded.model.predict(x.astype(np.float32), verbose=0))[:, 1]
    assert rows[0].auc == pytest.approx(stress.score(VAL_Y, p, loaded.threshold)[0])
    out = stress.summary(rows)
    assert out["worst_specificity"] == min(r.specificity for r in rows[1:])


def test_stress_cli_prints_rows_and_refuses_bad_requests(run_with_files, capsys):
    db, run_id = run_with_files
    assert cli.main(["stress", "--run", str(run_id), "--only", "none", "blur", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["perturbation"] for r in out["rows"]] == ["none", "blur"]
    assert out["model"] == f"run:{run_id}" and "worst_auc" in out
    assert cli.main(["stress", "--json"]) != 0
    assert "exactly one of --run" in capsys.readouterr().err
    with pytest.raises(DatasetError, match="no stored 'test' evaluation"):
        stress.run_val_evaluation(db, run_id, "test")


def test_unreadable_evaluation_images_are_a_clear_error(cxr_home):
    db = open_db()
    run_id = _run(db, cxr_home, 2, size=16)
    _store_val(db, run_id, VAL_P[2])  # paths /val/i.png do not exist
    with pytest.raises(DatasetError, match="needs image files"):
        stress.stress_evaluation(db, f"run:{run_id}", stress.run_val_evaluation(db, run_id))


def test_tta_views_and_the_tta_score_are_the_mean_over_the_views(run_with_files):
    db, run_id = run_with_files
    img = np.arange(16, dtype=np.uint8).reshape(1, 4, 4, 1) * 10 + 5
    right = stress._apply(img, stress.TTA_VIEWS["shift_+4%"])
    np.testing.assert_array_equal(stress._apply(img, stress.TTA_VIEWS["identity"]), img)
    moved = stress._apply(np.full((1, 50, 50, 1), 9, np.uint8), stress.TTA_VIEWS["shift_+4%"])
    assert moved[0, :, :2].max() == 0 and moved[0, :, 2:].min() == 9
    assert right.shape == img.shape
    ev_id = stress.run_val_evaluation(db, run_id)
    [plain] = stress.stress_evaluation(db, f"run:{run_id}", ev_id, names=["none"])
    [tta] = stress.stress_evaluation(db, f"run:{run_id}", ev_id, names=["none"], tta=True)
    assert "4 TTA views" in tta.what and "TTA" not in plain.what
    loaded = refs.load_model_ref(f"run:{run_id}", db=db)
    from cxr_core.predict.inference import ImageInput, decode
    preds = es.load_predictions(db, ev_id)
    x = np.asarray([decode(ImageInput(p, path=p), 16, 1)[0] for p in preds.paths])
    p = np.mean([model_store.to_probs(loaded.model.predict(
        stress._apply(x, fn).astype(np.float32), verbose=0))[:, 1] for fn in stress.TTA_VIEWS.values()],
        axis=0)
    auc, sens, spec = stress.score(VAL_Y, p, loaded.threshold)
    assert (tta.auc, tta.sensitivity, tta.specificity) == pytest.approx((auc, sens, spec))


def test_stress_default_keeps_the_result_in_the_card_and_readme(run_with_files, tmp_path):
    """model_export stress-default: the shipped model's stress test, kept in its card (JSON
    and README), with the worst shift named."""
    from test_model_store import BINARY_CARD, save_tiny_model

    from cxr_core.training import export as model_export
    from cxr_core.models.card import stress_summary

    db, run_id = run_with_files
    out = tmp_path / "default"
    save_tiny_model(out / "model.keras", seed=3, card=dict(BINARY_CARD))
    entry = model_export.stress_default(stress.run_val_evaluation(db, run_id), db=db, out_dir=out)
    saved = json.loads((out / "model_card.json").read_text())["stress"]
    assert saved == entry and [r["perturbation"] for r in saved["rows"]] == list(stress.PERTURBATIONS)
    assert entry["threshold"] == 0.3 and entry["split"] == "val" and entry["n"] == 8
    assert entry["worst_specificity"]["specificity"] == min(
        r["specificity"] for r in saved["rows"][1:])
    readme = (out / "README.md").read_text()
    assert "## Under synthetic shift (stress test)" in readme and stress_summary(saved) in readme
    with pytest.raises(DatasetError, match="no evaluation with id 999"):
        model_export.stress_default(999, db=db, out_dir=out)
