"""Legacy ``.h5`` and Keras 3 weights: HDF5 external storage, virtual datasets and links are
refused, declared sizes capped (issue 26 item 7), before any byte is read as weights."""
from __future__ import annotations

import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from cxr_core.core.errors import ModelError
from cxr_core.models import h5safe

SECRET = b"PATIENT-LIST:" + bytes(range(19))  # 32 bytes another file on the server holds


@pytest.fixture()
def secret(tmp_path) -> Path:
    path = tmp_path / "secret.bin"
    path.write_bytes(SECRET)
    return path


def legacy_h5(path: Path, add=None) -> Path:
    """A Keras 2-layout weights file of one Dense(2) layer ``dense`` on 4 inputs; ``add(f,
    group)`` adds the hostile part."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"dense"]
        g = f.create_group("dense")
        g.attrs["weight_names"] = [b"dense/kernel:0", b"dense/bias:0"]
        g.create_dataset("dense/kernel:0", data=np.ones((4, 2), np.float32))
        g.create_dataset("dense/bias:0", data=np.zeros((2,), np.float32))
        if add is not None:
            add(f, g)
    return path


def _external(secret: Path):
    def add(f, g):
        if "dense/bias:0" in g:
            del g["dense/bias:0"]
        g.create_dataset("dense/bias:0", shape=(8,), dtype="f4",
                         external=[(str(secret), 0, 32)])
    return add


def _virtual(secret: Path):
    def add(f, g):
        other = secret.with_suffix(".h5")
        with h5py.File(other, "w") as o:
            o.create_dataset("data", data=np.frombuffer(SECRET, np.float32))
        layout = h5py.VirtualLayout(shape=(8,), dtype="f4")
        layout[:] = h5py.VirtualSource(str(other), "data", shape=(8,))
        if "dense/bias:0" in g:
            del g["dense/bias:0"]
        g.create_virtual_dataset("dense/bias:0", layout)
    return add


def _soft(f, g):
    g["dense/alias:0"] = h5py.SoftLink("/dense/dense/kernel:0")


def _extlink(f, g):
    g["dense/other:0"] = h5py.ExternalLink("/etc/other.h5", "/data")


def _huge(f, g):  # 8 TB declared, nothing stored (chunked, never written)
    g.create_dataset("dense/huge:0", shape=(10**6, 10**6), dtype="f8", chunks=(64, 64))


def _strings(f, g):
    g.create_dataset("dense/names:0", data=[b"a", b"bc"], dtype=h5py.string_dtype())


CASES = [  # hostile part, what the message must say
    pytest.param(_external, r"dataset 'dense/dense/bias:0' keeps its bytes in another file "
                 r"\('.*secret.bin': HDF5 external storage\)", id="external_storage"),
    pytest.param(_virtual, r"dataset 'dense/dense/bias:0' is virtual", id="virtual_dataset"),
    pytest.param(lambda s: _soft, r"'dense/dense/alias:0' is a soft link", id="soft_link"),
    pytest.param(lambda s: _extlink, r"'dense/dense/other:0' is an external link "
                 r"\(to '/etc/other.h5'\)", id="external_link"),
    pytest.param(lambda s: _huge, r"dataset 'dense/dense/huge:0' declares 7,629,395 MB "
                 r"\(shape \(1000000, 1000000\)\); at most 1,024 MB", id="huge_declared_shape"),
    pytest.param(lambda s: _strings, "has variable-length items", id="variable_length"),
]


@pytest.mark.parametrize("hostile, match", CASES)
def test_hostile_legacy_h5_is_refused_before_it_is_read(hostile, match, secret, tmp_path):
    path = legacy_h5(tmp_path / "w.h5", hostile(secret))
    with pytest.raises(ModelError, match=match) as err:
        h5safe.check_h5(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_external_storage_really_reads_another_file_and_the_loader_refuses_it(secret,
                                                                             tmp_path):
    """What the issue reproduced (h5py follows the declaration), then our reader refusing."""
    from cxr_core.models import weights

    path = legacy_h5(tmp_path / "w.h5", _external(secret))
    with h5py.File(path, "r") as f:  # plain h5py: another file's bytes come back as weights
        assert np.asarray(f["dense/dense/bias:0"]).tobytes() == SECRET
    with pytest.raises(ModelError, match="HDF5 external storage"):
        weights._read_legacy_h5(path)


@pytest.mark.parametrize("hostile", [_external, lambda s: _huge], ids=["external", "huge"])
def test_load_weights_refuses_hostile_legacy_and_keras3_files(hostile, secret, tmp_path):
    import keras

    from cxr_core.models import weights

    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(2, name="dense")(inp))
    with pytest.raises(ModelError, match="refused as weights"):
        weights.load_weights(model, legacy_h5(tmp_path / "w.h5", hostile(secret)))
    keras3 = tmp_path / "m.weights.h5"
    model.save_weights(keras3)
    with h5py.File(keras3, "a") as f:
        hostile(secret)(f, f.require_group("extra"))
    with pytest.raises(ModelError, match="refused as weights"):
        weights.load_weights(model, keras3)


def test_a_plain_legacy_h5_still_loads(tmp_path):
    import keras

    from cxr_core.models import weights

    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(2, name="dense")(inp))
    path = legacy_h5(tmp_path / "w.h5")
    assert h5safe.check_h5(path) == 4 * 2 * 4 + 2 * 4
    report = weights.load_weights(model, path)
    assert report.loaded == 1 and np.array_equal(model.get_layer("dense").kernel.numpy(),
                                                 np.ones((4, 2)))


def test_a_keras_archive_whose_weights_read_another_file_is_refused(secret, tmp_path):
    import keras

    from cxr_core.models.layers import load_model

    inp = keras.Input((4,))
    good = tmp_path / "good.keras"
    keras.Model(inp, keras.layers.Dense(2, name="dense")(inp)).save(good)
    assert load_model(good).get_layer("dense") is not None
    weights_h5 = tmp_path / "model.weights.h5"
    with zipfile.ZipFile(good) as zf:
        weights_h5.write_bytes(zf.read("model.weights.h5"))
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    with h5py.File(weights_h5, "a") as f:
        _external(secret)(f, f.require_group("extra"))
    members["model.weights.h5"] = weights_h5.read_bytes()
    bad = tmp_path / "bad.keras"
    with zipfile.ZipFile(bad, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    with pytest.raises(ModelError, match=r"bad.keras:model.weights.h5: refused as weights: "
                       r"dataset 'extra/dense/bias:0' keeps its bytes in another file"):
        load_model(bad)


def test_total_declared_size_is_capped(tmp_path):
    def add(f, g):
        for i in range(3):
            g.create_dataset(f"dense/big{i}:0", shape=(2**17, 2**10), dtype="f4",
                             chunks=(64, 64))  # 512 MB each, nothing stored
    path = legacy_h5(tmp_path / "w.h5", add)
    assert h5safe.check_h5(path, max_total_bytes=2**31) > 1.5 * 2**30
    with pytest.raises(ModelError, match=r"its datasets declare 1,536 MB in all; at most "
                       r"1,024 MB of weights are read"):
        h5safe.check_h5(path, max_total_bytes=2**30)
