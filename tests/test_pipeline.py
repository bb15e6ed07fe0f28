"""Tests for cxr_core.data.pipeline: the decode-once cache, tf.data datasets and class balancing."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_core.data import images as image_io
from cxr_core.data import pipeline
from cxr_core.data.augment_config import PRESETS, AugmentConfig
from cxr_core.core.errors import ConfigError, DatasetError
from cxr_core.data.balancing import balance_indices, balance_summary, class_weights
from cxr_core.data.pipeline import build_cache, build_cache_from_npz, make_dataset

SIZE = 16


@pytest.fixture()
def image_items(tmp_path) -> list[tuple[str, int]]:
    """Twelve small PNG/JPEG files (40x30, gray and RGB) with labels 0/1."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(12):
        shape = (30, 40, 3) if i % 3 == 0 else (30, 40)
        path = tmp_path / "imgs" / f"img{i:02d}.{'jpg' if i % 4 == 0 else 'png'}"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(path)
        items.append((str(path), int(i % 3 == 1)))
    return items


@pytest.fixture()
def count_loads(monkeypatch) -> list[str]:
    """Counts calls to the one image loader (and still decodes)."""
    calls: list[str] = []
    real = image_io.load_image

    def counting(source, **kwargs):
        calls.append(str(source))
        return real(source, **kwargs)

    monkeypatch.setattr(image_io, "load_image", counting)
    return calls


def _build(items, root, **overrides):
    kwargs = {"dataset_key": "toy", "image_size": SIZE, "channels": 1,
              "cache_root": root, "label_snapshot": "snap1", **overrides}
    return build_cache(items, **kwargs)


def _epoch(ds) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


def test_build_cache_writes_arrays_and_reports_progress(image_items, tmp_path):
    seen = []
    cache = _build(image_items, tmp_path / "cache", progress=lambda d, t: seen.append((d, t)))
    assert not cache.reused and cache.n == 12 and not cache.skipped
    assert cache.images().shape == (12, SIZE, SIZE, 1) and cache.images().dtype == np.uint8
    np.testing.assert_array_equal(cache.labels(), [lab for _, lab in image_items])
    assert seen[-1] == (12, 12) and len(seen) == 12
    assert cache.path.parent == tmp_path / "cache" and cache.path.name == cache.key


def test_cache_is_reused_without_decoding(image_items, tmp_path, count_loads):
    first = _build(image_items, tmp_path)
    assert len(count_loads) == 12
    again = _build(image_items, tmp_path)
    assert again.reused and again.key == first.key and len(count_loads) == 12


@pytest.mark.parametrize("change", [
    {"image_size": SIZE * 2}, {"label_snapshot": "snap2"}, {"channels": 3},
    {"dataset_key": "other"},
])
def test_cache_key_changes_with_size_snapshot_channels_dataset(image_items, tmp_path, change):
    assert _build(image_items, tmp_path).key != _build(image_items, tmp_path, **change).key


def test_cache_key_changes_with_file_order_and_labels(image_items, tmp_path):
    base = _build(image_items, tmp_path).key
    assert _build(image_items[::-1], tmp_path).key != base
    relabelled = [(p, 1 - lab) for p, lab in image_items]
    assert _build(relabelled, tmp_path).key != base


def test_new_label_snapshot_reuses_pixels_without_decoding(image_items, tmp_path, count_loads):
    first = _build(image_items, tmp_path)
    relabelled = [(p, 1 - lab) if i == 2 else (p, lab) for i, (p, lab) in enumerate(image_items)]
    second = _build(relabelled, tmp_path, label_snapshot="snap2")
    assert second.key != first.key and not second.reused
    assert len(count_loads) == 12  # hard-linked, not decoded again
    np.testing.assert_array_equal(second.images(), first.images())
    assert second.labels()[2] == 1 - first.labels()[2]


def test_unreadable_files_are_skipped_and_reported(image_items, tmp_path):
    bad_text = tmp_path / "imgs" / "notes.png"
    bad_text.write_text("this is not an image")
    empty = tmp_path / "imgs" / "empty.jpg"
    empty.write_bytes(b"")
    items = image_items[:3] + [(str(bad_text), 1), (str(empty), 0)] + image_items[3:]
    cache = _build(items, tmp_path / "cache")
    assert cache.n == 12
    reported = [(item.path, item.label) for item, _ in cache.skipped]
    assert reported == [(str(bad_text), 1), (str(empty), 0)]
    assert all(msg for _, msg in cache.skipped)
    np.testing.assert_array_equal(cache.labels(), [lab for _, lab in image_items])
    reopened = _build(items, tmp_path / "cache")
    assert reopened.reused and reopened.skipped == cache.skipped


def test_all_unreadable_raises_and_leaves_nothing(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    with pytest.raises(DatasetError, match="could be read"):
        _build([(str(bad), 0)], tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_interrupted_build_leaves_no_cache(image_items, tmp_path, monkeypatch):
    real = pipeline._decode_one
    calls = []

    def dying(path, size, channels):
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt  # like Ctrl-C in the middle of a build
        return real(path, size, channels)

    monkeypatch.setattr(pipeline, "_decode_one", dying)
    with pytest.raises(KeyboardInterrupt):
        _build(image_items, tmp_path / "cache", workers=1)
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(pipeline, "_decode_one", real)
    assert _build(image_items, tmp_path / "cache").n == 12


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"image_size": 4}, "image_size"), ({"channels": 2}, "channels"),
])
def test_build_cache_rejects_bad_geometry(image_items, tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        _build(image_items, tmp_path, **kwargs)


def _write_npz(path: Path, with_test: bool = False) -> None:
    rng = np.random.default_rng(1)
    arrays = {f"{split}_{kind}": (rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
                                  if kind == "images" else rng.integers(0, 2, (n, 1)))
              for split, n in (("train", 10), ("val", 6)) for kind in ("images", "labels")}
    if with_test:
        arrays["test_images"] = arrays["val_images"]
        arrays["test_labels"] = arrays["val_labels"]
    np.savez(path, **arrays)


def test_npz_cache_keeps_pixels_and_labels(tmp_path):
    npz = tmp_path / "mnist.npz"
    _write_npz(npz)
    cache = build_cache_from_npz(npz, "val", cache_root=tmp_path / "cache")
    with np.load(npz) as data:
        np.testing.assert_array_equal(cache.images()[..., 0], data["val_images"])
        np.testing.assert_array_equal(cache.labels(), data["val_labels"][:, 0])
    bigger = build_cache_from_npz(npz, "val", image_size=32, channels=3,
                                  cache_root=tmp_path / "cache")
    assert bigger.images().shape == (6, 32, 32, 3) and bigger.key != cache.key
    assert build_cache_from_npz(npz, "val", cache_root=tmp_path / "cache").reused


def test_npz_missing_split_names_the_available_ones(tmp_path):
    npz = tmp_path / "mnist.npz"
    _write_npz(npz)
    with pytest.raises(DatasetError, match=r"\['train', 'val'\]"):
        build_cache_from_npz(npz, "test", cache_root=tmp_path / "cache")
    _write_npz(npz, with_test=True)  # the official file also holds test arrays
    assert build_cache_from_npz(npz, "test", cache_root=tmp_path / "cache").n == 6


@pytest.fixture()
def cache(image_items, tmp_path):
    return _build(image_items, tmp_path / "cache")


def test_dataset_yields_float_pixels_in_cache_order(cache):
    x, y = _epoch(make_dataset(cache, batch_size=5, shuffle=False, seed=0))
    assert x.dtype == np.float32 and y.dtype == np.int32 and x.shape == (12, SIZE, SIZE, 1)
    np.testing.assert_array_equal(x, cache.images().astype(np.float32))
    np.testing.assert_array_equal(y, cache.labels())


def test_gray_cache_feeds_three_channels(cache):
    x, _ = _epoch(make_dataset(cache, batch_size=4, shuffle=False, seed=0, channels=3))
    assert x.shape[-1] == 3 and (x[..., 0] == x[..., 2]).all()


def test_same_seed_same_batches_different_seed_different(cache):
    aug = PRESETS["rot30_zoom_shift_flip"]

    def make(seed):
        return make_dataset(cache, batch_size=4, shuffle=True, seed=seed, augment=aug)

    first, again, other = _epoch(make(7)), _epoch(make(7)), _epoch(make(8))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])
    ds = make(7)
    assert not np.array_equal(_epoch(ds)[0], _epoch(ds)[0])  # a new epoch reshuffles, re-augments


def test_indices_select_a_split(cache):
    x, y = _epoch(make_dataset(cache, indices=[3, 1], batch_size=4, shuffle=False, seed=0))
    np.testing.assert_array_equal(x, cache.images()[[3, 1]].astype(np.float32))
    with pytest.raises(ConfigError, match="indices"):
        make_dataset(cache, indices=[12], batch_size=4, shuffle=False, seed=0)


def test_oversample_requires_augmentation(cache):
    for augment in (None, PRESETS["none"]):
        with pytest.raises(ConfigError, match="oversample"):
            make_dataset(cache, batch_size=4, shuffle=True, seed=0, augment=augment,
                         balancing="oversample")


def test_oversampled_copies_are_augmented(cache):
    # 8 of class 0 and 4 of class 1: oversampling doubles class 1 into 8 distinct images.
    aug = AugmentConfig(rotation=20, width_shift=0.1)
    x, y = _epoch(make_dataset(cache, batch_size=6, shuffle=True, seed=0, augment=aug,
                               balancing="oversample"))
    assert np.bincount(y).tolist() == [8, 8]
    ones = x[y == 1].reshape(8, -1)
    assert len({row.tobytes() for row in ones}) == 8


def test_repeat_runs_past_one_epoch(cache):
    ds = make_dataset(cache, batch_size=5, shuffle=True, seed=0, repeat=True)
    assert sum(len(y) for _, y in ds.take(6)) == 30


@pytest.mark.parametrize(("strategy", "ratio", "expected"), [
    ("none", None, [10, 30, 12]),
    ("class_weights", None, [10, 30, 12]),
    ("oversample", None, [30, 30, 30]),
    ("oversample", (2, 1, 2), [60, 30, 60]),
    ("undersample", None, [10, 10, 10]),
])
def test_balance_indices_counts(strategy, ratio, expected):
    labels = np.repeat([0, 1, 2], [10, 30, 12])
    idx = balance_indices(labels, strategy, target_ratio=ratio, seed=0)
    assert np.bincount(labels[idx], minlength=3).tolist() == expected
    again = balance_indices(labels, strategy, target_ratio=ratio, seed=0)
    np.testing.assert_array_equal(idx, again)


def test_oversample_repeats_evenly_and_undersample_keeps_distinct():
    labels = np.repeat([0, 1], [3, 7])
    over = balance_indices(labels, "oversample", seed=1)
    assert sorted(np.bincount(over[labels[over] == 0]).tolist()[:3]) == [2, 2, 3]  # 7 = 2+2+3
    under = balance_indices(labels, "undersample", seed=1)
    assert len(set(under.tolist())) == len(under) == 6
    assert not np.array_equal(under, balance_indices(labels, "undersample", seed=2))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"strategy": "smote"}, "balancing"),
    ({"strategy": "oversample", "target_ratio": (1, 2)}, "target_ratio"),
    ({"strategy": "oversample", "target_ratio": (1, 0, 1)}, "target_ratio"),
])
def test_balance_indices_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        balance_indices(np.repeat([0, 1, 2], 3), seed=0, **kwargs)


def test_class_weights_formula():
    labels = np.repeat([0, 1], [1341, 3875])
    weights = class_weights(labels, 2)
    assert weights[0] == pytest.approx(5216 / (2 * 1341))
    assert weights[1] == pytest.approx(5216 / (2 * 3875))
    assert class_weights(np.array([0, 0]), 2) == {0: 0.5, 1: 1.0}  # absent class: neutral 1.0


def test_balance_summary_matches_indices():
    counts = {"normal": 1341, "bacteria": 2530, "virus": 1345}
    assert balance_summary(counts, "oversample", (2, 1, 2)) == {
        "normal": 5060, "bacteria": 2530, "virus": 5060}
    assert balance_summary(counts, "undersample") == dict.fromkeys(counts, 1341)
    assert balance_summary(counts, "class_weights") == counts


def test_real_full_res_images(shared_data, tmp_path):
    folder = shared_data / "chest_xray_fullres_sample" / "train"
    items = [(str(p), label) for label, cls in enumerate(("NORMAL", "PNEUMONIA"))
             for p in sorted((folder / cls).glob("*.jpeg"))[:2]]
    cache = build_cache(items, dataset_key="fullres", image_size=32, channels=1,
                        cache_root=tmp_path)
    assert cache.n == 4 and not cache.skipped
    x, y = _epoch(make_dataset(cache, batch_size=4, shuffle=False, seed=0, channels=3,
                               augment=PRESETS["rot10_shift_flip"]))
    assert x.shape == (4, 32, 32, 3) and 0 <= x.min() and x.max() <= 255 and x.std() > 10
    assert y.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize(("cache_channels", "want"), [(1, 3), (3, 1), (3, 3)])
def test_channel_conversion_with_augmentation(image_items, tmp_path, cache_channels, want):
    cache = _build(image_items, tmp_path, channels=cache_channels)
    x, _ = _epoch(make_dataset(cache, batch_size=4, shuffle=False, seed=0, channels=want,
                               augment=PRESETS["hflip"]))
    assert x.shape == (12, SIZE, SIZE, want) and x.dtype == np.float32


def test_npz_record_images_is_the_one_array_loader(tmp_path):
    from types import SimpleNamespace

    from cxr_core.core.errors import DatasetError
    from cxr_core.data.images import npz_record_images

    train = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
    val = 200 + np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4) % 50
    path = tmp_path / "d.npz"
    np.savez(path, train_images=train, train_labels=np.zeros((3, 1)), val_images=val,
             val_labels=np.ones((2, 1)))
    recs = [SimpleNamespace(relpath=p) for p in ("npz:val:1", "npz:train:2", "npz:train:0")]
    out = npz_record_images(path, recs)
    assert out.shape == (3, 4, 4)
    assert np.array_equal(out[0], val[1]) and np.array_equal(out[1], train[2])
    assert np.array_equal(out[2], train[0])
    with pytest.raises(DatasetError, match="not an array record"):
        npz_record_images(path, [SimpleNamespace(relpath="train/NORMAL/a.png")])
    with pytest.raises(DatasetError, match="no 'test' split"):
        npz_record_images(path, [SimpleNamespace(relpath="npz:test:0")])
