"""Ensembles: a few trained models read as one model, by reference, ad hoc or named.

References (accepted wherever a model reference is: Predict, Compare's Evaluate, the CLI):

* ``"ensemble:run:3+run:5+run:7"``: an ad hoc ensemble of the members joined by ``+``, each
  ``"run:ID"``, ``"ID"``, ``"default"`` or a ``.keras`` path. The reference is normalised to
  the members sorted (runs by id, then the default, then files), so one set of members is one
  model on Compare whatever order it was typed in.
* ``"ensemble:NAME"``: a named ensemble, ``<artifacts>/ensembles/NAME.json``, written once by
  ``python -m cxr_core ensemble create`` (:func:`create_ensemble`). Predict's and Compare's
  pickers list them. A name is never rewritten: its members and operating point stay what its
  stored evaluations were scored with (make another name to change them).

Outputs: the mean of the members' class probabilities, each member reading the image at its
own input size and channels (its own decode and preprocessing). At least 2 distinct members,
all with the same class list and label scheme; an ensemble cannot be a member.

Operating point (binary): never borrowed from a member. It is chosen with the members' own
method and target sensitivity on the **mean of the members' stored validation outputs**, when
every member is a training run whose validation evaluation (stored by the worker) covers the
same images in the same order with the same labels: ``threshold_source`` says so and how many
images. A named ensemble keeps the one chosen at creation, or one set by hand
(``--threshold`` with who and why) when the members share no validation images: creation is
refused without one. An ad hoc ensemble whose members share no validation images has no
operating point: ``threshold_source`` is :data:`cxr_core.models.store.NO_THRESHOLD` (pages warn
that decisions use 0.5) and the card's ``operating_point_note`` says why. Multi-class
ensembles use the argmax.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from cxr_core.core.errors import ConfigError, ModelError
from cxr_core.core.model_refs import shipped_models
from cxr_core.core.settings import get_settings
from cxr_core.core.text_safe import md_escape
from cxr_core.models import store as model_store
from cxr_core.models.store import NO_THRESHOLD, LoadedModel, parse_run_ref, to_probs
from cxr_core.stats.thresholds import DEFAULT_TARGET_SENSITIVITY
from cxr_core.storage import Database, open_db
from cxr_core.storage import evals as store

PREFIX = "ensemble:"
COMBINE = "mean of the members' probabilities (each member at its own input size)"
# Splits of a member's stored validation evaluation, in order of preference: a calibration
# slice disjoint from model selection where the worker stores one, else the validation split.
CALIBRATION_SPLITS = ("calibration", "val")
DEFAULT_TARGET = DEFAULT_TARGET_SENSITIVITY
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")


# -- References -----------------------------------------------------------------------------

def is_ensemble_ref(ref: str | None) -> bool:
    """True for ``"ensemble:..."`` references."""
    return str(ref or "").strip().startswith(PREFIX)


def _member_key(ref: str) -> tuple:
    run_id = parse_run_ref(ref)
    return (0, run_id, "") if run_id is not None else (1 if ref == "default" else 2, 0, ref)


def normalise_members(members: Sequence[str]) -> tuple[str, ...]:
    """Members as canonical references ("run:ID", "default", a path), sorted.

    Raises:
        ModelError: fewer than 2 distinct members, a nested ensemble or an unknown reference.
    """
    out = []
    for raw in members:
        ref = str(raw).strip()
        run_id = parse_run_ref(ref)
        if is_ensemble_ref(ref):
            raise ModelError(f"an ensemble cannot be a member of an ensemble. Received: {ref!r}")
        if run_id is None and ref != "default" and not ref.endswith(".keras") \
                and not (ref in shipped_models() and (model_store.REPO / "models" / ref
                                                      / model_store.DEFAULT_MODEL_NAME).is_file()):
            raise ModelError("an ensemble member is 'run:ID', an ID, 'default' (or another "
                             f"shipped model) or a .keras file. Received: {ref!r}")
        out.append(f"run:{run_id}" if run_id is not None else ref)
    if len(set(out)) != len(out):
        raise ModelError(f"ensemble members must be distinct. Received: {list(members)}")
    if len(out) < 2:
        raise ModelError("an ensemble needs at least 2 members, e.g. "
                         f"'ensemble:run:3+run:5'. Received: {list(members)}")
    return tuple(sorted(out, key=_member_key))


def ensemble_ref(members: Sequence[str]) -> str:
    """The ad hoc reference of these members: ``"ensemble:run:3+run:5"`` (normalised)."""
    return PREFIX + "+".join(normalise_members(members))


def _name_of(ref: str) -> str | None:
    """The name of a named-ensemble reference, else None (an ad hoc list of members)."""
    body = ref.strip()[len(PREFIX):]
    return body if _NAME.match(body) and body != "default" and not body.endswith(".keras") \
        else None


def ensembles_dir() -> Path:
    """Where named ensembles live: ``<artifacts>/ensembles`` (beside ``runs/``)."""
    return get_settings().artifacts_root / "ensembles"


def read_named(name: str) -> dict:
    """A named ensemble's JSON card.

    Raises:
        ModelError: no such ensemble, or an unreadable card.
    """
    path = ensembles_dir() / f"{name}.json"
    if not path.is_file():
        known = [e.name for e in list_ensembles()]
        raise ModelError(f"no ensemble named {name!r}: expected {path}. Known: {known or 'none'}"
                         "; create one with `python -m cxr_core ensemble create`")
    card = model_store.read_card(path)
    if not isinstance(card.get("members"), list):
        raise ModelError(f"{path}: an ensemble card needs a \"members\" list")
    return card


def members_of(ref: str) -> tuple[str, ...]:
    """The member references of an ensemble reference (read from its card when named).

    Raises:
        ModelError: not an ensemble reference, unknown name or bad members.
    """
    if not is_ensemble_ref(ref):
        raise ModelError(f"not an ensemble reference. Received: {ref!r}")
    name = _name_of(ref)
    if name is not None:
        return normalise_members(read_named(name)["members"])
    return normalise_members(ref.strip()[len(PREFIX):].split("+"))


@dataclass(frozen=True)
class EnsembleInfo:
    """A named ensemble, as the pickers list it (no model loaded)."""

    name: str
    members: tuple[str, ...]
    labels: tuple[str, ...]
    threshold: float | None
    threshold_source: str
    created_by: str
    note: str

    @property
    def ref(self) -> str:
        return PREFIX + self.name

    @property
    def title(self) -> str:
        return f"{self.name} (ensemble of {', '.join(self.members)})"


def _info(card: dict) -> EnsembleInfo:
    op = card.get("operating_point") or None
    labels = tuple(card.get("labels") or ())
    return EnsembleInfo(str(card["name"]), tuple(card["members"]), labels,
                        None if op is None else float(op["threshold"]),
                        _source(op) if op else ("argmax" if len(labels) != 2 else NO_THRESHOLD),
                        str(card.get("created_by") or ""), str(card.get("note") or ""))


def list_ensembles() -> list[EnsembleInfo]:
    """Named ensembles, by name (unreadable cards are left out)."""
    folder = ensembles_dir()
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            out.append(_info(model_store.read_card(path)))
        except (ModelError, KeyError, TypeError, ValueError):
            continue
    return out


# -- Operating point ------------------------------------------------------------------------

def _source(op: dict) -> str:
    if op.get("method") == "manual":
        return f"ensemble operating point (manual, {op.get('changed_by') or 'unknown'})"
    target = f" {op['target']:.2f}" if op.get("target") is not None else ""
    return (f"ensemble operating point ({op['method']}{target} on the mean of the members' "
            f"{op.get('split', 'val')} outputs, {op.get('n')} images)")


def _stored_validation(s, run_id: int, split: str):
    """The run's own validation evaluation (the worker's: no source path), newest first."""
    return next((e for e in store.list_evaluations(session=s, run_id=run_id, with_metrics=False)
                 if e.split == split and not e.source and e.model_ref == f"run:{run_id}"), None)


def choose_operating_point(db: Database | None,
                           members: Sequence[LoadedModel]) -> tuple[dict | None, str]:
    """The ensemble's threshold, chosen on the mean of its members' shared validation outputs.

    Args:
        db: the database (opened from the settings when None and needed).
        members: the loaded members (compatible labels).

    Returns:
        (operating point dict, "") or (None, why none can be chosen); (None, "argmax") for
        multi-class members.
    """
    from cxr_core.stats.thresholds import choose_threshold

    if len(members[0].labels) != 2:
        return None, "argmax"
    run_ids = [m.run_id for m in members]
    if any(r is None for r in run_ids):
        files = [m.ref for m in members if m.run_id is None]
        return None, (f"{', '.join(files)} {'is' if len(files) == 1 else 'are'} not a training "
                      "run, so no validation outputs are stored to choose a threshold on")
    db = db or open_db()
    with db.session() as s:
        for split in CALIBRATION_SPLITS:
            infos = [_stored_validation(s, r, split) for r in run_ids]
            if all(infos):
                break
        else:
            return None, "not every member has stored validation outputs"
        preds = [store.get_predictions(session=s, evaluation_id=e.id) for e in infos]
        ops = [store.latest_operating_point(session=s, run_id=r) for r in run_ids]
    if len({e.images_key for e in infos}) != 1:
        return None, (f"the members' {split} splits are different images (trained on different "
                      "datasets or splits), so no outputs are shared to choose a threshold on")
    if any(not np.array_equal(p.y_true, preds[0].y_true) for p in preds):
        return None, (f"the members' {split} outputs were scored against different labels "
                      "(relabels between their runs)")
    mean = np.mean([to_probs(p.probs) for p in preds], axis=0)
    rules = {(o.method, o.target) for o in ops if o is not None and o.method != "manual"}
    method, target = rules.pop() if len(rules) == 1 else ("sensitivity", DEFAULT_TARGET)
    chosen = choose_threshold(preds[0].y_true, mean[:, 1], method=method,
                              target_sensitivity=target if target is not None else DEFAULT_TARGET)
    return {**chosen.to_dict(), "split": split, "n": int(len(mean)),
            "images_key": infos[0].images_key, "evaluation_ids": [e.id for e in infos],
            "chosen_on": f"mean of the members' {split} outputs"}, ""


def _manual_op(threshold: float, changed_by: str, note: str) -> dict:
    if isinstance(threshold, bool) or not 0.0 <= float(threshold) <= 1.0:
        raise ConfigError(f"threshold must be in [0, 1]. Received: threshold={threshold!r}")
    if not str(changed_by).strip():
        raise ConfigError("a threshold set by hand needs who set it. Received: changed_by=''")
    return {"threshold": float(threshold), "method": "manual", "target": None,
            "changed_by": str(changed_by).strip(), "note": str(note or ""),
            "chosen_on": "set by hand"}


# -- Loading --------------------------------------------------------------------------------

def _check_compatible(members: Sequence[LoadedModel]) -> None:
    kinds = {(m.labels, m.label_scheme) for m in members}
    if len(kinds) != 1:
        got = ", ".join(f"{m.ref} {list(m.labels)} ({m.label_scheme})" for m in members)
        raise ModelError("ensemble members must share one class list and label scheme. "
                         f"Received: {got}")


def load_ensemble(ref: str, *, db: Database | None = None,
                  models_dir: str | Path | None = None) -> LoadedModel:
    """Load every member of an ensemble reference (see the module docstring).

    Returns:
        A :class:`LoadedModel` with ``model`` None and ``members`` set; its ``image_size`` and
        ``channels`` are its largest member's (the pixels a prediction keeps for display).

    Raises:
        ModelError: an unknown name, bad or missing members, or incompatible members.
    """
    ref = ref.strip()
    name = _name_of(ref)
    card = read_named(name) if name is not None else {}
    refs = normalise_members(card["members"]) if card else members_of(ref)
    members = tuple(model_store.load_single(m, db=db, models_dir=models_dir) for m in refs)
    _check_compatible(members)
    labels, scheme = members[0].labels, members[0].label_scheme
    if card and tuple(card.get("labels") or labels) != labels:
        raise ModelError(f"ensemble {name!r} was made of members with labels "
                         f"{card.get('labels')}, but they now load with {list(labels)}")
    if card:
        op, why = card.get("operating_point"), card.get("operating_point_note") or ""
    else:
        op, why = choose_operating_point(db, members)
    if len(labels) != 2:
        threshold, source = None, "argmax"
    elif op:
        threshold, source = float(op["threshold"]), _source(op)
    else:
        threshold, source = 0.5, NO_THRESHOLD
    largest = max(members, key=lambda m: m.image_size)
    full = {"kind": "ensemble", "name": name or ref, "members": list(refs),
            "labels": list(labels), "label_scheme": scheme, "combine": COMBINE,
            **{k: v for k, v in card.items() if k not in ("members", "labels")},
            "operating_point": op, "operating_point_note": why}
    return LoadedModel(PREFIX + name if name else ensemble_ref(refs), None, labels, scheme,
                       largest.image_size, largest.channels, threshold, source, None, full, None,
                       members)


def create_ensemble(db: Database | None, name: str, members: Sequence[str], *,
                    threshold: float | None = None, changed_by: str = "",
                    note: str = "") -> EnsembleInfo:
    """Make a named ensemble (``python -m cxr_core ensemble create``): load and check every
    member, fix the operating point, write ``<artifacts>/ensembles/NAME.json`` once.

    Args:
        db: the database (opened from the settings when None).
        name: letters, digits, ``_.-``, starting with a letter (the reference ``ensemble:NAME``).
        members: 2 or more member references.
        threshold: a binary operating point set by hand (needs ``changed_by``); None: chosen on
            the members' shared validation outputs (refused when they share none).
        changed_by: who sets it by hand / who made the ensemble.
        note: why.

    Raises:
        ConfigError: a bad name, an existing name, a bad threshold, or no threshold to be had.
        ModelError: bad, missing or incompatible members.
    """
    if not _NAME.match(str(name)) or name == "default":
        raise ConfigError("an ensemble name is letters, digits, '_', '.' or '-', starting with a "
                          f"letter (at most 64). Received: name={name!r}")
    path = ensembles_dir() / f"{name}.json"
    if path.exists():
        raise ConfigError(f"an ensemble named {name!r} exists ({path}); a name always means "
                          "the same members and threshold: choose another name")
    db = db or open_db()
    loaded = load_ensemble(ensemble_ref(members), db=db)
    binary = loaded.is_binary
    if threshold is not None and not binary:
        raise ConfigError(f"a multi-class ensemble uses the argmax; no threshold. Received: "
                          f"threshold={threshold}, labels={list(loaded.labels)}")
    op, why = loaded.card["operating_point"], loaded.card["operating_point_note"]
    if threshold is not None:
        op, why = _manual_op(threshold, changed_by, note), ""
    elif binary and op is None:
        raise ConfigError(f"cannot choose the ensemble's operating point: {why}. Set one by "
                          "hand with --threshold (and --by, --note)")
    card = {"kind": "ensemble", "name": name, "members": list(loaded.card["members"]),
            "labels": list(loaded.labels), "label_scheme": loaded.label_scheme,
            "combine": COMBINE, "operating_point": op, "operating_point_note": why,
            "image_sizes": {m.ref: m.image_size for m in loaded.members},
            "created_by": changed_by, "note": note,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    _write_once(path, card)
    return _info(card)


def _write_once(path: Path, card: dict) -> None:
    """Write the card under a name that must not exist yet (a link, atomic, never replaces)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(json.dumps(card, indent=2, default=str) + "\n")
    try:
        os.link(tmp, path)
    except FileExistsError as exc:
        raise ConfigError(f"an ensemble named {card['name']!r} was just created "
                          "elsewhere; choose another name") from exc
    finally:
        tmp.unlink()


# -- What pages show ------------------------------------------------------------------------

def describe(loaded: LoadedModel) -> str | None:
    """One paragraph of markdown saying what an ensemble is and where its operating point
    comes from (None for a single model); refs and source texts are escaped."""
    if not loaded.members:
        return None
    sizes = ", ".join(f"{md_escape(m.ref)} ({m.image_size} px)" for m in loaded.members)
    text = f"**Ensemble** of {sizes}: the {COMBINE}. "
    if loaded.threshold is None:
        return text + "Multi-class: the most probable class of the mean."
    why = loaded.card.get("operating_point_note")
    if loaded.has_operating_point:
        return text + (f"Its own operating point {loaded.threshold:.3f}: "
                       f"{md_escape(loaded.threshold_source)}.")
    return text + f"No operating point could be chosen ({md_escape(str(why))}): decisions use 0.5."


def unavailable(ref: str, artifact_dirs: dict[str, str | None] | None = None) -> str | None:
    """Why an ensemble reference cannot be explained (a member's model file missing), or None."""
    try:
        refs = members_of(ref)
    except ModelError as exc:
        return str(exc)
    runs = get_settings().runs_dir
    for m in refs:
        run_id = parse_run_ref(m)
        folder = (artifact_dirs or {}).get(m) or (str(runs / str(run_id)) if run_id else None)
        if model_store.model_file(m, folder) is None:
            return f"its member {m} has no model file (.keras) on disk"
    return None


def combined_overlap(overlaps: Sequence[dict]) -> dict | None:
    """The seen-data overlap of an ensemble from its run members': per count the largest
    (a lower bound on the union), recorded only when every member's images were."""
    if not overlaps:
        return None
    keys = [k for k in overlaps[0] if k != "recorded"]
    return {"recorded": all(o.get("recorded") for o in overlaps),
            **{k: max(int(o.get(k) or 0) for o in overlaps) for k in keys}}
