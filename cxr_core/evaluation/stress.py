"""How a binary model's figures move under synthetic acquisition shift (issue 14).

The temporal split of the train folder does not reproduce the drop the official test split
shows (docs/experiments.md, runs 11-12): every recipe reads validation AUC about 0.998 there,
so it cannot tell recipes apart. What the test split's drop looks like is a loss of
*specificity at the locked threshold* (0.990 on validation, 0.731 on test): normal films that
look different. This module re-scores stored evaluation images after fixed, deterministic
changes a second site or device makes (exposure, contrast, sharpness, noise, framing) at the
model's own locked threshold, next to the unchanged images. It is a stress test, labelled as
one: a recipe whose specificity holds here has one fewer way to fail, not a deployment figure.

Every perturbation maps uint8 pixels to uint8 pixels and is the same for every model, so two
models are compared on the very same images.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageFilter

from cxr_core.core.errors import ConfigError, DatasetError, ImageLoadError
from cxr_core.stats import metrics
from cxr_core.storage import Database

Perturb = Callable[[np.ndarray], np.ndarray]


def _gamma(g: float) -> Perturb:
    return lambda x: 255.0 * (x / 255.0) ** g


def _contrast(c: float) -> Perturb:
    return lambda x: x.mean() + c * (x - x.mean())


def _per_plane(x: np.ndarray, fn: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    """``fn`` applied by PIL to each channel of an (H, W, C) image."""
    return np.stack([np.asarray(fn(Image.fromarray(np.uint8(np.clip(x[..., k], 0, 255)))),
                                np.float64) for k in range(x.shape[-1])], axis=-1)


def _blur(sigma: float) -> Perturb:
    return lambda x: _per_plane(x, lambda im: im.filter(ImageFilter.GaussianBlur(sigma)))


def _noise(sd: float, seed: int = 0) -> Perturb:
    def run(x: np.ndarray) -> np.ndarray:
        # seeded by the image's own bytes: the same film gets the same noise for every model
        rng = np.random.default_rng([seed, int(x.sum()) % (2**32)])
        return x + rng.normal(0.0, sd, x.shape)
    return run


def _crop(keep: float) -> Perturb:
    """A centred crop of ``keep`` of each side, resized back (tighter framing)."""
    def run(x: np.ndarray) -> np.ndarray:
        h, w = x.shape[:2]
        dh, dw = int(round(h * (1 - keep) / 2)), int(round(w * (1 - keep) / 2))
        return _per_plane(x[dh:h - dh, dw:w - dw], lambda im: im.resize((w, h), Image.BILINEAR))
    return run


def _shift(fraction: float) -> Perturb:
    """Move the content right by ``fraction`` of the width (left if negative), black fill."""
    def run(x: np.ndarray) -> np.ndarray:
        dx = int(round(x.shape[1] * fraction))
        out = np.zeros_like(x)
        if dx >= 0:
            out[:, dx:] = x[:, :x.shape[1] - dx]
        else:
            out[:, :dx] = x[:, -dx:]
        return out
    return run


# Test-time augmentation tried as a lever (issue 14): the mean over these fixed views.
TTA_VIEWS: dict[str, Perturb] = {"identity": lambda x: x, "crop_0.9": _crop(0.9),
                                 "shift_+4%": _shift(0.04), "shift_-4%": _shift(-0.04)}


PERTURBATIONS: dict[str, tuple[str, Perturb]] = {
    "none": ("the stored images, unchanged", lambda x: x),
    "darker": ("gamma 1.5 (under-exposed mid-tones)", _gamma(1.5)),
    "brighter": ("gamma 0.67 (over-exposed mid-tones)", _gamma(1 / 1.5)),
    "low_contrast": ("contrast x0.6 about the image mean", _contrast(0.6)),
    "high_contrast": ("contrast x1.4 about the image mean", _contrast(1.4)),
    "blur": ("Gaussian blur, sigma 1.5 px", _blur(1.5)),
    "noise": ("Gaussian noise, sd 8 grey levels", _noise(8.0)),
    "tight_crop": ("centre crop of 85% of each side, resized back", _crop(0.85)),
}


def perturb(images: np.ndarray, name: str) -> np.ndarray:
    """Apply one named perturbation to uint8 images of shape (N, H, W, C)."""
    if name not in PERTURBATIONS:
        raise ConfigError(f"unknown perturbation. Expected one of {list(PERTURBATIONS)}. "
                          f"Received: {name!r}")
    return _apply(images, PERTURBATIONS[name][1])


def _apply(images: np.ndarray, fn: Perturb) -> np.ndarray:
    out = [np.clip(np.rint(fn(img.astype(np.float64))), 0, 255) for img in images]
    return np.asarray(out, dtype=np.uint8).reshape(images.shape)


@dataclass(frozen=True)
class StressRow:
    """A model's figures on one perturbation of the images, at its locked threshold."""

    perturbation: str
    what: str
    n: int
    auc: float
    sensitivity: float
    specificity: float
    threshold: float

    def to_dict(self) -> dict:
        return asdict(self)


def score(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """(AUC, sensitivity, specificity) of positive-class probabilities at ``threshold``
    (the project's one binary summary, :func:`cxr_core.stats.metrics.summary`)."""
    probs = np.column_stack([1.0 - p, p])
    out = metrics.summary(np.asarray(y), probs, metrics.predict(probs, threshold=threshold))
    return out["auc"], out["sensitivity"], out["specificity"]


def stress_evaluation(db: Database, model_ref: str, evaluation_id: int, *,
                      names: Sequence[str] | None = None, tta: bool = False,
                      progress: Callable[[int, int], None] | None = None) -> list[StressRow]:
    """Score ``model_ref`` on a stored evaluation's images under each perturbation.

    Args:
        db: the database.
        model_ref: any model reference (a run, the default, an ensemble); binary only.
        evaluation_id: whose images and labels to use (e.g. a run's ``val`` evaluation, the
            part of temporal validation that chose neither the model nor its threshold).
        names: perturbations to run (default: all, "none" first).
        tta: score the mean over :data:`TTA_VIEWS` of each (perturbed) image, at the same
            locked threshold (which was chosen without TTA: said in each row's ``what``).
        progress: ``progress(done, total)`` over perturbations.

    Raises:
        ConfigError: a multi-class model, a model without a locked threshold, an unknown name.
        DatasetError: the evaluation does not exist, or its images cannot be read as files.
    """
    from cxr_core.evaluation.evaluate import load_predictions
    from cxr_core.models import refs
    from cxr_core.models import store as model_store
    from cxr_core.predict.inference import ImageInput, decode_views

    loaded = refs.load_model_ref(model_ref, db=db)
    if not loaded.is_binary or loaded.threshold is None:
        raise ConfigError(f"the stress test scores a binary model at its locked threshold. "
                          f"Received: {loaded.ref} ({len(loaded.labels)} classes, threshold "
                          f"{loaded.threshold})")
    preds = load_predictions(db, evaluation_id)
    if tuple(preds.labels) != tuple(loaded.labels):
        raise ConfigError(f"evaluation {evaluation_id} has classes {list(preds.labels)}; "
                          f"{loaded.ref} predicts {list(loaded.labels)}")
    specs = model_store.input_specs(loaded)
    views: dict[tuple[int, int], list[np.ndarray]] = {s: [] for s in specs}
    try:
        for path in preds.paths:
            decoded, _, _ = decode_views(ImageInput(path, path=path), specs)
            for spec, arr in zip(specs, decoded):
                views[spec].append(arr)
    except ImageLoadError as exc:
        raise DatasetError(f"evaluation {evaluation_id}: cannot read its images as files "
                           f"({exc}); the stress test needs image files (not .npz arrays)") from exc
    stacked = {s: np.asarray(v) for s, v in views.items()}
    y = np.asarray(preds.y_true)
    chosen = list(names) if names is not None else list(PERTURBATIONS)
    rows = []
    for k, name in enumerate(chosen):
        changed = {s: perturb(v, name) for s, v in stacked.items()}
        views = list(TTA_VIEWS.values()) if tta else [TTA_VIEWS["identity"]]
        p = np.mean([model_store.predict_views(
            loaded, {s: _apply(v, fn) for s, v in changed.items()})[:, 1] for fn in views],
            axis=0)
        auc, sens, spec = score(y, p, loaded.threshold)
        what = PERTURBATIONS[name][0] + (f"; mean over {len(views)} TTA views "
                                         f"({', '.join(TTA_VIEWS)})" if tta else "")
        rows.append(StressRow(name, what, len(y), auc, sens, spec, float(loaded.threshold)))
        if progress is not None:
            progress(k + 1, len(chosen))
    return rows


def run_val_evaluation(db: Database, run_id: int, split: str = "val") -> int:
    """The id of a run's stored evaluation of ``split`` (its own validation outputs).

    Raises:
        DatasetError: the run has no such evaluation.
    """
    from cxr_core.evaluation.evaluate import list_evaluations

    found = [e for e in list_evaluations(db, run_id=run_id, with_metrics=False)
             if e.split == split]
    if not found:
        raise DatasetError(f"run {run_id} has no stored {split!r} evaluation")
    return max(e.id for e in found)


def summary(rows: Sequence[StressRow]) -> dict:
    """The JSON the CLI prints: every row, and the worst AUC and specificity over shifts."""
    shifted = [r for r in rows if r.perturbation != "none"]
    out: dict = {"rows": [r.to_dict() for r in rows]}
    if shifted:
        out["worst_auc"] = min(r.auc for r in shifted)
        out["worst_specificity"] = min(r.specificity for r in shifted)
        out["worst_sensitivity"] = min(r.sensitivity for r in shifted)
        out["mean_specificity"] = float(np.mean([r.specificity for r in shifted]))
    return out


def card_entry(rows: Sequence[StressRow], *, evaluation_id: int, split: str, dataset: str,
               tta: bool = False) -> dict:
    """What a model card keeps of a stress test (``card["stress"]``): every row, the worst
    shift, and which images (an evaluation's, by split and dataset) it was run on."""
    from datetime import datetime, timezone

    shifted = [r for r in rows if r.perturbation != "none"]
    worst = min(shifted, key=lambda r: r.specificity) if shifted else None
    return {"kind": "synthetic acquisition shift (a stress test, not a deployment figure)",
            "dataset": dataset, "split": split, "n": rows[0].n if rows else 0,
            "threshold": rows[0].threshold if rows else None, "tta": tta,
            "rows": [{k: v for k, v in r.to_dict().items() if k not in ("n", "threshold")}
                     for r in rows],
            "worst_specificity": None if worst is None else
            {"perturbation": worst.perturbation, "specificity": worst.specificity},
            "min_auc": min((r.auc for r in shifted), default=None),
            "source_evaluation_id": evaluation_id,
            "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
