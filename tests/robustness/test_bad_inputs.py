"""Bad inputs across indexing, upload/predict, models and run configs (issue 8).

Each case must end in the specific error type from ``cxr_core.core.errors`` with a one-line message
naming the problem (the path, file or field), never a traceback; the CLI prints that same line
after ``error:`` and exits 2; and every row stored before (``stored_intact``: an indexed dataset,
a relabel, a preset, a run) is unchanged afterwards. Unusual but supported image formats are
checked to work.
"""
from __future__ import annotations

import io
import json
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_core.predict import inference as P
from cxr_core.training import service as svc
from cxr_core.cli import main
from cxr_core.core.errors import ConfigError, DatasetError, ModelError
from cxr_core.data.indexing import index_dataset
from cxr_core.models.store import CARD_NAME
from cxr_core.models.refs import load_model_ref
from cxr_core.storage import runs as run_store
from conftest import dicom_bytes, png_claiming, write_image

pytestmark = [pytest.mark.robustness,  # PIL warns before the loader refuses a huge image
              pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")]


def one_line(message: str) -> str:
    assert message and "\n" not in message and "Traceback" not in message, message
    return message


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run the CLI in this process: (exit code, stdout, stderr)."""
    code = main([*argv, "--json"])
    out = capsys.readouterr()
    return code, out.out, out.err


# -- File contents ----------------------------------------------------------------------------

def _noise(size: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png(arr: np.ndarray) -> bytes:
    return _save(Image.fromarray(arr), "PNG")


def _jpeg(size: int = 64, seed: int = 0) -> bytes:
    return _save(Image.fromarray(_noise(size, seed)), "JPEG", quality=90)


def _frames(fmt: str) -> bytes:
    frames = [Image.fromarray(_noise(24, s)) for s in (1, 2)]
    return _save(frames[0], fmt, save_all=True, append_images=frames[1:])


def _float_tiff(value: float) -> bytes:
    arr = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    arr[0, 0] = value
    return _save(Image.fromarray(arr), "TIFF")


def _corrupt_png() -> bytes:
    data = bytearray(_png(_noise()))
    data[-20] ^= 0xFF  # inside the image data: the header still reads
    return bytes(data)


def _dicom_pixels() -> np.ndarray:
    return np.linspace(0, 4095, 32 * 32).reshape(32, 32).astype(np.uint16)


TEXT = b"patient notes, not an image\n" * 8
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n" + bytes(range(256))
DICOM_JUNK = bytes(128) + b"DICM" + bytes(range(200))


# -- Indexing: bad dataset paths ------------------------------------------------------------

def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _imgs(n: int) -> np.ndarray:
    return np.zeros((n, 28, 28), np.uint8)


def _folder(tmp: Path, *files: str) -> Path:
    root = tmp / "data"
    root.mkdir()
    for rel in files:
        target = root / rel
        if rel.endswith("/"):
            target.mkdir(parents=True, exist_ok=True)
        elif rel.endswith(".png"):
            write_image(target, fmt="PNG")
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("not an image")
    return root


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


DATASET_PATHS = [  # make(tmp) -> path, the dataset name to use, what the message must say
    pytest.param(lambda t: t / "missing", None, "dataset path does not exist", id="missing_path"),
    pytest.param(lambda t: _write(t / "notes.txt", TEXT), None, "expected a folder or a "
                 "PneumoniaMNIST .npz file", id="file_instead_of_folder"),
    pytest.param(lambda t: _folder(t), None, "no images found under", id="empty_folder"),
    pytest.param(lambda t: _folder(t, "a.png", "b.png"), None, "no images found under",
                 id="images_but_no_class_subfolders"),
    pytest.param(lambda t: _folder(t, "NORMAL/", "PNEUMONIA/"), None, "no images found under",
                 id="empty_class_folders"),
    pytest.param(lambda t: _folder(t, "train/", "val/", "test/"), None, "no images found under",
                 id="empty_split_folders"),
    pytest.param(lambda t: _folder(t, "NORMAL/readme.txt", "PNEUMONIA/list.csv"), None,
                 "no images found under", id="class_folders_without_image_files"),
    pytest.param(lambda t: _npz(t / "keys.npz", x_train=_imgs(3), y_train=np.zeros(3)), None,
                 r"expected keys like train_images/train_labels .*Received keys: \['x_train', "
                 r"'y_train'\]", id="npz_missing_keys"),
    pytest.param(lambda t: _npz(t / "labels.npz", train_images=_imgs(3)), None,
                 "expected keys like train_images/train_labels", id="npz_images_without_labels"),
    pytest.param(lambda t: _write(t / "empty.npz", b""), None, "not a NumPy .npz archive",
                 id="npz_zero_bytes"),
    pytest.param(lambda t: _write(t / "junk.npz", TEXT), None, "not a NumPy .npz archive",
                 id="npz_text_file"),
    pytest.param(lambda t: _write(t / "cut.npz", (lambda p: p.read_bytes()[:300])(_npz(
        t / "whole.npz", train_images=_imgs(40), train_labels=np.zeros(40)))), None,
        "not a NumPy .npz archive", id="npz_truncated"),
    pytest.param(lambda t: _npz(t / "n.npz", train_images=_imgs(3), train_labels=np.zeros(5)),
                 None, "train_labels has 5 labels for 3 images", id="npz_label_count_mismatch"),
    pytest.param(lambda t: _npz(t / "r.npz", train_images=_imgs(3),
                                train_labels=np.array([0, 7, 1])), None,
                 r"train_labels must be 0 \(normal\) or 1 \(pneumonia\). Received: \[7\]",
                 id="npz_label_out_of_range"),
    pytest.param(lambda t: _npz(t / "f.npz", train_images=_imgs(2),
                                train_labels=np.array([0.5, 1.0])), None,
                 r"must be 0 \(normal\) or 1 \(pneumonia\). Received: \[0.5\]",
                 id="npz_fractional_labels"),
    pytest.param(lambda t: _npz(t / "d.npz", train_images=np.zeros(3, np.uint8),
                                train_labels=np.zeros(3)), None,
                 r"train_images must be \(N, H, W\) or \(N, H, W, C\). Received: shape \(3,\)",
                 id="npz_images_wrong_rank"),
    pytest.param(lambda t: _npz(t / "o.npz", train_images=np.array([None, 1], dtype=object),
                                train_labels=np.zeros(2)), None,
                 "Object arrays cannot be loaded", id="npz_pickled_objects"),
    pytest.param(lambda t: _folder(t, "NORMAL/a.png"), "base", "dataset name 'base' is already "
                 "used for", id="name_taken_by_another_path"),
]


@pytest.mark.parametrize("make, name, match", DATASET_PATHS)
def test_bad_dataset_path_is_refused(make, name, match, tmp_path, db, stored_intact, capsys):
    path = make(tmp_path)
    with pytest.raises(DatasetError) as err:
        index_dataset(db, path, name=name)
    message = one_line(str(err.value))
    assert re.search(match, message), message
    assert path.name in message  # names the path or file
    code, stdout, stderr = cli(capsys, "index", str(path), *(["--name", name] if name else []))
    assert (code, stdout, stderr) == (2, "", f"error: {message}\n")


def test_symlink_loop_in_a_class_folder_is_walked_once(tmp_path, db, stored_intact):
    root = _folder(tmp_path, "NORMAL/IM-0001-0001.png", "PNEUMONIA/person1_virus_1.png")
    (root / "NORMAL" / "again").symlink_to(root / "NORMAL")  # used to recurse until ELOOP
    rep = index_dataset(db, root, name="symlink-loop")
    assert rep.summary["images"] == 2 and rep.summary["unreadable"] == 0


# -- Indexing: a bad file appears in an indexed dataset -------------------------------------

BAD_FILES = [  # file name, its bytes, what the reported problem must say
    pytest.param("IM-0100-0001.jpeg", lambda: b"", r"empty \(0 bytes\)", id="zero_byte_jpeg"),
    pytest.param("IM-0101-0001.jpeg", lambda: TEXT, "not a readable image", id="text_named_jpeg"),
    pytest.param("IM-0102-0001.png", lambda: b"<html>404</html>", "not a readable image",
                 id="html_named_png"),
    pytest.param("IM-0103-0001.jpeg", lambda: PDF, "not a readable image", id="pdf_named_jpeg"),
    pytest.param("IM-0104-0001.jpeg", lambda: _jpeg()[:20], "not a readable image",
                 id="jpeg_cut_inside_header"),
    pytest.param("IM-0105-0001.png", lambda: png_claiming(30_000, 30_000),
                 "image too large to decode safely", id="decompression_bomb_png"),
    pytest.param("IM-0106-0001.png", lambda: png_claiming(12_500, 12_500),
                 r"image too large \(12500x12500 px", id="oversized_png_header"),
    pytest.param("IM-0107-0001.dcm", lambda: DICOM_JUNK, "unreadable DICOM header",
                 id="dicom_without_header"),
]


@pytest.mark.parametrize("filename, make, match", BAD_FILES)
def test_bad_file_in_an_indexed_dataset_is_reported_and_the_rest_kept(
        filename, make, match, tmp_path, db, stored_intact, capsys, request):
    from cxr_core.storage import datasets as ds_store

    name = f"files-{request.node.callspec.id}"
    root = tmp_path / "data"
    for i in range(2):
        write_image(root / "train" / "NORMAL" / f"IM-{i:04d}-0001.jpeg", seed=i)
        write_image(root / "train" / "PNEUMONIA" / f"person{i}_virus_{i}.jpeg", seed=9 + i)
    first = index_dataset(db, root, name=name)
    with db.session() as s:
        before = ds_store.list_images(session=s, dataset_id=first.dataset_id)
    (root / "train" / "NORMAL" / filename).write_bytes(make())
    stored_intact("datasets", first.dataset_id)  # its summary is updated; its images are not
    rep = index_dataset(db, root, name=name)
    assert rep.scanned == 1 and rep.unchanged == 4
    assert rep.summary["images"] == 4 and rep.summary["unreadable"] == 1
    [problem] = rep.problems
    assert problem.startswith(f"train/NORMAL/{filename}: ") and re.search(match, problem)
    one_line(problem)
    with db.session() as s:
        after = ds_store.list_images(session=s, dataset_id=first.dataset_id)
    assert [r for r in after if not r.error] == before
    code, stdout, stderr = cli(capsys, "index", str(root), "--name", name)  # same report again
    assert code == 0 and json.loads(stdout)["unreadable"] == 1
    assert f"warning: {problem}" in stderr


# -- Upload / predict -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny binary CNN (16 px, gray) with a card: the model every predict case uses."""
    folder = tmp_path_factory.mktemp("model")
    save_model(folder / "m.keras", (16, 16, 1))
    (folder / CARD_NAME).write_text(json.dumps({"labels": ["NORMAL", "PNEUMONIA"],
                                                "operating_point": {"threshold": 0.5}}))
    return folder


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model_ref(str(model_dir / "m.keras"))


def save_model(path: Path, shape: tuple, units: int = 1) -> Path:
    """A small flat functional model with input ``shape`` saved as .keras."""
    import keras

    inp = keras.Input(shape)
    x = inp
    if len(shape) == 3:
        x = keras.layers.Conv2D(2, 3, name="conv")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(units, activation="sigmoid" if units == 1 else "softmax")(x)
    path.parent.mkdir(parents=True, exist_ok=True)
    keras.Model(inp, out).save(path)
    return path


def _data(name: str, make) -> object:
    return lambda tmp: P.ImageInput(name, data=make())


UPLOADS = [  # make(tmp) -> ImageInput, what the per-file error must say
    pytest.param(_data("empty.jpeg", lambda: b""), r"empty \(0 bytes\)", id="zero_byte_upload"),
    pytest.param(_data("notes.jpeg", lambda: TEXT), "not a readable image", id="text_named_jpeg"),
    pytest.param(_data("scan.jpeg", lambda: PDF), "not a readable image", id="pdf_named_jpeg"),
    pytest.param(_data("half.jpeg", lambda: _jpeg(256)[:len(_jpeg(256)) // 2]),
                 "truncated or corrupt image data", id="truncated_jpeg"),
    pytest.param(_data("half.png", lambda: _png(_noise())[:200]), "truncated or corrupt image",
                 id="truncated_png"),
    pytest.param(_data("crc.png", _corrupt_png), "truncated or corrupt image data",
                 id="png_with_corrupt_data"),
    pytest.param(_data("bomb.png", lambda: png_claiming(30_000, 30_000)),
                 "image too large to decode safely", id="decompression_bomb"),
    pytest.param(_data("huge.png", lambda: png_claiming(12_500, 12_500)), "too large",
                 id="oversized_image_header"),
    pytest.param(_data("loop.gif", lambda: _frames("GIF")), "has 2 frames", id="animated_gif"),
    pytest.param(_data("pages.tiff", lambda: _frames("TIFF")), "has 2 frames",
                 id="multi_page_tiff"),
    pytest.param(_data("nan.tiff", lambda: _float_tiff(np.nan)), "non-finite pixel values",
                 id="float_tiff_with_nan"),
    pytest.param(_data("inf.tiff", lambda: _float_tiff(np.inf)), "non-finite pixel values",
                 id="float_tiff_with_infinity"),
    pytest.param(_data("nopixels.dcm", lambda: dicom_bytes(None)),
                 "DICOM file has no pixel data",
                 id="dicom_without_pixels"),
    pytest.param(_data("short.dcm", lambda: dicom_bytes(_dicom_pixels())[:-300]),
                 "cannot decode DICOM pixels", id="dicom_truncated_pixels"),
    pytest.param(_data("junk.dcm", lambda: DICOM_JUNK), "DICOM", id="dicom_magic_then_junk"),
    pytest.param(_data("big.png", lambda: bytes(P.MAX_UPLOAD_BYTES + 1)),
                 r"file too large \(50.0 MB; at most 50 MB\)", id="upload_too_large"),
    pytest.param(lambda t: P.ImageInput("folder.png", path=str(t)),
                 r"cannot read file \(Is a directory\)", id="path_is_a_folder"),
    pytest.param(lambda t: P.ImageInput("gone.png", path=str(t / "gone.png")),
                 r"cannot read file \(No such file or directory\)", id="missing_file"),
]


@pytest.mark.parametrize("make, match", UPLOADS)
def test_bad_upload_is_a_per_file_error_and_the_batch_goes_on(make, match, tmp_path, loaded,
                                                               stored_intact):
    bad = make(tmp_path)
    good = P.ImageInput("good.png", data=_png(_noise(seed=3)))
    result = P.predict_batch(loaded, [good, bad, good])
    assert [p.index for p in result.predictions] == [0, 2]
    [error] = result.errors
    message = one_line(error.error)
    assert error.index == 1 and message.startswith(f"{bad.name}: ") and re.search(match, message)
    assert [r["error"] for r in result.rows()] == ["", message, ""]


def _exif_rotated() -> bytes:
    img = Image.fromarray(_noise(24))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    return _save(img, "JPEG", exif=exif.tobytes())


SUPPORTED = [  # unusual but valid: each is decoded and predicted
    pytest.param(lambda: _save(Image.fromarray(_noise()), "GIF"), id="single_frame_gif"),
    pytest.param(lambda: _save(Image.fromarray(_noise()), "TIFF"), id="tiff"),
    pytest.param(lambda: _save(Image.fromarray(_noise()), "BMP"), id="bmp"),
    pytest.param(lambda: _png(_noise().astype(np.uint16) * 257), id="png_16_bit"),
    pytest.param(lambda: _float_tiff(0.5), id="float32_tiff"),
    pytest.param(lambda: _save(Image.fromarray(_noise()).convert("CMYK"), "JPEG"),
                 id="cmyk_jpeg"),
    pytest.param(lambda: _png(np.dstack([_noise()] * 4)), id="rgba_png"),
    pytest.param(lambda: _png(np.dstack([_noise()] * 2)), id="gray_alpha_png"),
    pytest.param(lambda: _save(Image.fromarray(_noise()).convert("1"), "PNG"), id="one_bit_png"),
    pytest.param(lambda: _save(Image.fromarray(_noise()).convert("P"), "PNG"),
                 id="palette_png"),
    pytest.param(lambda: _save(Image.fromarray(_noise()), "WEBP"), id="webp"),
    pytest.param(lambda: _png(np.zeros((1, 1), np.uint8)), id="one_pixel_png"),
    pytest.param(lambda: _png(np.zeros((1, 4000), np.uint8)), id="4000x1_png"),
    pytest.param(_exif_rotated, id="jpeg_with_exif_rotation"),
    pytest.param(lambda: dicom_bytes(_dicom_pixels()), id="dicom_monochrome2"),
    pytest.param(lambda: dicom_bytes(_dicom_pixels(), photometric="MONOCHROME1"),
                 id="dicom_monochrome1"),
]


@pytest.mark.parametrize("make", SUPPORTED)
def test_unusual_supported_format_is_predicted(make, loaded):
    result = P.predict_batch(loaded, [P.ImageInput("film", data=make())])
    assert result.errors == ()
    [pred] = result.predictions
    assert pred.pixels.shape == (16, 16, 1) and pred.label in ("NORMAL", "PNEUMONIA")
    assert sum(pred.probabilities.values()) == pytest.approx(1.0)


# -- Model files ----------------------------------------------------------------------------

def _file(name: str, data: bytes):
    return lambda t: str(_write(t / name, data))


def _zip_without_model(t: Path) -> str:
    with zipfile.ZipFile(t / "notes.keras", "w") as zf:
        zf.writestr("notes.txt", "not a model")
    return str(t / "notes.keras")


def _hdf5(path: Path) -> Path:
    import h5py

    with h5py.File(path, "w") as fh:
        fh["weights"] = np.zeros(3)
    return path


def _model(shape: tuple, units: int = 1, card: dict | str | None = None):
    def make(t: Path) -> str:
        path = save_model(t / "m.keras", shape, units)
        if card is not None:
            (t / CARD_NAME).write_text(card if isinstance(card, str) else json.dumps(card))
        return str(path)
    return make


MODELS = [  # make(tmp) -> model reference, what the message must say
    pytest.param(_file("random.keras", os.urandom(2048)), "not a Keras model file",
                 id="random_bytes_named_keras"),
    pytest.param(_file("empty.keras", b""), "not a Keras model file", id="zero_byte_keras"),
    pytest.param(lambda t: str(_hdf5(t / "model.keras")), "not a Keras model file",
                 id="hdf5_renamed_keras"),
    pytest.param(_zip_without_model, "Cannot load model .*config.json", id="zip_without_model"),
    pytest.param(lambda t: str(_hdf5(t / "weights.h5")), "a model reference is 'run:ID', an ID, "
                 "'default', a .keras file or 'ensemble:", id="h5_that_is_not_a_model"),
    pytest.param(lambda t: str(t / "missing.keras"), "model file not found",
                 id="missing_model_file"),
    pytest.param(lambda t: str((t / "dir.keras").mkdir() or t / "dir.keras"),
                 "model file not found", id="folder_named_keras"),
    pytest.param(lambda t: "run:999999", "run 999999 has no model file", id="unknown_run"),
    pytest.param(lambda t: "run:latest", "a model reference is", id="malformed_run_reference"),
    pytest.param(_model((32, 16, 1)), r"expected a square image input .*\(None, 32, 16, 1\)",
                 id="non_square_input"),
    pytest.param(_model((10,)), r"expected a square image input .*\(None, 10\)",
                 id="flat_vector_input"),
    pytest.param(_model((None, None, 1)), r"expected a square image input .*\(None, None, None",
                 id="input_without_fixed_size"),
    pytest.param(_model((16, 16, 5)), r"grayscale \(1\) or RGB \(3\) image input",
                 id="five_channel_input"),
    pytest.param(_model((16, 16, 1), units=5), "5 output units cannot be mapped to labels",
                 id="five_outputs_without_card"),
    pytest.param(_model((16, 16, 1), card="{not json"), "cannot read model card",
                 id="card_not_json"),
    pytest.param(_model((16, 16, 1), card=["NORMAL"]), "must be a JSON object. Received: list",
                 id="card_is_a_list"),
    pytest.param(_model((16, 16, 1), card={"labels": ["A", "B", "C"]}),
                 "model card lists 3 labels", id="card_labels_do_not_match_outputs"),
    pytest.param(_model((16, 16, 1), card={"labels": 2}), "\"labels\" must be a list",
                 id="card_labels_not_a_list"),
    pytest.param(_model((16, 16, 1), card={"operating_point": {"threshold": "high"}}),
                 r"threshold must be in \[0, 1\]. Received: threshold='high'",
                 id="card_threshold_not_a_number"),
    pytest.param(_model((16, 16, 1), card={"operating_point": {"threshold": 1.5}}),
                 r"threshold must be in \[0, 1\]", id="card_threshold_out_of_range"),
    pytest.param(_model((16, 16, 1), card={"image_size": 224}),
                 "model card says image_size=224", id="card_size_does_not_match_model"),
]


@pytest.mark.parametrize("make, match", MODELS)
def test_bad_model_file_is_a_model_error(make, match, tmp_path, db, stored_intact, capsys):
    ref = make(tmp_path)
    with pytest.raises(ModelError) as err:
        load_model_ref(ref, db=db)
    message = one_line(str(err.value))
    assert re.search(match, message), message
    named = (ref, Path(ref).name, str(Path(ref).parent / CARD_NAME), ref.replace(":", " "))
    assert any(n in message for n in named), message  # names the file, its card or the run
    image = _write(tmp_path / "film.png", _png(_noise()))
    code, stdout, stderr = cli(capsys, "predict", "--model", ref, str(image))
    assert (code, stdout, stderr) == (2, "", f"error: {message}\n")


# -- Run configs ----------------------------------------------------------------------------

GOOD_CONFIG = {"recipe": "cpu128", "dataset": "base", "model": "small3_50", "image_size": 32,
               "epochs": 1}


def _changes(**changes) -> dict:
    return {**GOOD_CONFIG, **changes}


CONFIGS = [  # the config file's text (or a dict to dump), the error type, the message
    pytest.param("{\"recipe\": \"cpu128\",", ConfigError, r"cannot read run config .*run.json: "
                 "expected a JSON object", id="malformed_json"),
    pytest.param("", ConfigError, "cannot read run config .*expected a JSON object",
                 id="empty_file"),
    pytest.param("[1, 2]", ConfigError, "must be a JSON object. Received: list",
                 id="json_array"),
    pytest.param(b"\xff\xfe\x00garbage", ConfigError, "can't decode byte", id="not_utf8"),
    pytest.param("[" * 100_000 + "]" * 100_000, ConfigError, "maximum recursion depth",
                 id="absurdly_nested_json"),
    pytest.param(None, ConfigError, "run config file not found", id="missing_file"),
    pytest.param(_changes(dataset="no_such_dataset"), DatasetError,
                 "dataset 'no_such_dataset' is neither an indexed dataset's name nor an existing",
                 id="unknown_dataset_name"),
    pytest.param(_changes(dataset="/nonexistent/chest_xray"), DatasetError,
                 "dataset '/nonexistent/chest_xray' is neither", id="missing_dataset_folder"),
    pytest.param(_changes(dataset=""), ConfigError, "dataset is required", id="empty_dataset"),
    pytest.param(_changes(dataset=None), ConfigError, "dataset is required.*dataset=None",
                 id="null_dataset"),
    pytest.param(_changes(epoch=3), ConfigError, r"unknown run config keys.*Received: \['epoch'\]",
                 id="unknown_key"),
    pytest.param(_changes(recipe="gpu9000"), ConfigError, "recipe must be one of .*'gpu9000'",
                 id="unknown_recipe"),
    pytest.param(_changes(model="resnet9000"), ConfigError, "resnet9000", id="unknown_model"),
    pytest.param(_changes(label_scheme="four"), ConfigError, "label_scheme='four'",
                 id="unknown_label_scheme"),
    pytest.param(_changes(balancing="magic"), ConfigError, "balancing='magic'",
                 id="unknown_balancing"),
    pytest.param(_changes(augment="nope"), ConfigError, "augment='nope'", id="unknown_preset"),
    pytest.param(_changes(augment={"zoomz": 0.1}), ConfigError,
                 r"unknown augmentation keys \['zoomz'\]", id="augment_unknown_key"),
    pytest.param(_changes(augment={"rotation": "lots"}), ConfigError,
                 "rotation must be a number. Received: rotation='lots'",
                 id="augment_value_wrong_type"),
    pytest.param(_changes(augment={"hflip": "yes"}), ConfigError,
                 "hflip must be true or false. Received: hflip='yes'",
                 id="augment_flag_wrong_type"),
    pytest.param(_changes(augment={"zoom": 1.5}), ConfigError, r"zoom must be in \[0, 1\)",
                 id="augment_out_of_range"),
    pytest.param(_changes(epochs="ten"), ConfigError, "epochs must be an integer .*'ten'",
                 id="epochs_string"),
    pytest.param(_changes(epochs=2.5), ConfigError, "epochs=2.5", id="epochs_fractional"),
    pytest.param(_changes(epochs=0), ConfigError, r"epochs must be an integer in \[1, 10000\]",
                 id="epochs_zero"),
    pytest.param(_changes(batch_size=0), ConfigError, "batch_size=0", id="batch_size_zero"),
    pytest.param(_changes(learning_rate=-1), ConfigError, "learning_rate=-1",
                 id="negative_learning_rate"),
    pytest.param("{\"recipe\": \"cpu128\", \"dataset\": \"base\", \"learning_rate\": NaN}",
                 ConfigError, "learning_rate=nan", id="learning_rate_nan"),
    pytest.param(_changes(val_fraction=0.9), ConfigError, "val_fraction=0.9",
                 id="val_fraction_out_of_range"),
    pytest.param(_changes(image_size=4), ConfigError, "image_size=4", id="image_size_too_small"),
    pytest.param(_changes(image_size="big"), ConfigError, "image_size='big'",
                 id="image_size_string"),
    pytest.param(_changes(channels=2), ConfigError, "channels=2", id="two_channels"),
    pytest.param(_changes(seed=-1), ConfigError, "seed=-1", id="negative_seed"),
    pytest.param(_changes(early_stopping="yes"), ConfigError, "early_stopping='yes'",
                 id="boolean_as_string"),
    pytest.param(_changes(target_ratio="2:1"), ConfigError, "target_ratio='2:1'",
                 id="target_ratio_string"),
    pytest.param(_changes(freeze_epochs=5), ConfigError, "freeze_epochs must be at most epochs",
                 id="freeze_longer_than_training"),
    pytest.param(_changes(max_images=2), ConfigError, "max_images=2", id="max_images_too_small"),
    pytest.param(_changes(weights=5), ConfigError, "weights=5", id="weights_wrong_type"),
    pytest.param(_changes(recipe=["cpu128"]), ConfigError, "recipe", id="recipe_as_list"),
    pytest.param(_changes(augment=["hflip"]), ConfigError, "augment", id="augment_as_list"),
    pytest.param(_changes(name=["run"]), ConfigError, "name", id="name_as_list"),
]


def _config_file(tmp: Path, content) -> Path:
    path = tmp / "run.json"
    if content is None:
        return path
    if isinstance(content, dict):
        content = json.dumps(content)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def _run_count(db) -> int:
    with db.session() as s:
        return len(run_store.list_runs(session=s, limit=100_000))


@pytest.mark.parametrize("content, error, match", CONFIGS)
def test_bad_run_config_is_refused_before_a_run_exists(content, error, match, tmp_path, db,
                                                       stored_intact, capsys):
    path = _config_file(tmp_path, content)
    runs_before = _run_count(db)
    with pytest.raises(error) as err:
        svc.make_config(db, svc.read_config_file(path), base_dir=path.parent)
    message = one_line(str(err.value))
    assert re.search(match, message), message
    code, stdout, stderr = cli(capsys, "train", "--config", str(path))
    assert (code, stdout, stderr) == (2, "", f"error: {message}\n")
    assert _run_count(db) == runs_before  # nothing queued, nothing half-created


# -- Evaluate: a model on data it cannot be scored on ---------------------------------------

def _split_folder(tmp: Path, files: dict[str, int], split: str = "test") -> Path:
    root = tmp / "eval_data"
    for cls, n in files.items():
        for i in range(n):
            name = f"IM-{i:04d}-0001.jpeg" if cls == "NORMAL" else f"person{i}_virus_{i}.jpeg"
            write_image(root / split / cls / name, seed=i + 50 * len(cls))
    return root


def _unreadable_only(tmp: Path) -> Path:
    folder = tmp / "eval_data" / "test" / "NORMAL"
    folder.mkdir(parents=True)
    (folder / "IM-0001-0001.jpeg").write_bytes(TEXT)
    (folder / "IM-0002-0001.jpeg").write_bytes(b"")
    return tmp / "eval_data"


EVALUATIONS = [  # make(tmp) -> data path, --split, the error type, the message
    pytest.param(lambda t: t / "nowhere", None, DatasetError,
                 "no dataset named .*nowhere' and no folder or .npz file at that path",
                 id="data_path_missing"),
    pytest.param(lambda t: _split_folder(t, {"NORMAL": 2, "PNEUMONIA": 2}), "validation",
                 DatasetError, r"for split 'validation'. Expected one of the splits \['test'\]",
                 id="split_not_in_data"),
    pytest.param(lambda t: _split_folder(t, {"NORMAL": 3}), None, ConfigError,
                 r"every class must occur .*Received: counts=\{'NORMAL': 3, 'PNEUMONIA': 0\}",
                 id="data_with_one_class_only"),
    pytest.param(_unreadable_only, None, DatasetError,
                 r"no readable images in 'eval_data.*: all 2 files are unreadable",
                 id="data_all_unreadable"),
]


@pytest.mark.parametrize("make, split, error, match", EVALUATIONS)
def test_evaluation_on_unusable_data_is_refused(make, split, error, match, tmp_path, model_dir,
                                                db, stored_intact, capsys):
    from cxr_core.evaluation.evaluate import evaluate_dataset

    data = make(tmp_path)
    model = str(model_dir / "m.keras")
    with pytest.raises(error) as err:
        evaluate_dataset(db, model, str(data), split=split)
    message = one_line(str(err.value))
    assert re.search(match, message), message
    code, stdout, stderr = cli(capsys, "evaluate", "--model", model, "--data", str(data),
                               *(["--split", split] if split else []))
    assert (code, stdout, stderr) == (2, "", f"error: {message}\n")


def test_evaluating_a_folder_named_like_an_indexed_dataset_gets_its_own_name(
        tmp_path, model_dir, db, stored_intact):
    """Used to fail with "dataset name 'base' is already used ... choose another --name",
    advice the evaluate command (which has no --name) cannot follow."""
    from cxr_core.evaluation.evaluate import evaluate_dataset

    data = tmp_path / "base"  # the same folder name as the suite's "base" dataset
    for i in range(2):
        write_image(data / "test" / "NORMAL" / f"IM-{i:04d}-0001.jpeg", seed=i)
        write_image(data / "test" / "PNEUMONIA" / f"person{i}_virus_{i}.jpeg", seed=7 + i)
    out = evaluate_dataset(db, str(model_dir / "m.keras"), str(data))
    assert out.report.n == 4 and out.dataset.startswith("base-")
