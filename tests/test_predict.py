"""cxr_core.predict.inference and its neighbours (explain, uploads, predict_cli, model_export): batches
mixing good and bad files, saliency per method and family, uploads stored by hash (DICOM without
its header), review queue, CLI contract, default model."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import dicom_bytes, png_claiming
from cxr_core.predict import explain as E
from cxr_core.training import export as X
from cxr_core.predict import inference as P
from cxr_core.predict import uploads as U
from cxr_core.models.refs import load_model_ref
from cxr_core.predict.cli import predict_cli
from cxr_core.core.errors import ConfigError, ModelError
from cxr_core.models.store import CARD_NAME, DEFAULT_MODELS_DIR
from cxr_core.predict.saliency import METHODS

CARD = {"labels": ["NORMAL", "PNEUMONIA"], "label_scheme": "binary",
        "operating_point": {"threshold": 0.4, "method": "sensitivity", "target": 0.95}}


# -- Fixtures: one tiny registry model, and bytes of every kind of file ---------------------

def _registry_model(name: str, size: int, channels: int, num_classes: int = 2):
    from cxr_core.models import graph
    from cxr_core.models.specs import ModelConfig

    import keras

    keras.utils.set_random_seed(0)
    cfg = ModelConfig(name=name, image_size=size, channels=channels)
    return graph.build_model(cfg, num_classes)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A small3_128 CNN at 32 px saved as .keras with a card (operating point 0.4)."""
    folder = tmp_path_factory.mktemp("model")
    _registry_model("small3_128", 32, 1).save(folder / "m.keras")
    (folder / CARD_NAME).write_text(json.dumps(CARD))
    return folder / "m.keras"


@pytest.fixture(scope="module")
def loaded(model_file):
    return load_model_ref(str(model_file))


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(size: int = 96, seed: int = 0, mode: str = "L") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _gif_animated() -> bytes:
    frames = [Image.fromarray(np.full((16, 16), v, np.uint8)) for v in (0, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    return buf.getvalue()


def _cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)) \
        .convert("CMYK").save(buf, format="JPEG")
    return buf.getvalue()


def _gray16_png() -> bytes:
    arr = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)
    return _png(arr)


def _dicom_pixels() -> np.ndarray:
    return np.linspace(0, 4095, 48 * 48).reshape(48, 48).astype(np.uint16)


GOOD = {  # name -> bytes: formats the loader must handle, each predicted
    "film.jpeg": lambda: _jpeg(),
    "film.png": lambda: _png(np.full((40, 56), 120, np.uint8)),
    "film.bmp": lambda: _bmp(),
    "film.tiff": lambda: _tiff(),
    "gray16.png": _gray16_png,
    "cmyk.jpg": _cmyk_jpeg,
    "mono1.dcm": lambda: dicom_bytes(_dicom_pixels(), photometric="MONOCHROME1"),
    "no_extension_dicom": lambda: dicom_bytes(_dicom_pixels()),
}
BAD = {  # name -> (bytes, what the message must say)
    "notes.png": (lambda: b"patient notes, not an image\n" * 10, "not a readable image"),
    "empty.jpg": (lambda: b"", "empty (0 bytes)"),
    "truncated.jpeg": (lambda: _jpeg(256)[: len(_jpeg(256)) // 2], "truncated"),
    "animated.gif": (_gif_animated, "frames"),
    "bomb.png": (lambda: png_claiming(30_000, 30_000, rows=8), "too large"),
    "nopixels.dcm": (lambda: dicom_bytes(None), "no pixel data"),
}


def _bmp() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(buf, format="BMP")
    return buf.getvalue()


def _tiff() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 48), 200, np.uint8)).save(buf, format="TIFF")
    return buf.getvalue()


@pytest.fixture()
def mixed_folder(tmp_path) -> Path:
    """Good and bad files side by side, plus a 60 MB (sparse) oversized file."""
    folder = tmp_path / "batch"
    folder.mkdir()
    for name, make in GOOD.items():
        (folder / name).write_bytes(make())
    for name, (make, _) in BAD.items():
        (folder / name).write_bytes(make())
    with open(folder / "oversized.png", "wb") as fh:
        fh.write(_png(np.zeros((8, 8), np.uint8)))
        fh.truncate(60 * 2**20)  # sparse: refused from its size, before being read
    return folder


# -- Batches: good files predicted, each bad one a clear error ------------------------------

def test_mixed_batch_predicts_good_files_and_reports_each_bad_one(model_file, mixed_folder):
    names = sorted(p.name for p in mixed_folder.iterdir())
    out = predict_cli(str(model_file), [str(mixed_folder / n) for n in names])
    predicted = {Path(p["file"]).name: p for p in out["predictions"]}
    errors = {Path(e["file"]).name: e["error"] for e in out["errors"]}
    assert all(e["error"].startswith(e["file"]) for e in out["errors"])  # names the file
    assert set(predicted) == set(GOOD)
    assert set(errors) == set(BAD) | {"oversized.png"}
    for name, (_, expected) in BAD.items():
        assert expected in errors[name], (name, errors[name])
        assert "\n" not in errors[name]
    assert "file too large (60.0 MB; at most 50 MB)" in errors["oversized.png"]
    for p in predicted.values():
        assert p["label"] in ("NORMAL", "PNEUMONIA") and p["threshold"] == 0.4
        assert sum(p["probabilities"].values()) == pytest.approx(1.0)
        assert p["saliency"] is None
        positive = p["probabilities"]["PNEUMONIA"] >= 0.4
        assert p["label"] == ("PNEUMONIA" if positive else "NORMAL")  # the stored operating point


def test_batch_from_bytes_keeps_input_order_and_csv(loaded):
    items = [P.ImageInput("=cmd|' /C calc'!A0.png", data=_png(np.full((32, 32), 9, np.uint8))),
             P.ImageInput("empty.png", data=b""),
             P.ImageInput("b.dcm", data=dicom_bytes(_dicom_pixels()))]
    seen = []
    result = P.predict_batch(loaded, items, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert [r["file"] for r in result.rows()] == [i.name for i in items]
    assert [bool(r["error"]) for r in result.rows()] == [False, True, False]
    assert result.predictions[1].dicom and result.predictions[1].pixels.shape == (32, 32, 1)
    csv_text = result.to_csv()
    assert csv_text.splitlines()[0] == "file,label,p_NORMAL,p_PNEUMONIA,threshold,error"
    assert "'=cmd" in csv_text  # a spreadsheet would run "=..." as a formula
    assert "0.4" in P.decision_text(result, result.predictions[0])


def test_all_bad_batch_runs_no_model(loaded):
    result = P.predict_batch(loaded, [P.ImageInput("x.png", data=b"")])
    assert result.predictions == () and len(result.errors) == 1


def test_image_input_needs_exactly_one_source():
    with pytest.raises(ConfigError, match="exactly one of data or path"):
        P.ImageInput("x")


def test_missing_path_is_a_per_file_error(loaded, tmp_path):
    result = P.predict_batch(loaded, [P.ImageInput("gone.png", path=str(tmp_path / "gone.png"))])
    assert "gone.png: cannot read file" in result.errors[0].error


# -- Saliency: every method, both families, predicted and other class -----------------------

@pytest.fixture(scope="module", params=[("small3_128", 32, 1), ("mobilenetv2", 32, 3)],
            ids=["small_cnn", "keras_applications"])
def family(request, tmp_path_factory):
    name, size, channels = request.param
    folder = tmp_path_factory.mktemp(name)
    _registry_model(name, size, channels).save(folder / "m.keras")
    (folder / CARD_NAME).write_text(json.dumps(CARD))
    loaded = load_model_ref(str(folder / "m.keras"))
    return loaded, E.make_explainer(loaded)


@pytest.mark.parametrize("method", METHODS)
def test_saliency_maps_have_the_input_shape_and_range(family, method):
    loaded, explainer = family
    items = [P.ImageInput("a.png", data=_jpeg(64, seed=3))]
    pred = P.predict_batch(loaded, items).predictions[0]
    for class_index, _ in E.class_choices(loaded.labels, pred):
        heat = E.saliency_map(explainer, pred.pixels, method, class_index, fast=True)
        size = loaded.image_size
        assert heat.shape == (size, size) and heat.dtype == np.float32
        assert np.isfinite(heat).all() and heat.min() >= 0.0 and heat.max() <= 1.0
    png = E.overlay_png(E.display_pixels(items[0]), heat, alpha=0.5)
    assert Image.open(io.BytesIO(png)).size == (64, 64)


def test_class_choices_put_the_predicted_class_first(loaded):
    pred = P.predict_batch(loaded, [P.ImageInput("a.png", data=_jpeg())]).predictions[0]
    choices = E.class_choices(loaded.labels, pred)
    assert choices[0] == (pred.class_index, f"{pred.label} (predicted)") and len(choices) == 2
    assert choices[1][1] in loaded.labels and choices[1][1] != pred.label


def test_model_without_conv_layer_cannot_be_explained(loaded):
    from dataclasses import replace

    with pytest.raises(ModelError, match="no convolutional layer"):
        E.make_explainer(replace(loaded, saliency_layer=None))


# -- Command line ---------------------------------------------------------------------------

def test_cli_prints_one_json_object_with_generated_saliency_names(model_file, tmp_path, capsys,
                                                                 cxr_home):
    from cxr_core.cli import main

    good = tmp_path / "Doe_Jane_1999-01-01.png"
    good.write_bytes(_jpeg(80))
    bad = tmp_path / "empty.png"
    bad.write_bytes(b"")
    out_dir = tmp_path / "maps"
    code = main(["predict", "--model", str(model_file), str(good), str(bad),
                 "--saliency", "gradcam++", "--out", str(out_dir), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    [pred], [err] = out["predictions"], out["errors"]
    assert pred["file"] == str(good) and err["file"] == str(bad)
    saved = Path(pred["saliency"])
    assert saved.parent == out_dir and saved.is_file() and "Doe" not in saved.name
    assert saved.name.endswith("-gradcampp.png")
    assert Image.open(saved).size == (80, 80)
    assert "saliency_warning" in pred


def test_cli_rejects_unknown_saliency_method(model_file, tmp_path, capsys):
    from cxr_core.cli import main

    assert main(["predict", "--model", str(model_file), "x.png", "--saliency", "lime",
                 "--json"]) == 2
    assert "saliency=" in capsys.readouterr().err


# -- Uploads and the review queue -----------------------------------------------------------

def test_dicom_upload_is_stored_as_pixels_only_under_its_hash(tmp_path):
    item = P.ImageInput("Doe_Jane.dcm", data=dicom_bytes(_dicom_pixels()))
    sha = U.store_upload(item, uploads_dir=tmp_path)
    stored = U.upload_path(sha, uploads_dir=tmp_path)
    assert stored == tmp_path / f"{sha}.png"
    data = stored.read_bytes()
    assert b"Doe" not in data and b"SECRET-4711" not in data and b"DICM" not in data
    assert Image.open(stored).size == (48, 48)
    assert U.store_upload(item, uploads_dir=tmp_path) == sha  # idempotent
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{sha}.png"]


def test_send_to_review_stores_upload_and_queues_it(cxr_home, loaded):
    from cxr_core.storage import open_db
    from cxr_core.storage import reviews

    db = open_db()
    data = _jpeg(64)
    pred = P.predict_batch(loaded, [P.ImageInput("../../etc/evil name.jpg", data=data)]) \
        .predictions[0]
    item_id = U.send_to_review(db, pred, model_ref="default", sent_by="Dr Test")
    with db.session() as s:
        [item] = reviews.list_review_items(session=s)
    assert item.id == item_id and item.source == "predict" and item.image_id is None
    assert item.upload_sha256 == pred.sha256  # non-DICOM bytes are stored as they came
    assert item.predicted == pred.label and item.run_ref == "default"
    assert item.probs == pytest.approx(tuple(pred.probabilities.values()))
    stored = list((cxr_home / "uploads").iterdir())
    assert [p.name for p in stored] == [f"{pred.sha256}.jpg"] and stored[0].read_bytes() == data


def test_indexed_images_go_to_review_by_id(cxr_home, loaded, tiny_dataset):
    from cxr_core.data.indexing import index_dataset
    from cxr_core.storage import datasets as ds_store
    from cxr_core.storage import open_db
    from cxr_core.storage import reviews

    db = open_db()
    dataset_id = index_dataset(db, tiny_dataset, name="tiny").dataset_id
    with db.session() as s:
        info = ds_store.get_dataset(session=s, name_or_id=dataset_id)
        records = ds_store.list_images(session=s, dataset_id=dataset_id)[:2]
    result = P.predict_batch(loaded, P.dataset_inputs(info.root, records))
    assert len(result.predictions) == 2
    U.send_to_review(db, result.predictions[0], model_ref="default", sent_by="x")
    with db.session() as s:
        [item] = reviews.list_review_items(session=s)
    assert item.image_id == records[0].id and item.upload_sha256 is None
    assert not (cxr_home / "uploads").exists()


def test_npz_records_become_png_inputs(tmp_path):
    from types import SimpleNamespace

    path = tmp_path / "mnist.npz"
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    np.savez(path, train_images=images, train_labels=np.array([[0], [1], [0]]))
    [item] = P.dataset_inputs(path, [SimpleNamespace(id=7, relpath="npz:train:2")])
    assert item.image_id == 7 and item.name == "npz:train:2"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(item.data))), images[2])


def test_model_options_list_default_and_finished_runs(cxr_home):
    from cxr_core.storage import open_db

    refs = [o.ref for o in P.model_options(open_db())]
    assert refs[:1] == (["default"] if (DEFAULT_MODELS_DIR / "model.keras").is_file() else [])


def test_module_does_not_import_streamlit_and_names_every_method():
    assert "import streamlit" not in Path(P.__file__).read_text()
    assert tuple(E.METHOD_NAMES) == METHODS


# -- Exporting a run as the default model ---------------------------------------------------

def _finished_run(cxr_home, status: str = "finished") -> tuple[object, int]:
    from cxr_core.storage import open_db
    from cxr_core.storage import runs as run_store

    db = open_db()
    run_id = db.write(lambda s: run_store.create_run(session=s, name="tiny", config={}))
    folder = cxr_home / "runs" / str(run_id)
    folder.mkdir(parents=True)
    _registry_model("small3_128", 32, 1).save(folder / "best.keras")
    card = {**CARD, "model": "small3_128", "image_size": 32, "channels": 1, "run_id": run_id,
            "model_ref": f"run:{run_id}", "evaluation_id": 3, "model_file": "best.keras",
            "val_metrics": {"n": 10, "auc": 0.9, "sensitivity": 0.95, "specificity": 0.8,
                            "threshold": 0.4},
            "training_config": {"recipe": "cpu128", "dataset": str(cxr_home / "data")},
            "dataset": {"id": 1, "root": str(cxr_home / "data")}}
    (folder / CARD_NAME).write_text(json.dumps(card))
    db.write(lambda s: run_store.finish_run(session=s, run_id=run_id, status=status))
    return db, run_id


def test_export_default_writes_a_shippable_model_and_card(cxr_home, tmp_path):
    db, run_id = _finished_run(cxr_home)
    out = tmp_path / "default"
    card = X.export_default(run_id, db=db, out_dir=out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.keras", CARD_NAME]
    assert card["data_licence"]["licence"] == "CC BY 4.0" and card["model_file"] == "model.keras"
    assert "run_id" not in card and "model_ref" not in card
    assert card["exported_from"]["run_id"] == run_id and card["exported_from"]["evaluation_id"] == 3
    assert not Path(card["training_config"]["dataset"]).is_absolute()
    assert not Path(card["dataset"]["root"]).is_absolute() and "id" not in card["dataset"]
    reloaded = load_model_ref(str(out / "model.keras"))
    assert reloaded.threshold == 0.4 and reloaded.threshold_source == "model card"
    readme = (out / "README.md").read_text()
    assert "| 0.900 | 0.950 | 0.800 |" in readme and "export-default ID" in readme
    assert "CC BY 4.0" in readme


def test_export_default_refuses_unfinished_runs_and_large_models(cxr_home, tmp_path):
    db, run_id = _finished_run(cxr_home, status="failed")
    with pytest.raises(ModelError, match="only a finished run"):
        X.export_default(run_id, db=db, out_dir=tmp_path / "a")
    db, run_id = _finished_run(cxr_home)
    with pytest.raises(ModelError, match="at most 0.01 MB"):
        X.export_default(run_id, db=db, out_dir=tmp_path / "b", max_mb=0.01)
    assert not (tmp_path / "b" / "model.keras").exists()


# -- The shipped default model: loads, predicts real films, card complete -------------------

def test_default_model_predicts_real_images(shared_data):
    loaded = load_model_ref("default")
    assert loaded.threshold_source == "model card" and 0.0 < loaded.threshold < 1.0
    paths = [p for cls in ("NORMAL", "PNEUMONIA")
             for p in sorted((shared_data / "chest_xray_fullres_sample" / "train" / cls)
                             .glob("*.jpeg"))[:6]]
    result = P.predict_batch(loaded, [P.ImageInput(p.name, path=str(p)) for p in paths])
    assert not result.errors and len(result.predictions) == 12
    truth = ["PNEUMONIA" if "person" in p.name else "NORMAL" for p in paths]
    correct = sum(p.label == t for p, t in zip(result.predictions, truth))
    assert correct >= 9, [(p.source.name, p.probabilities) for p in result.predictions]
    heat = E.saliency_map(E.make_explainer(loaded), result.predictions[0].pixels, "gradcam",
                          result.predictions[0].class_index)
    assert heat.shape == (loaded.image_size,) * 2 and np.isfinite(heat).all()


def test_default_model_card_is_complete():
    folder = DEFAULT_MODELS_DIR
    assert (folder / "model.keras").stat().st_size <= 15 * 2**20
    card = json.loads((folder / CARD_NAME).read_text())
    assert card["data_licence"]["licence"] == "CC BY 4.0"
    assert "Kermany" in card["data_licence"]["citation"]
    assert card["model_file"] == "model.keras" and card["exported_from"]["run_id"]
    assert not Path(card["training_config"]["dataset"]).is_absolute()  # no local paths shipped
    val = card["val_metrics"]
    for key in ("auc", "sensitivity", "specificity"):
        assert 0.0 <= val[key] <= 1.0
    assert 0.0 < card["operating_point"]["threshold"] < 1.0
    op = card["operating_point"]
    # Validation figures are at the run's own (calibration-slice) threshold; a shipped site
    # threshold keeps that one as "global_threshold" and says where it was chosen.
    assert val["threshold"] == pytest.approx(op.get("global_threshold", op["threshold"]))
    if op.get("chosen_on") == "site":
        assert op["dataset"] and op["cross_fitted"]["specificity"] is not None
    assert card["saliency_layer"] and card["labels"] == ["NORMAL", "PNEUMONIA"]
    assert (folder / "train_config.json").is_file() and (folder / "README.md").is_file()
    seen = card["training_patients"]  # evaluations anywhere warn of the patients it has seen
    assert len(seen["train"]) > 1000 and seen["val"] and seen["calib"]
    assert not set(seen["train"]) & set(seen["val"]) and not set(seen["val"]) & set(seen["calib"])


def test_export_default_can_ship_a_site_threshold_and_rescores_the_card_at_it(cxr_home,
                                                                              shared_data,
                                                                              tmp_path):
    """--site-threshold: the threshold chosen on the external sample becomes the stored one;
    the card's figures are re-scored at it, and on that sample only the AUC and the
    cross-fitted figures remain (never a figure on the images a threshold was chosen on)."""
    from cxr_core.data.indexing import index_dataset
    from cxr_core.evaluation import evaluate as es

    from cxr_core.storage import runs as run_store

    db, run_id = _finished_run(cxr_home)
    db.write(lambda s: run_store.set_run_artifacts(  # where its card is rewritten
        session=s, run_id=run_id, artifact_dir=str(cxr_home / "runs" / str(run_id)),
        snapshot_hash="", snapshot_relabel_id=None))
    site = tmp_path / "site"
    for cls in ("NORMAL", "PNEUMONIA"):
        (site / cls).mkdir(parents=True)
        for f in sorted((shared_data / "chest_xray_224_external" / cls).glob("*.jpeg"))[:20]:
            (site / cls / f.name).symlink_to(f)
    index_dataset(db, site, name="site", external=True)
    es.evaluate_model(db, f"run:{run_id}", "site")
    out = tmp_path / "default"
    card = X.export_default(run_id, db=db, out_dir=out, site_dataset="site",
                            notes=["The stress test did not predict the real shift."])
    op = card["operating_point"]
    assert op["chosen_on"] == "site" and op["dataset"] == "site" and op["sample_n"] == 40
    assert op["global_threshold"] == 0.4 and op["cross_fitted"]["method"] == "cross-fitted"
    (ext,) = [e for e in card["measured"] if e["role"] == "external"]
    assert ext["stored_threshold_chosen_here"] and ext["sensitivity"] is None
    assert ext["threshold"] == pytest.approx(op["threshold"]) and ext["auc"] is not None
    assert "evaluation_id" not in ext and card["training_sha256"] == []
    assert card["notes"] == ["The stress test did not predict the real shift."]
    reloaded = load_model_ref(str(out / "model.keras"))
    assert reloaded.threshold == pytest.approx(op["threshold"])
    readme = (out / "README.md").read_text()
    assert "at a new site: site" in readme and "The stress test did not predict" in readme
    assert "only cross-fitted figures are reported" in readme


# -- Per-request upload caps and the sandboxed decode of uploads (issue 26 item 2) ------------

@pytest.mark.parametrize("env, n, size, match", [
    ({"CXR_MAX_UPLOAD_FILES": "3"}, 4, 10, r"files per upload is limited to 3. Received: 4 "
     r"files. Upload fewer files at once \(an administrator can change the limit with "
     r"CXR_MAX_UPLOAD_FILES"),
    ({"CXR_MAX_UPLOAD_MB": "1"}, 3, 400_000, r"an upload's total size \(MB\) is limited to 1. "
     r"Received: 1.1 MB"),
    ({}, 21, 10, "files per upload is limited to 20"),  # the default
])
def test_upload_request_over_a_cap_is_refused_before_any_decode(loaded, monkeypatch, env, n,
                                                                size, match):
    from cxr_core.core.errors import QuotaExceeded

    for var, value in env.items():
        monkeypatch.setenv(var, value)
    items = [P.ImageInput(f"f{i}.png", data=bytes(size)) for i in range(n)]
    with pytest.raises(QuotaExceeded, match=match):
        P.check_upload_request([len(i.data) for i in items])
    with pytest.raises(QuotaExceeded, match=match):
        P.predict_batch(loaded, items)


def test_uploads_within_the_caps_decode_in_a_child_with_their_picture(loaded, monkeypatch):
    monkeypatch.setenv("CXR_MAX_UPLOAD_FILES", "2")
    items = [P.ImageInput("a.png", data=_png(np.full((40, 60), 90, np.uint8))),
             P.ImageInput("b.dcm", data=dicom_bytes(np.full((48, 48), 2000, np.uint16)))]
    result = P.predict_batch(loaded, items)
    assert result.errors == () and [p.dicom for p in result.predictions] == [False, True]
    a, b = result.predictions
    assert a.display.shape == (40, 60) and b.display.shape == (48, 48)  # decoded with them
    assert np.array_equal(E.display_pixels(a), a.display)
    assert np.array_equal(E.display_pixels(a.source), a.display)  # same picture, re-decoded


def test_review_shows_a_stored_upload_decoded_in_its_sandbox(cxr_home, monkeypatch):
    """An upload sent to review is a client's file: Review decodes it in a child process too."""
    from cxr_core.data import sandbox
    from cxr_core.review import view

    calls = []
    real = sandbox.load_upload
    monkeypatch.setattr(sandbox, "load_upload",
                        lambda *a, **kw: calls.append(a[1]) or real(*a, **kw))
    sha = U.store_upload(P.ImageInput("film.png", data=_png(np.full((30, 50), 7, np.uint8))))
    pixels = view.view_pixels(U.upload_path(sha))
    assert pixels.shape == (30, 50) and calls == [f"{sha}.png"]


def test_indexed_array_images_are_not_uploads(loaded, monkeypatch):
    """PNG bytes made from an indexed .npz are the server's data: not capped as uploads and
    decoded here."""
    monkeypatch.setenv("CXR_MAX_UPLOAD_FILES", "1")
    items = [P.ImageInput(f"npz:train:{i}", data=_png(np.full((28, 28), 40 * i, np.uint8)),
                          image_id=i + 1) for i in range(3)]
    assert not any(i.is_upload for i in items)
    result = P.predict_batch(loaded, items)
    assert len(result.predictions) == 3 and all(p.display is None for p in result.predictions)
