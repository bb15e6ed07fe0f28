"""tf.data input pipeline: decode once -> resized on-disk cache -> shuffle -> augment -> batch.

Decoding a full-resolution film costs tens of milliseconds; doing it every epoch makes CPU
training input-bound. :func:`build_cache` decodes and resizes every image ONCE (through the
one loader, :mod:`cxr_core.data.images`) into a uint8 ``.npy`` array under ``cache_root/<key>``;
:func:`make_dataset` then gathers batches from a memory map, so an epoch costs a memory copy.

The cache key is a sha256 of (format version, dataset key, image size, channels, label
snapshot, ordered file ids, labels): any change gives a new folder, nothing is ever updated
in place. A new key whose images are unchanged (only labels changed, e.g. after relabels)
hard-links the pixel file of the earlier cache instead of decoding again. Folders are built
under a temporary name and renamed into place, so a killed build never leaves a cache that
looks complete.

Balancing (none, class weights, oversample, undersample) is pure index arithmetic here;
per-architecture preprocessing is part of the model: the pipeline yields float32 [0, 255].
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

from cxr_core.core.errors import ConfigError, DatasetError, ImageLoadError
from cxr_core.data import images as image_io
from cxr_core.data.augment import build_augmenter
from cxr_core.data.augment_config import AugmentConfig
from cxr_core.data.balancing import balance_indices

# Bump when the on-disk layout changes: old caches then simply stop matching.
CACHE_FORMAT = 1
_IMAGES, _LABELS, _META = "images.npy", "labels.npy", "meta.json"
# A `.tmp-*` folder older than this is the leftover of a killed build.
_STALE_TMP_S = 24 * 3600

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class CacheItem:
    """One image to cache.

    Attributes:
        path: the image file.
        label: integer class index.
        file_id: a stable id for the cache key (DB image id or content hash); the path if None.
    """

    path: str
    label: int
    file_id: str | None = None

    @property
    def id(self) -> str:
        return self.file_id if self.file_id is not None else str(self.path)


@dataclass(frozen=True)
class ImageCache:
    """A built cache folder. ``images``/``labels`` are read lazily (memory-mapped).

    Attributes:
        path: the cache folder ``cache_root/<key>``.
        key: the cache key (folder name).
        image_size: side of the square images.
        channels: 1 or 3 channels stored.
        n: number of cached images (readable ones only).
        skipped: (item, message) for every unreadable image, left out of the cache.
        reused: True when the folder already existed and nothing was decoded.
    """

    path: Path
    key: str
    image_size: int
    channels: int
    n: int
    skipped: tuple[tuple[CacheItem, str], ...] = ()
    reused: bool = False

    def images(self) -> np.ndarray:
        """The (n, size, size, channels) uint8 array, memory-mapped read-only."""
        return np.load(self.path / _IMAGES, mmap_mode="r")

    def labels(self) -> np.ndarray:
        """The (n,) int64 labels, aligned with :meth:`images`."""
        return np.load(self.path / _LABELS)

    def __len__(self) -> int:
        return self.n


# Cache keys ----------------------------------------------------------------------------

def _sha256_json(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode()).hexdigest()


def image_key(dataset_key: str, image_size: int, channels: int, file_ids: Sequence[str]) -> str:
    """Key of the decoded pixels alone: equal keys mean byte-identical image arrays."""
    return _sha256_json([CACHE_FORMAT, dataset_key, int(image_size), int(channels),
                         [str(f) for f in file_ids]])


def cache_key(dataset_key: str, image_size: int, channels: int, label_snapshot: str,
              file_ids: Sequence[str], labels: Sequence[int] = ()) -> str:
    """The cache folder name for one (dataset, size, channels, label snapshot, files) choice.

    The labels themselves are hashed too: two label schemes (binary, three-class) over the
    same snapshot must not share a cache.

    Returns:
        A 64-character hex sha256.
    """
    return _sha256_json([image_key(dataset_key, image_size, channels, file_ids),
                         str(label_snapshot), [int(v) for v in labels]])


def _check_geometry(image_size: int, channels: int) -> None:
    if not 8 <= image_size <= 2048:
        raise ConfigError(f"image_size must be in [8, 2048]. Received: image_size={image_size}")
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3. Received: channels={channels}")


# Reading and writing cache folders ------------------------------------------------------

def open_cache(cache_root: str | Path, key: str) -> ImageCache | None:
    """Open the complete cache folder ``cache_root/key``, or None when there is none."""
    folder = Path(cache_root) / key
    try:
        meta = json.loads((folder / _META).read_text())
    except (OSError, ValueError):
        return None
    skipped = tuple((CacheItem(s["path"], int(s["label"]), s.get("file_id")), s["message"])
                    for s in meta.get("skipped", []))
    return ImageCache(folder, key, int(meta["image_size"]), int(meta["channels"]),
                      int(meta["n"]), skipped, reused=True)


def _find_same_images(root: Path, img_key: str) -> Path | None:
    """A finished cache folder holding the same pixels (only the labels differ)."""
    for meta_file in root.glob("*/" + _META):
        try:
            if json.loads(meta_file.read_text()).get("image_key") == img_key:
                return meta_file.parent
        except (OSError, ValueError):
            continue
    return None


def _clean_stale_tmp(root: Path) -> None:
    now = time.time()
    for tmp in root.glob(".tmp-*"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            continue


def _publish(tmp: Path, final: Path, meta: dict, labels: np.ndarray) -> ImageCache:
    """Write labels + meta, then rename the folder into place (atomic on one filesystem)."""
    np.save(tmp / _LABELS, labels.astype(np.int64))
    (tmp / _META).write_text(json.dumps(meta))
    try:
        os.rename(tmp, final)
    except OSError:
        # Another process finished the same key first: theirs is as good as ours.
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / _META).is_file():
            raise
    cache = open_cache(final.parent, final.name)
    assert cache is not None  # just published
    return ImageCache(cache.path, cache.key, cache.image_size, cache.channels, cache.n,
                      cache.skipped, reused=False)


def _meta(key: str, img_key: str, image_size: int, channels: int, n: int, extra: dict) -> dict:
    return {"format": CACHE_FORMAT, "key": key, "image_key": img_key, "image_size": image_size,
            "channels": channels, "n": n, "created": time.time(), **extra}


# Building a cache from image files ------------------------------------------------------

def _as_items(items: Sequence[CacheItem | tuple]) -> list[CacheItem]:
    out = []
    for item in items:
        if isinstance(item, CacheItem):
            out.append(item)
        elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
            out.append(CacheItem(str(item[0]), int(item[1]), *(str(v) for v in item[2:])))
        else:
            raise ConfigError(
                "each item must be a CacheItem or (path, label[, file_id]). "
                f"Received: item={item!r}")
    return out


def _decode_one(path: str, size: int, channels: int) -> np.ndarray:
    # draft: let the JPEG decoder scale full-res films down while decoding (much faster).
    return image_io.to_array(image_io.load_image(path, draft=size), size, channels)


def _decode_all(items: list[CacheItem], out_file: Path, size: int, channels: int,
                progress: Progress | None,
                workers: int | None) -> tuple[list[int], list[tuple[int, str]]]:
    """Decode every item into a fresh .npy memmap; unreadable ones are left out.

    Returns:
        (kept item indices in order, [(item index, message)] for unreadable items).
    """
    n = len(items)
    arr = np.lib.format.open_memmap(out_file, mode="w+", dtype=np.uint8,
                                    shape=(n, size, size, channels))
    failed: dict[int, str] = {}
    # PIL releases the GIL while decoding and resizing, so threads scale over cores.
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        futures = {pool.submit(_decode_one, it.path, size, channels): i
                   for i, it in enumerate(items)}
        for done, future in enumerate(as_completed(futures), start=1):
            i = futures[future]
            try:
                arr[i] = future.result()
            # The loader raises ImageLoadError; OSError/ValueError are what PIL itself may
            # still raise on exotic files. One bad file must not fail the build.
            except (ImageLoadError, OSError, ValueError) as exc:
                failed[i] = str(exc) or type(exc).__name__
            if progress is not None:
                progress(done, n)  # called in the caller's thread (safe for UI callbacks)
    kept = [i for i in range(n) if i not in failed]
    if failed and kept:
        arr = _compact(arr, kept, out_file)
    arr.flush()
    del arr
    return kept, sorted(failed.items())


def _compact(arr: np.memmap, kept: list[int], out_file: Path) -> np.memmap:
    """Rewrite the array without the rows of unreadable images (rare path)."""
    part = out_file.with_suffix(".part.npy")
    small = np.lib.format.open_memmap(part, mode="w+", dtype=arr.dtype,
                                      shape=(len(kept), *arr.shape[1:]))
    for start in range(0, len(kept), 256):
        chunk = kept[start:start + 256]
        small[start:start + len(chunk)] = arr[chunk]
    small.flush()
    del arr
    os.replace(part, out_file)
    return np.load(out_file, mmap_mode="r+")


def _link_images(source: Path, tmp: Path) -> tuple[list[int], list[tuple[int, str]]]:
    """Reuse the pixels of a cache with the same image key (hard link, copy as fallback)."""
    meta = json.loads((source / _META).read_text())
    try:
        os.link(source / _IMAGES, tmp / _IMAGES)
    except OSError:
        shutil.copyfile(source / _IMAGES, tmp / _IMAGES)
    failed = [(int(s["index"]), s["message"]) for s in meta.get("skipped", [])]
    bad = {i for i, _ in failed}
    kept = [i for i in range(int(meta["n"]) + len(bad)) if i not in bad]
    return kept, failed


def build_cache(items: Sequence[CacheItem | tuple], *, dataset_key: str, image_size: int,
                channels: int, cache_root: str | Path, label_snapshot: str = "",
                progress: Progress | None = None, workers: int | None = None) -> ImageCache:
    """Decode and resize every image once into ``cache_root/<key>``, or reuse that folder.

    Args:
        items: ``CacheItem``s or ``(path, label[, file_id])`` tuples, in dataset order.
        dataset_key: names the dataset (part of the key).
        image_size: output side in pixels (images are stretched to a square).
        channels: 1 (grayscale; the pipeline can still yield 3) or 3.
        cache_root: the caller's cache folder (``<CXR_HOME>/cache``).
        label_snapshot: hash of the label snapshot the labels come from.
        progress: called as ``progress(done, total)`` from the calling thread.
        workers: decoding threads (default: one per CPU).

    Returns:
        The cache; ``skipped`` lists unreadable images (left out), ``reused`` says whether
        an existing folder was used.

    Raises:
        ConfigError: bad size, channels or item.
        DatasetError: no items, or not one readable image.
    """
    items = _as_items(items)
    _check_geometry(image_size, channels)
    if not items:
        raise DatasetError(f"no images to cache for dataset {dataset_key!r}")
    ids = [it.id for it in items]
    labels = np.array([it.label for it in items], dtype=np.int64)
    key = cache_key(dataset_key, image_size, channels, label_snapshot, ids, labels)
    root = Path(cache_root)
    root.mkdir(parents=True, exist_ok=True)
    if (found := open_cache(root, key)) is not None:
        if progress is not None:
            progress(len(items), len(items))  # let a progress bar finish on a cache hit
        return found
    _clean_stale_tmp(root)
    img_key = image_key(dataset_key, image_size, channels, ids)
    tmp = root / f".tmp-{key[:16]}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        same = _find_same_images(root, img_key)
        kept, failed = (_link_images(same, tmp) if same is not None else
                        _decode_all(items, tmp / _IMAGES, image_size, channels, progress, workers))
        if not kept:
            raise DatasetError(f"none of the {len(items)} images of {dataset_key!r} could be read; "
                               f"first error: {failed[0][1]}")
        skipped = [{"index": i, "path": items[i].path, "label": int(items[i].label),
                    "file_id": items[i].file_id, "message": msg} for i, msg in failed]
        meta = _meta(key, img_key, image_size, channels, len(kept),
                     {"dataset_key": dataset_key, "label_snapshot": label_snapshot,
                      "skipped": skipped})
        return _publish(tmp, root / key, meta, labels[kept])
    except BaseException:
        # Also on KeyboardInterrupt: never leave a half-written folder behind.
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# Building a cache from arrays (PneumoniaMNIST .npz) -------------------------------------

def _resize_array(img: np.ndarray, size: int, channels: int) -> np.ndarray:
    if img.shape[:2] == (size, size) and (img.ndim == 2 and channels == 1
                                          or img.ndim == 3 and img.shape[2] == channels):
        return img.reshape(size, size, channels)
    pil = Image.fromarray(img[..., 0] if img.ndim == 3 and img.shape[2] == 1 else img)
    return image_io.to_array(pil, size, channels)  # the one loader's resize


def build_cache_from_arrays(images: np.ndarray, labels: np.ndarray, *, dataset_key: str,
                            image_size: int, channels: int, cache_root: str | Path,
                            label_snapshot: str = "",
                            progress: Progress | None = None) -> ImageCache:
    """Build the same cache as :func:`build_cache` from in-memory uint8 images.

    The key includes a digest of the pixels, so different arrays under one
    ``dataset_key`` never share a cache. File ids are the row numbers.

    Args:
        images: uint8 (N, H, W) or (N, H, W, C).
        labels: (N,) or (N, 1) integer labels.
        dataset_key, image_size, channels, cache_root, label_snapshot, progress:
            as for :func:`build_cache`.

    Raises:
        ConfigError: shapes do not match, or bad size/channels.
    """
    _check_geometry(image_size, channels)
    images = np.asarray(images)
    labels = np.asarray(labels).reshape(len(labels), -1)[:, 0].astype(np.int64)
    if images.ndim not in (3, 4) or len(images) != len(labels) or not len(images):
        raise ConfigError("images must be (N, H, W[, C]) with one label each. "
                          f"Received: images.shape={images.shape}, labels.shape={labels.shape}")
    digest = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]
    data_key = f"{dataset_key}@{digest}"
    ids = [str(i) for i in range(len(images))]
    key = cache_key(data_key, image_size, channels, label_snapshot, ids, labels)
    root = Path(cache_root)
    root.mkdir(parents=True, exist_ok=True)
    if (found := open_cache(root, key)) is not None:
        return found
    tmp = root / f".tmp-{key[:16]}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        arr = np.lib.format.open_memmap(tmp / _IMAGES, mode="w+", dtype=np.uint8,
                                        shape=(len(images), image_size, image_size, channels))
        for i, img in enumerate(images):
            arr[i] = _resize_array(img, image_size, channels)
            if progress is not None and (i + 1 == len(images) or i % 256 == 0):
                progress(i + 1, len(images))
        arr.flush()
        del arr
        meta = _meta(key, image_key(data_key, image_size, channels, ids), image_size, channels,
                     len(images), {"dataset_key": data_key, "label_snapshot": label_snapshot,
                                   "skipped": []})
        return _publish(tmp, root / key, meta, labels)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_cache_from_npz(path: str | Path, split: str, *, image_size: int = 28,
                         channels: int = 1, cache_root: str | Path, label_snapshot: str = "",
                         dataset_key: str | None = None,
                         progress: Progress | None = None) -> ImageCache:
    """Cache one split of a PneumoniaMNIST-style .npz (see :func:`cxr_core.data.images.load_npz_split`)."""
    images, labels = image_io.load_npz_split(path, split)
    return build_cache_from_arrays(
        images, labels, dataset_key=dataset_key or f"{Path(path).name}:{split}",
        image_size=image_size, channels=channels, cache_root=cache_root,
        label_snapshot=label_snapshot, progress=progress)


# tf.data ---------------------------------------------------------------------------------

def _select_indices(cache: ImageCache, indices: Sequence[int] | np.ndarray | None,
                    balancing: str, target_ratio: Sequence[float] | None,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    labels = cache.labels()
    idx = np.arange(cache.n, dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= cache.n):
        raise ConfigError(f"indices must be in [0, {cache.n}). "
                          f"Received: min={idx.min()}, max={idx.max()}")
    idx = idx[balance_indices(labels[idx], balancing, target_ratio=target_ratio, seed=seed)]
    if not idx.size:
        raise ConfigError("the dataset is empty after selecting indices and balancing")
    return idx, labels


def _convert_channels(images: tf.Tensor, have: int, want: int) -> tf.Tensor:
    if have == want:
        return images
    if want == 3:
        # Gray repeated, as RGB backbones expect; broadcast_to is the cheapest way on CPU
        # (writing 3-channel float32 is what bounds this pipeline's rate).
        shape = tf.concat([tf.shape(images)[:-1], [3]], axis=0)
        return tf.broadcast_to(images, shape)
    return tf.image.rgb_to_grayscale(images)


def _batch_loader(cache: ImageCache, labels: np.ndarray,
                  channels: int) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    """A tf.data map function: a batch of row indices -> (float32 pixels, int32 labels)."""
    pixels, size = cache.images(), cache.image_size

    def gather(batch_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return pixels[batch_idx], labels[batch_idx].astype(np.int32)

    def load(batch_idx: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x, y = tf.numpy_function(gather, [batch_idx], (tf.uint8, tf.int32), stateful=False)
        x.set_shape((None, size, size, cache.channels))
        y.set_shape((None,))
        return _convert_channels(tf.cast(x, tf.float32), cache.channels, channels), y

    return load


def make_dataset(cache: ImageCache, *, batch_size: int, shuffle: bool, seed: int,
                 indices: Sequence[int] | np.ndarray | None = None,
                 augment: AugmentConfig | None = None, balancing: str = "none",
                 target_ratio: Sequence[float] | None = None, channels: int | None = None,
                 repeat: bool = False, drop_remainder: bool = False) -> tf.data.Dataset:
    """A batched ``tf.data.Dataset`` of (float32 images in [0, 255], int32 labels).

    Same arguments (seed included) give the same batches in the same order: shuffling is
    seeded, and augmentation runs in a single-threaded map because its layers hold a
    random state (a parallel map would race on it). Decoding is already done (the cache),
    so batch gathering runs in parallel and everything is prefetched.

    Args:
        cache: from :func:`build_cache` / :func:`build_cache_from_arrays`.
        batch_size: images per batch.
        shuffle: reshuffle every epoch (seeded).
        seed: seeds shuffling and balancing (augmentation uses ``augment.seed``).
        indices: rows of the cache to use (a split); all rows when None.
        augment: augmentation for every image, or None.
        balancing: one of ``balancing.BALANCING``; "class_weights" leaves the data as is (pass
            :func:`balancing.class_weights` to ``fit``). "oversample" requires ``augment`` so that
            the repeated images are not identical copies.
        target_ratio: class ratio for over/undersampling, e.g. (2, 1, 2).
        channels: 1 or 3 channels out (grayscale caches can feed RGB models); cache's if None.
        repeat: repeat forever (then pass ``steps_per_epoch``).
        drop_remainder: drop the last partial batch.

    Raises:
        ConfigError: bad batch size, channels, indices or balancing.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1. Received: batch_size={batch_size}")
    want = channels or cache.channels
    if want not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3. Received: channels={channels}")
    if balancing == "oversample" and (augment is None or not augment.enabled_ops):
        received = "None" if augment is None else "a config with no op"
        raise ConfigError("balancing='oversample' repeats images and needs augmentation so the "
                          f"copies differ. Received: augment={received}")
    idx, labels = _select_indices(cache, indices, balancing, target_ratio, seed)
    augmenting = augment is not None and bool(augment.enabled_ops)
    # Augment on the fewer channels: gray -> RGB repeats after the augmenter, which then
    # works on one channel instead of three.
    first = min(cache.channels, want) if augmenting else want
    load = _batch_loader(cache, labels, first)
    ds = tf.data.Dataset.from_tensor_slices(idx)
    if shuffle:
        ds = ds.shuffle(len(idx), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if augmenting:
        augmenter = build_augmenter(augment)  # fresh per dataset: same seed, same stream
        ds = ds.map(lambda x, y: (augmenter(x, training=True), y))
        ds = ds.map(lambda x, y: (_convert_channels(x, first, want), y),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)
