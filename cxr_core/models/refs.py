"""Find and load a model by reference: the one dispatcher, above both single models
(:mod:`cxr_core.models.store`) and ensembles (:mod:`cxr_core.models.ensembles`).

References (the CLI's ``--model`` and the pages' pickers):

* ``"run:ID"`` or ``"ID"``: a training run's ``<CXR_HOME>/runs/<ID>/best.keras`` and
  ``model_card.json``; the threshold is the run's newest operating point in the DB, falling
  back to the card's.
* ``"default"``: the shipped demo model ``models/default/model.keras`` + ``model_card.json``.
* a path to a ``.keras`` file, with a ``model_card.json`` beside it when present; without a
  card the labels are inferred from the output size and a binary model gets 0.5, flagged by
  ``threshold_source == "none (0.5)"`` so pages can warn.
* ``"ensemble:run:3+run:5"`` or ``"ensemble:NAME"``: several of the above read as one model
  (the mean of their probabilities), with its own operating point: :mod:`cxr_core.models.ensembles`.
* ``"hier:PNEUMONIA_REF+SUBTYPE_REF"`` or ``"three_class"`` (shipped): the two-step
  three-class reading, pneumonia at the first model's operating point, then the subtype:
  :mod:`cxr_core.models.hierarchy`.

Decisions use the stored operating point (:func:`decide`), never a silent 0.5.
"""
from __future__ import annotations

from pathlib import Path

from cxr_core.models import ensembles, hierarchy, store
from cxr_core.models.store import LoadedModel
from cxr_core.storage import Database


def load_model_ref(ref: str, *, db: Database | None = None,
                   models_dir: str | Path | None = None) -> LoadedModel:
    """Load a model by reference (see the module docstring).

    Args:
        ref: "run:ID", "ID", "default", a path to a ``.keras`` file, or an ensemble
            ("ensemble:run:3+run:5", "ensemble:NAME").
        db: the database, for a run's operating point (opened from the settings when None
            and the reference is a run).
        models_dir: folder of the default model (tests); the repo's ``models/default``.

    Returns:
        The loaded model.

    Raises:
        ModelError: no such run model / default model / file / ensemble, or an unreadable
            model or card.
    """
    if ensembles.is_ensemble_ref(str(ref).strip()):
        return ensembles.load_ensemble(str(ref).strip(), db=db, models_dir=models_dir)
    if hierarchy.is_hierarchical_ref(ref):
        return hierarchy.load_hierarchical(str(ref), db=db,
                                           models_dir=None if str(ref).strip() ==
                                           hierarchy.SHIPPED else models_dir)
    return store.load_single(ref, db=db, models_dir=models_dir)


def shipped_models() -> dict[str, str]:
    """The models shipped in the repository that are present (reference -> title): the
    default binary model and the two-step three-class model."""
    out = {}
    if (store.DEFAULT_MODELS_DIR / store.DEFAULT_MODEL_NAME).is_file():
        out["default"] = "Shipped default model (normal / pneumonia)"
    if hierarchy.unavailable(hierarchy.SHIPPED) is None:
        out[hierarchy.SHIPPED] = ("Shipped three-class model (normal / bacterial / viral: "
                                  "pneumonia first, then the subtype)")
    return out
