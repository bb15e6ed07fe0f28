"""What a signed-in (app) principal may name as a model: references, never file paths
(issue 26 item 7). Pure: no model is loaded, no database read.

A model reference is one of:

* ``run:ID`` (or a bare ``ID``): a training run's model;
* ``default`` or the name of another model shipped in the repository's ``models/NAME/``
  folder (``models/NAME/model.keras``, or ``model_card.json`` for a shipped composite such as
  the two-step ``three_class``);
* ``ensemble:NAME``: a named ensemble (its members were checked when it was made);
* ``ensemble:A+B+...``: an ad hoc ensemble whose members are each one of the first two;
* ``hier:A+B``: a two-step three-class model whose steps are each one of the first two.

A file path (``/data/x.keras``) is not a reference: the app's job params and actions refuse it
for app principals (:func:`check_params`, called by :func:`cxr_core.jobs.actions.submit_job` and
:func:`cxr_core.models.actions.create_ensemble`); the CLI, which runs on the server as its
operator, may still pass one.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cxr_core.core.errors import PermissionDenied

__all__ = ["MODEL_PARAM_KEYS", "REPO_MODELS", "check_params", "check_reference",
           "is_reference", "shipped_models"]

REPO_MODELS = Path(__file__).resolve().parents[2] / "models"  # the repository's shipped models
SHIPPED_FILE = "model.keras"
ENSEMBLE = "ensemble:"
HIERARCHY = "hier:"
SHIPPED_CARD = "model_card.json"
# Job params that name models (evaluate: model_ref; create_ensemble: members; the demo job:
# models). A kind added later that names a model uses one of these keys.
MODEL_PARAM_KEYS = ("model_ref", "model", "models", "members", "base", "weights")
_RUN = re.compile(r"^(?:run:)?\d+$")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")


def shipped_models(folder: Path | None = None) -> tuple[str, ...]:
    """Names of the models shipped in ``models/NAME/`` (a ``model.keras`` or a
    ``model_card.json``: ``default`` and ``three_class`` among them)."""
    root = folder or REPO_MODELS
    if not root.is_dir():
        return ()
    return tuple(sorted(p.name for p in root.iterdir()
                        if _NAME.match(p.name) and ((p / SHIPPED_FILE).is_file()
                                                    or (p / SHIPPED_CARD).is_file())))


def _single(ref: str, shipped: Iterable[str]) -> bool:
    return bool(_RUN.match(ref)) or ref == "default" or ref in set(shipped)


def is_reference(ref: Any, shipped: Iterable[str] | None = None) -> bool:
    """Whether ``ref`` is a model reference (see the module docstring), not a path."""
    if not isinstance(ref, str):
        return False
    ref = ref.strip()
    names = tuple(shipped_models() if shipped is None else shipped)
    if ref.startswith(HIERARCHY):
        steps = ref[len(HIERARCHY):].split("+")
        return len(steps) == 2 and all(_single(s.strip(), names) for s in steps)
    if ref.startswith(ENSEMBLE):
        body = ref[len(ENSEMBLE):]
        if "+" not in body:
            return bool(_NAME.match(body)) and not body.endswith(".keras")
        return all(_single(m.strip(), names) for m in body.split("+"))
    return _single(ref, names)


def check_reference(ref: Any, *, identity: str, what: str = "model") -> str:
    """``ref`` stripped, if it is a model reference.

    Raises:
        PermissionDenied: a file path or anything else (the message lists what is accepted).
    """
    if is_reference(ref):
        return str(ref).strip()
    shipped = ", ".join(repr(n) for n in shipped_models()) or "'default'"
    raise PermissionDenied(
        f"{identity} may name a {what} only by reference: 'run:ID', a shipped model "
        f"({shipped}), 'ensemble:NAME', 'ensemble:run:3+run:5' or 'hier:run:3+run:5'; a file "
        f"path can be used from the command line on the server only. Received: {ref!r}")


def check_params(params: Mapping[str, Any], *, identity: str) -> None:
    """Every model a job's params name (:data:`MODEL_PARAM_KEYS`) must be a reference.

    ``weights`` may also be None or ``"imagenet"`` (a training config's start).

    Raises:
        PermissionDenied: one of them is a path (or not a string).
    """
    for key in MODEL_PARAM_KEYS:
        if key not in params or params[key] is None:
            continue
        values = params[key] if isinstance(params[key], (list, tuple)) else [params[key]]
        for value in values:
            if key == "weights" and value == "imagenet":
                continue
            check_reference(value, identity=identity, what=f"model ({key})")
