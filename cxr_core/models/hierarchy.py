"""The hierarchical three-class reading clinicians use: pneumonia or not first, then bacterial
or viral among pneumonia.

Two ordinary models make one three-class model (NORMAL / BACTERIA / VIRUS):

* the **pneumonia step**: a binary model (NORMAL / PNEUMONIA) decided at its stored operating
  point on P(PNEUMONIA);
* the **subtype step**: a ``subtype`` model (BACTERIA / VIRUS, trained on pneumonia films only)
  whose probabilities are moved to its target prior (``priors`` on its card), decided by the
  more probable subtype.

Probabilities: ``P(NORMAL) = 1 - p``, ``P(BACTERIA) = p * q_B``, ``P(VIRUS) = p * q_V``. The
decision is the two-step reading, not their argmax: NORMAL unless ``p`` reaches the pneumonia
step's operating point (:func:`cxr_core.stats.metrics.predict` with a threshold on three
classes), then the more probable subtype.

References (wherever a model reference is accepted):

* ``"hier:PNEUMONIA_REF+SUBTYPE_REF"``, e.g. ``"hier:run:8+run:21"`` or
  ``"hier:default+run:21"``: any two single-model references joined by ``+``;
* ``"three_class"``: the shipped model, ``models/three_class/`` (``pneumonia/`` and
  ``subtype/`` each a ``model.keras`` with its ``model_card.json``, and the composite's own
  ``model_card.json`` with what it was measured on).
"""
from __future__ import annotations

from pathlib import Path

from cxr_core.core.errors import ModelError
from cxr_core.core.labels import BINARY_CLASSES, SUBTYPE_CLASSES, THREE_CLASSES
from cxr_core.models import store as model_store
from cxr_core.models.store import CARD_NAME, DEFAULT_MODEL_NAME, HIERARCHICAL, REPO, LoadedModel
from cxr_core.storage import Database

PREFIX = "hier:"
SHIPPED = "three_class"
SHIPPED_DIR = REPO / "models" / "three_class"
STEPS = ("pneumonia", "subtype")


def is_hierarchical_ref(ref: str | None) -> bool:
    """Whether a model reference names a hierarchical three-class model."""
    ref = str(ref or "").strip()
    return ref.startswith(PREFIX) or ref == SHIPPED


def hierarchical_ref(pneumonia: str, subtype: str) -> str:
    """The reference of the two-step model made of these two single-model references."""
    return f"{PREFIX}{pneumonia.strip()}+{subtype.strip()}"


def members_of(ref: str) -> tuple[str, str]:
    """(pneumonia step, subtype step) references of ``"hier:A+B"``.

    Raises:
        ModelError: not two single-model references.
    """
    body = ref.strip()[len(PREFIX):]
    parts = [p.strip() for p in body.split("+")]
    if len(parts) != 2 or not all(parts) or any(p.startswith(("ensemble:", PREFIX))
                                                for p in parts):
        raise ModelError("a hierarchical model is 'hier:PNEUMONIA_REF+SUBTYPE_REF' (two single "
                         f"models: run:ID, default or a .keras file). Received: {ref!r}")
    return parts[0], parts[1]


def _check_steps(pneumonia: LoadedModel, subtype: LoadedModel) -> None:
    if tuple(pneumonia.labels) != BINARY_CLASSES:
        raise ModelError(f"the pneumonia step must be a binary {list(BINARY_CLASSES)} model. "
                         f"Received: {pneumonia.ref} with {list(pneumonia.labels)}")
    if tuple(subtype.labels) != SUBTYPE_CLASSES:
        raise ModelError(f"the subtype step must be a {list(SUBTYPE_CLASSES)} model (label "
                         f"scheme 'subtype'). Received: {subtype.ref} with "
                         f"{list(subtype.labels)}")
    if not pneumonia.has_operating_point:
        raise ModelError(f"the pneumonia step {pneumonia.ref} has no stored operating point: "
                         "the two-step reading decides pneumonia there, never at a silent 0.5")


def assemble(ref: str, pneumonia: LoadedModel, subtype: LoadedModel,
             card: dict | None = None) -> LoadedModel:
    """One three-class model from its two steps (see the module docstring).

    Raises:
        ModelError: a step of the wrong kind, or a pneumonia step without an operating point.
    """
    _check_steps(pneumonia, subtype)
    largest = max((pneumonia, subtype), key=lambda m: m.image_size)
    priors = subtype.card.get("priors") or {}
    full = {**(card or {}), "kind": HIERARCHICAL, "labels": list(THREE_CLASSES),
            "label_scheme": "three_class",
            "steps": {"pneumonia": {"ref": pneumonia.ref, "threshold": pneumonia.threshold,
                                    "threshold_source": pneumonia.threshold_source},
                      "subtype": {"ref": subtype.ref, "priors": priors or None}}}
    source = (f"two steps: pneumonia at P(PNEUMONIA) >= {pneumonia.threshold:.3f} "
              f"({pneumonia.threshold_source}), then the more probable subtype"
              + (f" at the prior of {priors.get('target_source')}" if priors else ""))
    return LoadedModel(ref, None, THREE_CLASSES, "three_class", largest.image_size,
                       largest.channels, pneumonia.threshold, source, None, full, None,
                       (pneumonia, subtype))


def load_hierarchical(ref: str, *, db: Database | None = None,
                      models_dir: str | Path | None = None) -> LoadedModel:
    """Load ``"hier:A+B"`` or the shipped ``"three_class"`` model.

    Args:
        ref: the reference.
        db: the database (runs' operating points).
        models_dir: the shipped model's folder (tests); the repo's ``models/three_class``.

    Raises:
        ModelError: bad reference, missing files, or steps of the wrong kind.
    """
    ref = ref.strip()
    if ref == SHIPPED:
        folder = Path(models_dir) if models_dir is not None else SHIPPED_DIR
        paths = [folder / step / DEFAULT_MODEL_NAME for step in STEPS]
        if not all(p.is_file() for p in paths):
            raise ModelError(f"no three-class model shipped: expected {paths[0]} and {paths[1]}")
        steps = [model_store.load_single(str(p)) for p in paths]
        return assemble(SHIPPED, *steps, card=model_store.read_card(folder / CARD_NAME))
    pneumonia, subtype = members_of(ref)
    steps = [model_store.load_single(m, db=db, models_dir=models_dir)
             for m in (pneumonia, subtype)]
    return assemble(hierarchical_ref(pneumonia, subtype), *steps)


def unavailable(ref: str, artifact_dirs: dict[str, str | None] | None = None) -> str | None:
    """Why a hierarchical reference cannot be explained (a step's model file missing), or
    None."""
    from cxr_core.core.settings import get_settings

    if ref.strip() == SHIPPED:
        missing = [s for s in STEPS if not (SHIPPED_DIR / s / DEFAULT_MODEL_NAME).is_file()]
        return f"the shipped three-class model lacks its {missing[0]} step" if missing else None
    try:
        steps = members_of(ref)
    except ModelError as exc:
        return str(exc)
    for m in steps:
        run_id = model_store.parse_run_ref(m)
        folder = (artifact_dirs or {}).get(m) or (
            str(get_settings().runs_dir / str(run_id)) if run_id else None)
        if model_store.model_file(m, folder) is None:
            return f"its step {m} has no model file (.keras) on disk"
    return None


def describe_steps(threshold: float, probabilities: dict[str, float], source: str = "") -> str:
    """Markdown: the pneumonia decision first, then the subtype with its probability."""
    from cxr_core.core.text_safe import md_escape

    p = 1.0 - float(probabilities["NORMAL"])
    t = float(threshold)
    if p < t:
        return (f"**NORMAL**: P(pneumonia) = {p:.3f} < operating point {t:.3f} (step 1 of 2"
                + (f"; {md_escape(source)}" if source else "") + ").")
    b, v = float(probabilities["BACTERIA"]), float(probabilities["VIRUS"])
    sub, q = ("BACTERIA", b / max(p, 1e-12)) if b >= v else ("VIRUS", v / max(p, 1e-12))
    return (f"**PNEUMONIA**: P(pneumonia) = {p:.3f} ≥ operating point {t:.3f} (step 1); then "
            f"**{sub}**: P({sub.lower()} | pneumonia) = {q:.3f} (step 2"
            + (f"; {md_escape(source)}" if source else "") + ").")
