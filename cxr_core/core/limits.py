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

A value of 0 turns that limit off. :func:`cxr_core.training.actions.start_run` applies the run limits,
:func:`cxr_core.jobs.actions.submit_job` the view-job cap.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from cxr_core.core.errors import ConfigError, QuotaExceeded

__all__ = ["ENV", "Limits", "check_active", "check_run", "check_view_jobs"]

# field -> environment variable
ENV = {"max_active_runs": "CXR_MAX_ACTIVE_RUNS_PER_USER", "max_image_size": "CXR_MAX_IMAGE_SIZE",
       "max_epochs": "CXR_MAX_EPOCHS", "max_train_images": "CXR_MAX_TRAIN_IMAGES",
       "max_view_jobs": "CXR_MAX_QUEUED_VIEW_JOBS"}


@dataclass(frozen=True)
class Limits:
    """The limits in force; 0 means no limit."""

    max_active_runs: int = 3  # queued + running runs of one identity
    max_image_size: int = 512  # TrainConfig.image_size
    max_epochs: int = 200  # TrainConfig.epochs (the frozen stage counts in it)
    max_train_images: int = 0  # images a run trains on (max_images, or its whole dataset's)
    max_view_jobs: int = 4  # queued + running view jobs of one identity

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
