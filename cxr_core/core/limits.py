"""Per-run limits and per-user quotas from configuration (issue 15 item 4). Pure: no DB.

Read from the environment (the app's ``[cxr]`` secrets table fills the same variables, see
:func:`cxr_core.core.settings.apply_secrets`):

CXR_MAX_ACTIVE_RUNS_PER_USER  queued + running runs one identity may have (default 3)
CXR_MAX_IMAGE_SIZE            largest training input side in pixels (default 512)
CXR_MAX_EPOCHS                most epochs of one run, all stages (default 200)
CXR_MAX_TRAIN_IMAGES          most images one run may train on (default 0: no limit)
CXR_MAX_QUEUED_VIEW_JOBS      queued + running view jobs (split preview, balance tables,
                              agreement, intervals, site-threshold candidate) one identity
                              may have (default 4)
CXR_MAX_QUEUED_JOBS_PER_USER  queued + running jobs of ONE kind (index, evaluate, ensemble,
                              export, cleanup, any kind added later) one identity may have
                              (default 4; view jobs have their own cap above)
CXR_MAX_UPLOAD_FILES          files one Predict request may upload (default 20)
CXR_MAX_UPLOAD_MB             bytes one Predict request may upload, all files together
                              (default 200)
CXR_MAX_DECODE_MB             memory one image decode may need, estimated from its header
                              (rows x columns x samples x bits) before any pixel is decoded
                              (default 512); an upload's decoding process is limited to this
                              plus the interpreter's own footprint

A value of 0 turns that limit off. :func:`cxr_core.training.actions.start_run` applies the run limits,
:func:`cxr_core.jobs.actions.submit_job` the job caps, :func:`cxr_core.predict.inference.predict_batch`
the upload caps, :mod:`cxr_core.data.images` the decode budget.

**Parents count once.** A run or job may name a ``parent`` (``"audit:7"``, ``"study:3"``,
``"job:12"``): the folds of an audit, the trials of a search. The parent is admitted once (its own
action checks the cap for it as one more unit); its children are never refused by the cap (they
wait in the queue), and a user's open rows count as one unit per distinct parent plus one per
row without a parent (:func:`cxr_core.storage.jobs.count_open_units`,
:func:`cxr_core.storage.audit.count_active_runs`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from cxr_core.core.errors import ConfigError, QuotaExceeded

__all__ = ["ENV", "Limits", "check_active", "check_jobs", "check_run", "check_uploads",
           "check_view_jobs"]

# field -> environment variable
ENV = {"max_active_runs": "CXR_MAX_ACTIVE_RUNS_PER_USER", "max_image_size": "CXR_MAX_IMAGE_SIZE",
       "max_epochs": "CXR_MAX_EPOCHS", "max_train_images": "CXR_MAX_TRAIN_IMAGES",
       "max_view_jobs": "CXR_MAX_QUEUED_VIEW_JOBS", "max_jobs": "CXR_MAX_QUEUED_JOBS_PER_USER",
       "max_upload_files": "CXR_MAX_UPLOAD_FILES", "max_upload_mb": "CXR_MAX_UPLOAD_MB",
       "max_decode_mb": "CXR_MAX_DECODE_MB"}


@dataclass(frozen=True)
class Limits:
    """The limits in force; 0 means no limit."""

    max_active_runs: int = 3  # queued + running runs of one identity
    max_image_size: int = 512  # TrainConfig.image_size
    max_epochs: int = 200  # TrainConfig.epochs (the frozen stage counts in it)
    max_train_images: int = 0  # images a run trains on (max_images, or its whole dataset's)
    max_view_jobs: int = 4  # queued + running view jobs of one identity
    max_jobs: int = 4  # queued + running jobs of one kind of one identity (parents count once)
    max_upload_files: int = 20  # files in one Predict request
    max_upload_mb: int = 200  # bytes of one Predict request, all its files
    max_decode_mb: int = 512  # memory one image decode may need (header estimate)

    @property
    def decode_budget(self) -> int | None:
        """The decode budget in bytes (None: no limit)."""
        return self.max_decode_mb * 2**20 if self.max_decode_mb else None

    def __post_init__(self) -> None:
        for name in ENV:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{ENV[name]} must be a whole number >= 0 (0: no limit). "
                                  f"Received: {name}={value!r}")

    @classmethod
    def from_env(cls, environ: Any = None) -> Limits:
        """The limits from ``CXR_MAX_*`` variables; unset or blank ones keep their default.

        Raises:
            ConfigError: a value that is not a whole number >= 0.
        """
        env = os.environ if environ is None else environ
        values: dict[str, int] = {}
        for name, var in ENV.items():
            raw = str(env.get(var, "")).strip()
            if not raw:
                continue
            try:
                values[name] = int(raw)
            except ValueError as exc:
                raise ConfigError(f"{var} must be a whole number >= 0 (0: no limit). "
                                  f"Received: {var}={raw!r}") from exc
        return cls(**values)


def _over(what: str, asked: Any, limit: int, var: str, hint: str) -> QuotaExceeded:
    return QuotaExceeded(f"{what} is limited to {limit}. Received: {asked}. {hint} (an "
                         f"administrator can change the limit with {var}, or the {var} key "
                         "in [cxr] of secrets.toml; 0 turns it off)")


def check_run(cfg: Any, limits: Limits, *, n_images: int | None = None) -> None:
    """Refuse a run config over a per-run limit.

    Args:
        cfg: a :class:`cxr_core.training.config.TrainConfig` (``image_size``, ``epochs``,
            ``max_images``).
        limits: the limits in force.
        n_images: how many images the run would train on, when known
            (:func:`cxr_core.training.inputs.count_training_images`: the dataset's usable images
            after the ``max_images`` subsample). A run on the whole dataset (``max_images``
            None) is judged by it (refused when it is unknown), and a ``max_images`` above a
            smaller dataset by what it really takes.

    Raises:
        QuotaExceeded: naming the limit, the value asked and how to change either.
    """
    if limits.max_image_size and cfg.image_size > limits.max_image_size:
        raise _over("image size", f"image_size={cfg.image_size}", limits.max_image_size,
                    ENV["max_image_size"], "Choose a smaller image size")
    if limits.max_epochs and cfg.epochs > limits.max_epochs:
        raise _over("epochs per run", f"epochs={cfg.epochs}", limits.max_epochs,
                    ENV["max_epochs"], "Choose fewer epochs")
    cap = limits.max_train_images
    if cap:
        if cfg.max_images is None:
            asked = n_images
        else:
            asked = cfg.max_images if n_images is None else min(cfg.max_images, n_images)
        if asked is None or asked > cap:
            shown = (f"max_images={cfg.max_images}" if cfg.max_images is not None else
                     "max_images=None (the whole dataset" + (
                         f", {n_images} images)" if n_images is not None else ")"))
            raise _over("images per run", shown, cap, ENV["max_train_images"],
                        f"Set max images to {cap} or fewer")


def _check_open(n_open: int, cap: int, identity: str, what: str, var: str, wait: str) -> None:
    if cap and n_open >= cap:
        raise QuotaExceeded(
            f"{identity} already has {n_open} queued or running {what}; the limit is {cap} "
            f"per user. {wait} (an administrator can change the limit with {var}, or that key "
            "in [cxr] of secrets.toml; 0 turns it off)")


def check_active(n_active: int, limits: Limits, identity: str) -> None:
    """Refuse one more run when ``identity`` already has the most queued + running runs.

    Raises:
        QuotaExceeded: the quota is reached.
    """
    _check_open(n_active, limits.max_active_runs, identity, "run(s)", ENV["max_active_runs"],
                "Wait for one to finish or cancel one")


def check_view_jobs(n_open: int, limits: Limits, identity: str) -> None:
    """Refuse one more view job when ``identity`` already has the most queued + running ones
    (``n_open`` without the new one).

    Raises:
        QuotaExceeded: the cap is reached.
    """
    _check_open(n_open, limits.max_view_jobs, identity,
                "view job(s) (previews, tables, intervals)", ENV["max_view_jobs"],
                "Wait for them to finish and reload")


def check_jobs(n_open: int, limits: Limits, identity: str, kind: str) -> None:
    """Refuse one more job of ``kind`` when ``identity`` already has the most queued + running
    ones (``n_open`` without the new one; one unit per parent).

    Raises:
        QuotaExceeded: the cap is reached.
    """
    _check_open(n_open, limits.max_jobs, identity, f"{kind!r} job(s)", ENV["max_jobs"],
                "Wait for one to finish")


def check_uploads(sizes: list[int], limits: Limits) -> None:
    """Refuse one upload request (Predict) over the per-request caps, before any file is read.

    Args:
        sizes: each uploaded file's size in bytes.
        limits: the limits in force.

    Raises:
        QuotaExceeded: too many files, or too many bytes in all.
    """
    if limits.max_upload_files and len(sizes) > limits.max_upload_files:
        raise _over("files per upload", f"{len(sizes)} files", limits.max_upload_files,
                    ENV["max_upload_files"], "Upload fewer files at once")
    total = sum(sizes)
    if limits.max_upload_mb and total > limits.max_upload_mb * 2**20:
        raise _over("an upload's total size (MB)", f"{total / 2**20:.1f} MB",
                    limits.max_upload_mb, ENV["max_upload_mb"], "Upload fewer or smaller files")
