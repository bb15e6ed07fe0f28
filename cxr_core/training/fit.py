"""TrainConfig → a fitted model: inputs, compile, callbacks, stages, the run. No database code.

:func:`train` takes prepared inputs (:class:`TrainData`: images, labels, split) and a set of
sinks (:class:`TrainSinks`: ``on_epoch_end``, ``on_batch_end``, ``should_cancel``, ``log``);
:mod:`cxr_core.jobs.launcher` connects those to the database. Everything a run writes to disk lives
under its run folder::

    <CXR_HOME>/runs/<id>/
      config.json                 the resolved TrainConfig
      best.keras                  the run's model: best epoch by `monitor` (restore_best),
                                  else the last epoch; what Predict/Evaluate load
      model_card.json             labels, size, saliency layer, operating point, val metrics, ...
      checkpoints/epoch_NNN.keras per-epoch checkpoints incl. optimizer state (newest kept)
      checkpoints/state.json      best value/epoch, so a resumed run keeps early stopping
      tensorboard/                keras.callbacks.TensorBoard logs

Cancel: ``should_cancel`` is polled after every batch; when it says yes, :class:`RunCancelled`
is raised from ``on_train_batch_end``. Keras 3.15's TF trainer does check
``model.stop_training`` after each batch, but then still runs the epoch's validation and
``on_epoch_end`` (which would checkpoint a half epoch); older Keras 2 versions checked it only
per epoch. Raising stops inside the same batch on every version, and the last checkpoint
stays the last complete epoch.

Frozen backbone stages (``freeze_epochs``): with no augmentation the backbone's features are
computed once (``models.feature_extractor``) and only the head (``models.head_model``, sharing
the weights) is trained on them, which makes those epochs far cheaper (``bench/features.py``).
With augmentation every epoch sees different pixels, so cached features would be wrong: the
stage then trains the full graph with the backbone frozen (features recomputed each batch).
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from cxr_core.core.errors import ConfigError, RunError
from cxr_core.data import pipeline
from cxr_core.data.balancing import balance_indices, class_weights
from cxr_core.models import graph, layers
from cxr_core.training.checkpoints import Checkpoints, save_atomic
from cxr_core.training.config import TrainConfig
from cxr_core.training.interface import RunCancelled, TrainData, TrainResult, TrainSinks
from cxr_core.training.runtime import float32_policy, gpu_count, run_globals, strategy

# -- Data -----------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class _Inputs:
    cache: pipeline.ImageCache
    train_rows: np.ndarray  # cache rows
    val_rows: np.ndarray
    row_image: np.ndarray  # cache row → index into TrainData
    skipped: int


def _build_inputs(cfg: TrainConfig, data: TrainData, cache_root: Path,
                  sinks: TrainSinks) -> _Inputs:
    """Decode once into the pixel cache (or reuse it) and map the split onto cache rows."""
    progress = _cache_progress(sinks)
    common = dict(dataset_key=data.dataset_key, image_size=cfg.image_size,
                  channels=cfg.channels, cache_root=cache_root,
                  label_snapshot=data.label_snapshot, progress=progress)
    if data.arrays is not None:
        cache = pipeline.build_cache_from_arrays(data.arrays, data.labels, **common)
        kept = np.arange(len(data.paths))
    else:
        items = [pipeline.CacheItem(p, int(y), f) for p, y, f in
                 zip(data.paths, data.labels, data.file_ids)]
        cache = pipeline.build_cache(items, **common)
        bad = {item.id for item, _ in cache.skipped}
        kept = np.array([i for i, it in enumerate(items) if it.id not in bad], dtype=np.int64)
        for item, message in cache.skipped[:10]:
            sinks.say(f"left out unreadable image {item.path}: {message}", "warning")
    is_val = data.is_val[kept]
    rows = np.arange(len(kept))
    train_rows = rows[~is_val]
    if data.train_repeat is not None:  # an extra dataset's images, oversampled
        train_rows = np.repeat(train_rows, np.asarray(data.train_repeat)[kept][train_rows])
    inputs = _Inputs(cache, train_rows, rows[is_val], kept, len(data.paths) - len(kept))
    if not len(inputs.train_rows) or not len(inputs.val_rows):
        raise ConfigError("no readable training or validation image is left. Received: "
                          f"{len(inputs.train_rows)} train, {len(inputs.val_rows)} val")
    return inputs


def _cache_progress(sinks: TrainSinks) -> Callable[[int, int], None]:
    state = {"t": 0.0, "logged": -1}

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        quarter = 4 * done // max(total, 1)
        if quarter != state["logged"]:
            state["logged"] = quarter
            sinks.say(f"image cache: {done}/{total}")
        if sinks.should_cancel is not None and now - state["t"] >= 1.0:
            state["t"] = now
            if sinks.should_cancel():
                raise RunCancelled("cancelled while caching images")
    return progress


# -- Model, optimizer, callbacks ------------------------------------------------------------

def _loss_and_metrics(n_classes: int, smoothing: float = 0.0) -> tuple[Any, list]:
    if n_classes == 2:
        return (keras.losses.BinaryCrossentropy(label_smoothing=smoothing),
                [keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")])
    return keras.losses.SparseCategoricalCrossentropy(), [
        keras.metrics.SparseCategoricalAccuracy(name="accuracy")]


def _optimizer(cfg: TrainConfig, lr: float, total_steps: int) -> keras.optimizers.Optimizer:
    rate: Any = lr
    if cfg.lr_schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(1, total_steps),
                                                      alpha=0.01)
    # Weight averaging (Polyak/EMA): the optimizer keeps the moving average, SwapEMAWeights
    # (_callbacks) validates and checkpoints it.
    ema = dict(use_ema=True, ema_momentum=cfg.ema) if cfg.ema else {}
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(rate, momentum=0.9, **ema)
    return _OPTIMIZERS[cfg.optimizer](rate, **ema)


# TrainConfig.optimizer -> Keras class (SGD, with momentum, is built above).
_OPTIMIZERS = {"adam": keras.optimizers.Adam, "nadam": keras.optimizers.Nadam,
               "rmsprop": keras.optimizers.RMSprop, "adagrad": keras.optimizers.Adagrad,
               "adadelta": keras.optimizers.Adadelta, "adamax": keras.optimizers.Adamax}


def _compile(model: keras.Model, cfg: TrainConfig, n_classes: int,
             optimizer: keras.optimizers.Optimizer) -> None:
    loss, metrics = _loss_and_metrics(n_classes, cfg.label_smoothing)
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics,
                  jit_compile="auto" if cfg.xla is None else cfg.xla)


def tensorboard_available() -> bool:
    """keras.callbacks.TensorBoard needs the ``tensorboard`` package (not a TF dependency)."""
    return importlib.util.find_spec("tensorboard") is not None


def _current_lr(model: keras.Model) -> float | None:
    opt = getattr(model, "optimizer", None)
    if opt is None:
        return None
    try:
        return float(keras.ops.convert_to_numpy(opt.learning_rate))
    except (TypeError, ValueError, AttributeError):
        return None


def _floats(logs: Mapping[str, Any] | None) -> dict[str, float]:
    out = {}
    for key, value in (logs or {}).items():
        try:
            out[key] = float(np.asarray(value))
        except (TypeError, ValueError):
            continue
    return out


class _RunCallback(keras.callbacks.Callback):
    """Sinks, cancel checks, checkpoints and early stopping, in that order per event."""

    def __init__(self, *, full_model: keras.Model, ckpts: Checkpoints, sinks: TrainSinks,
                 batch_size: int, n_train: int, first_step: int, patience: int | None,
                 epochs: int, steps_per_epoch: int):
        super().__init__()
        self.full_model, self.ckpts, self.sinks = full_model, ckpts, sinks
        self.batch_size, self.n_train, self.patience = batch_size, n_train, patience
        self.epochs, self.steps_per_epoch, self._epoch = epochs, max(1, steps_per_epoch), 0
        self.step = first_step
        self.history: list[dict[str, float]] = []
        self.stopped_early = False
        self._last_emit = -math.inf
        self._t0 = self._t_last = time.perf_counter()
        self._seen = 0

    def on_epoch_begin(self, epoch: int, logs: Mapping | None = None) -> None:
        self._t0 = self._t_last = time.perf_counter()
        self._seen, self._epoch = 0, epoch

    def _progress(self, batch: int) -> dict[str, float]:
        """Where the run is (epochs as a fraction) and the seconds left at this epoch's pace."""
        done = batch + 1
        left = (self.epochs - self._epoch - 1) * self.steps_per_epoch + max(
            self.steps_per_epoch - done, 0)
        return {"epoch_progress": self._epoch + min(done / self.steps_per_epoch, 1.0),
                "eta_s": left * (self._t_last - self._t0) / done}

    def on_train_batch_end(self, batch: int, logs: Mapping | None = None) -> None:
        self.step += 1
        self._seen = min(self._seen + self.batch_size, self.n_train)
        self._t_last = time.perf_counter()
        now = time.monotonic()
        if self.sinks.on_batch_end is not None and (
                now - self._last_emit >= self.sinks.batch_interval_s):
            self._last_emit = now
            self.sinks.on_batch_end(self.step, {**_floats(logs), **self._progress(batch)})
        if self.sinks.should_cancel is not None and self.sinks.should_cancel():
            raise RunCancelled(f"cancel requested; stopped after batch {self.step}")

    def on_epoch_end(self, epoch: int, logs: Mapping | None = None) -> None:
        values = _floats(logs)
        seconds = max(self._t_last - self._t0, 1e-9)
        values["lr"] = _current_lr(self.model)
        values["epoch_time_s"] = time.perf_counter() - self._t0
        values["images_per_s"] = self._seen / seconds
        values = {k: v for k, v in values.items() if v is not None}
        self.ckpts.save(self.full_model, epoch + 1, values)
        self.history.append(values)
        if self.sinks.on_epoch_end is not None:
            self.sinks.on_epoch_end(epoch + 1, values)
        if self.patience is not None and self.ckpts.epochs_since_best(epoch + 1) >= self.patience:
            self.model.stop_training = True
            self.stopped_early = True
            self.sinks.say(f"early stopping after epoch {epoch + 1}: no better "
                           f"{self.ckpts.monitor} for {self.patience} epochs", "info")


# -- Stages ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Stage:
    name: str  # frozen | finetune | train
    start: int  # first epoch index (0-based)
    end: int  # epochs after the stage
    lr: float
    frozen: bool


def _stages(cfg: TrainConfig) -> list[_Stage]:
    stages = []
    if cfg.freeze_epochs:
        stages.append(_Stage("frozen", 0, cfg.freeze_epochs, cfg.learning_rate, True))
    if cfg.epochs > cfg.freeze_epochs:
        lr = cfg.learning_rate * (cfg.finetune_lr_factor if cfg.freeze_epochs else 1.0)
        stages.append(_Stage("finetune" if cfg.weights else "train", cfg.freeze_epochs,
                             cfg.epochs, lr, False))
    return stages


@dataclass
class _Fit:
    """Mutable state of one train() call shared by the stage helpers."""

    cfg: TrainConfig
    data: TrainData
    inputs: _Inputs
    run_dir: Path
    sinks: TrainSinks
    ckpts: Checkpoints
    model: keras.Model
    n_classes: int
    n_train: int
    steps_per_epoch: int
    history: list = field(default_factory=list)
    stopped_early: bool = False
    feature_cache: bool = False
    rates: list = field(default_factory=list)


def _callbacks(fit: _Fit, stage: _Stage, start: int, last: bool) -> tuple[_RunCallback, list]:
    cfg = fit.cfg
    run_cb = _RunCallback(full_model=fit.model, ckpts=fit.ckpts, sinks=fit.sinks,
                          batch_size=cfg.batch_size, n_train=fit.n_train,
                          first_step=start * fit.steps_per_epoch,
                          patience=cfg.patience if (cfg.early_stopping and last) else None,
                          epochs=cfg.epochs, steps_per_epoch=fit.steps_per_epoch)
    # With weight averaging the EMA weights are swapped in before validation and before the run
    # callback checkpoints at each epoch's end: the best epoch is chosen and saved averaged.
    cbs: list = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True), run_cb] if cfg.ema else [
        run_cb]
    if tensorboard_available():
        cbs.append(keras.callbacks.TensorBoard(log_dir=str(fit.run_dir / "tensorboard"),
                                               write_graph=False, profile_batch=0))
    if cfg.lr_schedule == "plateau":
        cbs.append(keras.callbacks.ReduceLROnPlateau(
            monitor=cfg.monitor, mode="min" if cfg.monitor == "val_loss" else "max",
            factor=0.5, patience=max(1, cfg.patience // 2), min_lr=stage.lr * 1e-3))
    return run_cb, cbs


def _run_fit(fit: _Fit, trainee: keras.Model, train_ds: Any, val_ds: Any, stage: _Stage,
             start: int, last: bool) -> None:
    """One ``fit`` call; a cancel still closes TensorBoard's writers."""
    run_cb, cbs = _callbacks(fit, stage, start, last)
    weights = (class_weights(fit.inputs.cache.labels()[fit.inputs.train_rows],
                                      fit.n_classes)
               if fit.cfg.balancing == "class_weights" else None)
    try:
        trainee.fit(train_ds, validation_data=val_ds, epochs=stage.end, initial_epoch=start,
                    callbacks=cbs, class_weight=weights, shuffle=False, verbose=0)
    except BaseException:
        # Keras skips on_train_end when fit raises: close TensorBoard's writers ourselves.
        for cb in cbs:
            if isinstance(cb, keras.callbacks.TensorBoard):
                with contextlib.suppress(Exception):  # a writer never opened: nothing to close
                    cb.on_train_end()
        raise
    finally:
        fit.history.extend(run_cb.history)
        fit.rates.extend(h["images_per_s"] for h in run_cb.history if "images_per_s" in h)
    fit.stopped_early = run_cb.stopped_early


def _image_datasets(fit: _Fit, start: int) -> tuple[Any, Any]:
    cfg, inputs = fit.cfg, fit.inputs
    with float32_policy():
        return _make_image_datasets(cfg, inputs, start)


def _make_image_datasets(cfg: TrainConfig, inputs: _Inputs, start: int) -> tuple[Any, Any]:
    train_ds = pipeline.make_dataset(
        inputs.cache, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed + start,
        indices=inputs.train_rows, augment=cfg.augment_config(), balancing=cfg.balancing
        if cfg.balancing != "class_weights" else "none", target_ratio=cfg.target_ratio,
        channels=cfg.channels)
    val_ds = pipeline.make_dataset(inputs.cache, batch_size=cfg.batch_size, shuffle=False,
                                   seed=0, indices=inputs.val_rows, channels=cfg.channels)
    return train_ds, val_ds


def _fit_images(fit: _Fit, stage: _Stage, start: int, last: bool) -> None:
    train_ds, val_ds = _image_datasets(fit, start)
    _run_fit(fit, fit.model, train_ds, val_ds, stage, start, last)


def _features(extractor: keras.Model, fit: _Fit, rows: np.ndarray) -> np.ndarray:
    ds = pipeline.make_dataset(fit.inputs.cache, batch_size=fit.cfg.batch_size, shuffle=False,
                               seed=0, indices=rows, channels=fit.cfg.channels)
    return np.asarray(extractor.predict(ds, verbose=0), dtype=np.float32)


def _fit_features(fit: _Fit, stage: _Stage, start: int, last: bool, keep_optimizer: bool) -> None:
    """Frozen stage on cached features: backbone forward once, then head-only epochs."""
    cfg, inputs = fit.cfg, fit.inputs
    labels = inputs.cache.labels()
    rows = inputs.train_rows
    if cfg.balancing == "undersample":  # a fixed subset: same images every epoch
        rows = rows[balance_indices(labels[rows], "undersample",
                                             target_ratio=cfg.target_ratio, seed=cfg.seed)]
    t0 = time.perf_counter()
    extractor = graph.feature_extractor(fit.model)
    f_train, f_val = _features(extractor, fit, rows), _features(extractor, fit, inputs.val_rows)
    fit.sinks.say(f"computed backbone features once ({len(rows)} train + {len(f_val)} val "
                  f"images, {time.perf_counter() - t0:.1f} s); training the head on them")
    head = graph.head_model(fit.model)
    if keep_optimizer:
        optimizer = fit.model.optimizer
    else:
        optimizer = _optimizer(cfg, stage.lr, fit.steps_per_epoch * (stage.end - stage.start))
    _compile(head, cfg, fit.n_classes, optimizer)
    if not keep_optimizer:
        # The full model shares the optimizer, so its checkpoints carry the head's state.
        _compile(fit.model, cfg, fit.n_classes, head.optimizer)
    train_ds = (tf.data.Dataset.from_tensor_slices((f_train, labels[rows].astype(np.int32)))
                .shuffle(len(rows), seed=cfg.seed + start, reshuffle_each_iteration=True)
                .batch(cfg.batch_size).prefetch(tf.data.AUTOTUNE))
    val_ds = tf.data.Dataset.from_tensor_slices(
        (f_val, labels[inputs.val_rows].astype(np.int32))).batch(cfg.batch_size)
    fit.feature_cache = True
    _run_fit(fit, head, train_ds, val_ds, stage, start, last)


def _prepare_stage(fit: _Fit, stage: _Stage, keep_optimizer: bool) -> None:
    """Set which layers train and compile a fresh optimizer for the stage."""
    cfg = fit.cfg
    if stage.frozen:
        graph.set_backbone_trainable(fit.model, False)
    elif cfg.weights is not None:
        graph.set_backbone_trainable(fit.model, True, cfg.unfreeze_top_k)
    if not keep_optimizer:
        steps = fit.steps_per_epoch * (stage.end - stage.start)
        _compile(fit.model, cfg, fit.n_classes, _optimizer(cfg, stage.lr, steps))


def _start_model(cfg: TrainConfig, data: TrainData, ckpts: Checkpoints, initial_epoch: int,
                 sinks: TrainSinks) -> tuple[keras.Model, bool, str | None]:
    """A fresh model, or the checkpoint of ``initial_epoch`` with its optimizer state."""
    if initial_epoch:
        path = ckpts.path(initial_epoch)
        if not path.is_file():
            raise RunError(f"cannot resume: expected the checkpoint of epoch {initial_epoch} at "
                           f"{path}. Received: no such file")
        model = layers.load_model(path, compile=True)
        restored = getattr(model, "optimizer", None) is not None
        sinks.say(f"resumed from {path.name} (optimizer state "
                  f"{'restored' if restored else 'not saved: fresh optimizer'})")
        return model, restored, None
    built = graph.build_model_with_report(cfg.model_config(data.weights_path),
                                             len(data.classes))
    summary = built.weights_report.summary() if built.weights_report else None
    if summary:
        sinks.say(f"weights: {summary}")
    return built.model, False, summary


# -- The run --------------------------------------------------------------------------------

def train(cfg: TrainConfig, data: TrainData, run_dir: str | Path, *, cache_root: str | Path,
          sinks: TrainSinks | None = None, initial_epoch: int = 0) -> TrainResult:
    """Train (or resume) one run and predict its validation images with the run's model.

    Args:
        cfg: the run's config.
        data: prepared images, labels and split.
        run_dir: the run folder (created); see the module docstring for its layout.
        cache_root: folder of the decoded-pixel caches (``<CXR_HOME>/cache``).
        sinks: where metrics, logs and cancel checks go.
        initial_epoch: epochs already done (resume from that epoch's checkpoint).

    Returns:
        The result; ``status`` is "cancelled" when ``should_cancel`` stopped it.

    Raises:
        ConfigError, ModelError, DatasetError: bad config, weights or data.
        RunError: a resume without its checkpoint.
    """
    sinks = sinks or TrainSinks()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.to_json())
    with run_globals(cfg):
        try:
            inputs = _build_inputs(cfg, data, Path(cache_root), sinks)
        except RunCancelled:
            return _cancelled(data, initial_epoch)
        n_train = len(balance_indices(
            inputs.cache.labels()[inputs.train_rows],
            cfg.balancing if cfg.balancing != "class_weights" else "none",
            target_ratio=cfg.target_ratio, seed=cfg.seed))
        ckpts = Checkpoints(run_dir, cfg.monitor, cfg.keep_checkpoints)
        ckpts.forget_after(initial_epoch)
        sinks.say(f"{n_train} training images per epoch, {len(inputs.val_rows)} validation "
                  f"images, classes {list(data.classes)}; {gpu_count()} GPU(s)")
        if not tensorboard_available():
            sinks.say("TensorBoard logs skipped: the tensorboard package is not installed "
                      "(pip install tensorboard)", "warning")
        with strategy(cfg).scope():
            model, restored, report = _start_model(cfg, data, ckpts, initial_epoch, sinks)
            fit = _Fit(cfg, data, inputs, run_dir, sinks, ckpts, model, len(data.classes),
                       n_train, math.ceil(n_train / cfg.batch_size))
            try:
                _fit_stages(fit, initial_epoch, restored)
            except RunCancelled as exc:
                sinks.say(str(exc), "warning")
                return _cancelled(data, initial_epoch + len(fit.history), fit)
        return _finish(fit, initial_epoch, report)


def _fit_stages(fit: _Fit, initial_epoch: int, restored: bool) -> None:
    stages = _stages(fit.cfg)
    for i, stage in enumerate(stages):
        if stage.end <= initial_epoch:
            continue
        start = max(stage.start, initial_epoch)
        keep = restored and stage.start < initial_epoch  # resuming inside this stage
        last = i == len(stages) - 1
        use_features = stage.frozen and fit.cfg.cache_features and not fit.cfg.augmenting
        fit.sinks.say(f"stage '{stage.name}': epochs {start + 1}-{stage.end}, "
                      f"learning rate {stage.lr:g}"
                      + (", head on cached features" if use_features else ""))
        if use_features:
            if not keep:
                graph.set_backbone_trainable(fit.model, False)
            _fit_features(fit, stage, start, last, keep)
        else:
            _prepare_stage(fit, stage, keep)
            _fit_images(fit, stage, start, last)
        if fit.stopped_early:
            break


def _cancelled(data: TrainData, epochs_done: int, fit: _Fit | None = None) -> TrainResult:
    return TrainResult("cancelled", epochs_done, tuple(fit.history if fit else ()), None, False,
                       None, data.classes, None)


def _to_probs(raw: np.ndarray) -> np.ndarray:
    out = np.asarray(raw, dtype=np.float64)
    if out.shape[-1] == 1:
        p = np.clip(out[:, 0], 0.0, 1.0)
        return np.column_stack([1.0 - p, p])
    return out


def _finish(fit: _Fit, initial_epoch: int, report: str | None) -> TrainResult:
    """Make best.keras the run's model and predict the validation images with it."""
    cfg, ckpts, inputs = fit.cfg, fit.ckpts, fit.inputs
    done = initial_epoch + len(fit.history)  # epochs checkpointed (early stopping: fewer)
    if not cfg.restore_best or not ckpts.best_path.is_file():
        save_atomic(fit.model, ckpts.best_path)
    model = layers.load_model(ckpts.best_path)
    saliency = graph.saliency_layer_name(model)  # the one rule; the model card records it
    parameters = graph.parameter_counts(model)  # the card and the run view show them
    val_ds = pipeline.make_dataset(inputs.cache, batch_size=cfg.batch_size, shuffle=False,
                                   seed=0, indices=inputs.val_rows, channels=cfg.channels)
    probs = _to_probs(model.predict(val_ds, verbose=0))
    idx = inputs.row_image[inputs.val_rows]
    data = fit.data
    fit.sinks.say(f"finished after {done} epochs; best epoch "
                  f"{ckpts.best_epoch if cfg.restore_best else done}")
    return TrainResult(
        "finished", done, tuple(fit.history), ckpts.best_epoch if cfg.restore_best else done,
        fit.stopped_early, ckpts.best_path, data.classes, saliency,
        tuple(data.image_ids[i] for i in idx), tuple(data.paths[i] for i in idx),
        np.asarray(data.labels)[idx].astype(np.int64), probs, fit.n_train,
        len(inputs.val_rows), inputs.skipped,
        float(np.mean(fit.rates)) if fit.rates else None, fit.feature_cache, report,
        parameters)
