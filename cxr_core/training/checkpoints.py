"""A run folder's checkpoints: one ``.keras`` per epoch (optimizer state included, the newest
``keep`` kept), ``best.keras`` by the monitored metric, and ``state.json`` so that a resumed run
keeps its best value and early-stopping count. Every write is atomic (write, then rename).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import keras

from cxr_core.models.store import RUN_MODEL_NAME
from cxr_core.training.config import CHECKPOINTS


class Checkpoints:
    """Per-epoch checkpoints, the best model and their state file (atomic writes)."""

    def __init__(self, run_dir: Path, monitor: str, keep: int):
        self.run_dir, self.monitor, self.keep = run_dir, monitor, keep
        self.folder = run_dir / CHECKPOINTS
        self.folder.mkdir(parents=True, exist_ok=True)
        state = self._read_state()
        self.best: float | None = state.get("best")
        self.best_epoch: int | None = state.get("best_epoch")

    @property
    def best_path(self) -> Path:
        return self.run_dir / RUN_MODEL_NAME

    def path(self, epoch: int) -> Path:
        return self.folder / f"epoch_{epoch:03d}.keras"

    def _read_state(self) -> dict:
        try:
            return json.loads((self.folder / "state.json").read_text())
        except (OSError, ValueError):
            return {}

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best if self.monitor == "val_loss" else value > self.best

    def save(self, model: keras.Model, epoch: int, logs: Mapping[str, float]) -> bool:
        """Checkpoint ``epoch``; copy it to best.keras if ``monitor`` improved."""
        path = self.path(epoch)
        save_atomic(model, path)
        value = logs.get(self.monitor)
        improved = value is not None and math.isfinite(value) and self._better(value)
        if improved or (value is None and self.best is None):
            tmp = self.run_dir / f".tmp-{RUN_MODEL_NAME}"
            shutil.copyfile(path, tmp)
            os.replace(tmp, self.best_path)
            self.best, self.best_epoch = (value, epoch) if improved else (None, epoch)
        (self.folder / "state.json").write_text(json.dumps(
            {"epoch": epoch, "monitor": self.monitor, "best": self.best,
             "best_epoch": self.best_epoch}))
        for old in sorted(self.folder.glob("epoch_*.keras"))[:-self.keep]:
            old.unlink(missing_ok=True)
        return improved

    def forget_after(self, epoch: int) -> None:
        """A resume from ``epoch`` re-trains later epochs: their best value no longer counts."""
        if self.best_epoch is not None and self.best_epoch > epoch:
            self.best, self.best_epoch = None, None

    def epochs_since_best(self, epoch: int) -> int:
        return epoch - (self.best_epoch or 0)


def save_atomic(model: keras.Model, path: Path) -> None:
    tmp = path.with_name(f".tmp-{path.name}")  # Keras wants the .keras suffix
    model.save(tmp)
    os.replace(tmp, path)


def resume_epoch(run_dir: str | Path, recorded: int) -> int:
    """The epoch a resumed run starts from.

    ``recorded`` (the DB's epochs done) when its checkpoint is on disk: its metrics are
    stored, so the curves stay continuous (a worker killed between saving a checkpoint and
    recording it re-trains that one epoch). Otherwise the newest checkpoint on disk.
    """
    if recorded == 0 or (Path(run_dir) / CHECKPOINTS / f"epoch_{recorded:03d}.keras").is_file():
        return recorded
    return last_checkpoint_epoch(run_dir)


def last_checkpoint_epoch(run_dir: str | Path) -> int:
    """The newest epoch with a checkpoint on disk (0: none)."""
    folder = Path(run_dir) / CHECKPOINTS
    try:
        epoch = int(json.loads((folder / "state.json").read_text()).get("epoch", 0))
    except (OSError, ValueError):
        epoch = 0
    if epoch and (folder / f"epoch_{epoch:03d}.keras").is_file():
        return epoch
    found = sorted(folder.glob("epoch_*.keras"))
    return int(found[-1].stem.split("_")[1]) if found else 0
