"""One model by reference (a run, the shipped default or a ``.keras`` file), with its labels
and its operating point: :class:`LoadedModel`, the card reader, and the one way to predict
probabilities and decide at the stored operating point (:func:`decide`, never a silent 0.5).

A run's model is ``<CXR_HOME>/runs/<ID>/best.keras`` with its ``model_card.json``; its threshold
is the run's newest operating point in the DB, falling back to the card's. A ``.keras`` file
without a card gets labels inferred from the output size, and a binary one gets 0.5, flagged by
``threshold_source == "none (0.5)"`` so pages can warn. Ensembles and the reference dispatcher
sit above this module (:mod:`cxr_core.models.ensembles`, :mod:`cxr_core.models.refs`).
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cxr_core.core.errors import ConfigError, ModelError
from cxr_core.core.labels import BINARY_CLASSES, THREE_CLASSES, scheme_of_classes
from cxr_core.core.model_refs import REPO_MODELS, shipped_models
from cxr_core.core.settings import get_settings
from cxr_core.storage import Database, open_db
from cxr_core.storage import evals as eval_store

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODELS_DIR = REPO / "models" / "default"
CARD_NAME = "model_card.json"
RUN_MODEL_NAME = "best.keras"  # a run folder's model (its best epoch)
DEFAULT_MODEL_NAME = "model.keras"
HIERARCHICAL = "hierarchical"  # a composite card's kind: the two-step three-class reading
NO_THRESHOLD = "none (0.5)"  # threshold_source when a binary model has no operating point
_RUN_REF = re.compile(r"^(?:run:)?(\d+)$")


@dataclass(frozen=True, eq=False)  # eq=False: holds a keras.Model
class LoadedModel:
    """A model ready to predict, with everything needed to read its outputs.

    Attributes:
        ref: the normalised reference ("run:ID", "default" or the file path).
        model: the Keras model (input float32 [0, 255], output probabilities).
        labels: class names in output-column order (binary: positive class second).
        label_scheme: "binary", "three_class" or "folders".
        image_size: square input side in pixels.
        channels: 1 or 3 input channels.
        threshold: binary operating point on P(positive) (positive iff p >= threshold);
            None for multi-class (argmax).
        threshold_source: where the threshold came from: "run operating point (<method>,
            <who>)", "model card", "none (0.5)" (no operating point: pages warn), or
            "argmax" for multi-class.
        saliency_layer: the Grad-CAM target layer, or None if the model has none.
        card: the model card (empty when there is none; an ensemble's card says what it is).
        run_id: the run's id for run references, else None.
        members: an ensemble's loaded members (then ``model`` and ``saliency_layer`` are None,
            and ``image_size``/``channels`` are its largest member's); () for one model.
    """

    ref: str
    model: Any
    labels: tuple[str, ...]
    label_scheme: str
    image_size: int
    channels: int
    threshold: float | None
    threshold_source: str
    saliency_layer: str | None
    card: dict = field(default_factory=dict)
    run_id: int | None = None
    members: tuple[LoadedModel, ...] = ()

    @property
    def is_binary(self) -> bool:
        """True for two classes (a thresholded positive-class probability)."""
        return len(self.labels) == 2

    @property
    def is_hierarchical(self) -> bool:
        """The two-step three-class reading (:mod:`cxr_core.models.hierarchy`): members are
        (the pneumonia model, the subtype model); ``threshold`` is the first's operating point
        on P(pneumonia) = 1 - P(NORMAL)."""
        return bool(self.members) and (self.card or {}).get("kind") == HIERARCHICAL

    @property
    def priors(self) -> dict | None:
        """The card's class priors (a model decided by the argmax at a target prior): its
        outputs are moved from ``train`` to ``target`` (:func:`outputs`); None otherwise."""
        got = (self.card or {}).get("priors")
        if not isinstance(got, dict) or self.model is None:
            return None
        return got if list(got.get("classes") or self.labels) == list(self.labels) else None

    @property
    def has_operating_point(self) -> bool:
        """False when a binary model falls back to 0.5 for want of a stored threshold."""
        return self.threshold_source != NO_THRESHOLD


def parse_run_ref(ref: str) -> int | None:
    """The run id of ``"run:ID"`` / ``"ID"``, else None."""
    m = _RUN_REF.match(str(ref).strip())
    return int(m.group(1)) if m else None


def read_card(path: str | Path) -> dict:
    """A model card JSON file, or {} when missing.

    Raises:
        ModelError: the file exists but is not a JSON object.
    """
    p = Path(path)
    if not p.is_file():
        return {}
    try:
        card = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read model card {p}: expected a JSON object ({exc})") from exc
    if not isinstance(card, dict):
        raise ModelError(f"model card {p} must be a JSON object. Received: {type(card).__name__}")
    return card


def load_single(ref: str, *, db: Database | None = None,
                   models_dir: str | Path | None = None) -> LoadedModel:
    """Load one model by reference: a run, the shipped default or a ``.keras`` file (an
    ensemble is :func:`cxr_core.models.refs.load_model_ref`'s).

    Args:
        ref: "run:ID", "ID", "default", another shipped model's name (``models/NAME/``) or a
            path to a ``.keras`` file.
        db: the database, for a run's operating point (opened from the settings when None
            and the reference is a run).
        models_dir: folder of the default model (tests); the repo's ``models/default``.

    Returns:
        The loaded model.

    Raises:
        ModelError: no such run model / default model / file, an unreadable model or card, or
            an ensemble reference.
    """
    ref = str(ref).strip()
    if ref.startswith("ensemble:"):
        raise ModelError("an ensemble is loaded by cxr_core.models.refs.load_model_ref, not as "
                         f"one model. Received: {ref!r}")
    run_id = parse_run_ref(ref)
    if run_id is not None:
        return _load_run(run_id, db)
    if ref == "default":
        folder = Path(models_dir) if models_dir is not None else DEFAULT_MODELS_DIR
        path = folder / DEFAULT_MODEL_NAME
        if not path.is_file():
            raise ModelError(f"no default model shipped yet: expected {path} (and "
                             f"{folder / CARD_NAME}); train one or pass a run id or .keras file")
        return _assemble("default", path, read_card(folder / CARD_NAME))
    if ref in shipped_models() and (REPO_MODELS / ref / DEFAULT_MODEL_NAME).is_file():
        # another single model shipped in the repository: models/NAME/
        folder = REPO_MODELS / ref
        return _assemble(ref, folder / DEFAULT_MODEL_NAME, read_card(folder / CARD_NAME))
    path = Path(ref).expanduser()
    if path.suffix != ".keras":
        raise ModelError("a model reference is 'run:ID', an ID, 'default', a .keras file or "
                         f"'ensemble:...'. Received: {ref!r}")
    if not path.is_file():
        raise ModelError(f"model file not found: expected an existing .keras file. "
                         f"Received: {path}")
    return _assemble(str(path), path, read_card(path.parent / CARD_NAME))


def model_file(ref: str | None, artifact_dir: str | None) -> Path | None:
    """The .keras file behind a model reference, if one exists on disk (the layout :func:`load_model_ref` reads)."""
    if ref == "default":
        path = DEFAULT_MODELS_DIR / DEFAULT_MODEL_NAME
    elif ref and ref in shipped_models():
        path = REPO_MODELS / ref / DEFAULT_MODEL_NAME
    elif ref and ref.startswith("run:"):
        path = Path(artifact_dir) / RUN_MODEL_NAME if artifact_dir else None
    else:
        path = Path(ref) if ref else None
    return path if path is not None and path.is_file() else None


def _run_folder(run_id: int, db: Database | None) -> Path:
    default = get_settings().runs_dir / str(run_id)
    if (default / RUN_MODEL_NAME).is_file() or db is None:
        return default
    with db.session() as s:
        brief = eval_store.get_run_brief(session=s, run_id=run_id)
    if brief is not None and brief.artifact_dir:
        folder = Path(brief.artifact_dir)
        if (folder / RUN_MODEL_NAME).is_file():
            return folder
    return default


def _load_run(run_id: int, db: Database | None) -> LoadedModel:
    db = db or open_db()
    folder = _run_folder(run_id, db)
    path = folder / RUN_MODEL_NAME
    if not path.is_file():
        raise ModelError(f"run {run_id} has no model file: expected {path} (is the run finished?)")
    card = read_card(folder / CARD_NAME)
    with db.session() as s:
        op = eval_store.latest_operating_point(session=s, run_id=run_id)
    loaded = _assemble(f"run:{run_id}", path, card, run_id=run_id)
    if op is not None and loaded.is_binary:
        return _with_threshold(loaded, op.threshold, f"run operating point ({op.method}, "
                                                     f"{op.changed_by})")
    return loaded


def _with_threshold(loaded: LoadedModel, threshold: float, source: str) -> LoadedModel:
    return replace(loaded, threshold=float(threshold), threshold_source=source)


def _assemble(ref: str, path: Path, card: dict, run_id: int | None = None) -> LoadedModel:
    from cxr_core.models import layers

    model = layers.load_model(path)
    n_out = int(model.output_shape[-1])
    labels, scheme = _labels(card, n_out, path)
    shape = model.input_shape
    if len(shape) != 4 or shape[1] is None or shape[1] != shape[2]:
        raise ModelError(f"{path}: expected a square image input (None, S, S, C). "
                         f"Received: input shape {shape}")
    size, channels = int(shape[1]), int(shape[3])
    if channels not in (1, 3):
        raise ModelError(f"{path}: expected a grayscale (1) or RGB (3) image input. "
                         f"Received: input shape {shape}")
    if card.get("image_size") not in (None, size) or card.get("channels") not in (None, channels):
        raise ModelError(f"{path}: model card says image_size={card.get('image_size')}, "
                         f"channels={card.get('channels')} but the model takes "
                         f"{size}x{size}x{channels}")
    threshold, source = _card_threshold(card, len(labels), path.parent / CARD_NAME)
    saliency = card.get("saliency_layer") or _saliency_layer(model)
    return LoadedModel(ref, model, labels, scheme, size, channels, threshold, source, saliency,
                       card, run_id)


def _labels(card: dict, n_out: int, path: Path) -> tuple[tuple[str, ...], str]:
    """Class names from the card, else inferred from the output width."""
    labels = card.get("labels")
    if labels and not isinstance(labels, (list, tuple)):
        raise ModelError(f"{path}: model card \"labels\" must be a list of class names. "
                         f"Received: labels={labels!r}")
    if labels:
        labels = tuple(str(v) for v in labels)
        width = 2 if n_out == 1 else n_out
        if len(labels) != width:
            raise ModelError(f"{path}: model card lists {len(labels)} labels {list(labels)} but "
                             f"the model has {n_out} output unit(s)")
        scheme = card.get("label_scheme") or scheme_of_classes(labels)
        return labels, str(scheme)
    if n_out in (1, 2):
        return BINARY_CLASSES, "binary"
    if n_out == 3:
        return THREE_CLASSES, "three_class"
    raise ModelError(f"{path}: no model card, and {n_out} output units cannot be mapped to "
                     f"labels; add a {CARD_NAME} with \"labels\" beside the model")


def _card_threshold(card: dict, n_classes: int, card_path: Path) -> tuple[float | None, str]:
    if n_classes != 2:
        return None, "argmax"
    op = card.get("operating_point") or {}
    value = op.get("threshold") if isinstance(op, dict) else None
    if value is None:
        return 0.5, NO_THRESHOLD
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0.0 <= float(value) <= 1.0:
        raise ModelError(f"{card_path}: model card threshold must be in [0, 1]. "
                         f"Received: threshold={value!r}")
    return float(value), "model card"


def _saliency_layer(model: Any) -> str | None:
    from cxr_core.models import graph

    try:
        return graph.saliency_layer_name(model)
    except ModelError:
        return None


def to_probs(raw: np.ndarray) -> np.ndarray:
    """Model outputs → (N, C) probabilities; one sigmoid unit becomes ``[1 - p, p]``."""
    out = np.asarray(raw, dtype=np.float64)
    if out.ndim == 1:
        out = out[:, None]
    if out.shape[1] == 1:
        p = np.clip(out[:, 0], 0.0, 1.0)
        return np.column_stack([1.0 - p, p])
    out = np.clip(out, 0.0, 1.0)
    return out / np.maximum(out.sum(axis=1, keepdims=True), 1e-12)  # float32 softmax noise


def combine_members(loaded: LoadedModel, member_probs: Sequence[np.ndarray]) -> np.ndarray:
    """A composite model's probabilities from its members' (in ``loaded.members`` order): an
    ensemble's mean, or the hierarchical reading's
    ``[1 - p, p * P(BACTERIA | pneumonia), p * P(VIRUS | pneumonia)]`` with ``p`` the pneumonia
    model's P(PNEUMONIA) and the subtype model's probabilities (at its target prior)."""
    if not loaded.is_hierarchical:
        return np.mean(member_probs, axis=0)
    pneumonia, subtype = (np.asarray(m, dtype=np.float64) for m in member_probs)
    p = pneumonia[:, 1:2]
    return np.concatenate([1.0 - p, p * subtype], axis=1)


def outputs(loaded: LoadedModel, raw: np.ndarray) -> np.ndarray:
    """One model's raw outputs as the probabilities it reports: :func:`to_probs`, then moved
    to its card's target prior when it has one (:attr:`LoadedModel.priors`)."""
    probs = to_probs(raw)
    priors = loaded.priors
    if priors is None or not len(probs):
        return probs
    from cxr_core.stats.priors import adjust

    return adjust(probs, priors["train"], priors["target"])


def with_target_prior(loaded: LoadedModel, target: Sequence[float], source: str) -> LoadedModel:
    """The same model deciding at another target prior (a site's, estimated from its labelled
    sample): its card's ``priors.target`` replaced and the source said.

    Raises:
        ModelError: the model has no priors (it is decided at an operating point).
    """
    from dataclasses import replace

    if loaded.priors is None:
        raise ModelError(f"{loaded.ref} has no class priors to retarget (only models decided "
                         "by the argmax at a prior have them)")
    target = [float(v) for v in target]
    if len(target) != len(loaded.labels):
        raise ModelError(f"a target prior needs one value per class ({len(loaded.labels)}). "
                         f"Received: {target}")
    card = {**loaded.card, "priors": {**loaded.priors, "target": target,
                                      "target_source": source}}
    return replace(loaded, card=card)


def input_specs(loaded: LoadedModel) -> tuple[tuple[int, int], ...]:
    """The (size, channels) views a prediction decodes each image to: the model's own first,
    then every other member's of an ensemble (each member reads its own decode)."""
    specs = [(loaded.image_size, loaded.channels)]
    specs += [(m.image_size, m.channels) for m in loaded.members]
    return tuple(dict.fromkeys(specs))


def predict_views(loaded: LoadedModel, views: Mapping[tuple[int, int], np.ndarray], *,
                  batch_size: int = 32) -> np.ndarray:
    """Class probabilities from the images decoded once per :func:`input_specs` view.

    An ensemble's are the mean of its members' probabilities, each member on its own view.

    Args:
        loaded: from :func:`load_model_ref`.
        views: (size, channels) -> (N, size, size, channels) uint8, for every input spec.
        batch_size: images per forward pass.
    """
    if not loaded.members:
        return predict_probs(loaded, views[(loaded.image_size, loaded.channels)],
                             batch_size=batch_size)
    return combine_members(loaded, [predict_probs(m, views[(m.image_size, m.channels)],
                                                  batch_size=batch_size)
                                    for m in loaded.members])


def _resized(x: np.ndarray, size: int) -> np.ndarray:
    """(N, S, S, C) uint8 resized to ``size`` as the one loader resizes (channels kept)."""
    from PIL import Image

    from cxr_core.data.images import to_array

    if x.shape[1] == size:
        return x
    if len(x) == 0:
        return np.zeros((0, size, size, x.shape[-1]), np.uint8)
    return np.stack([to_array(Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a), size,
                              a.shape[-1]) for a in x])


def predict_probs(loaded: LoadedModel, images_uint8: np.ndarray, *,
                  batch_size: int = 32) -> np.ndarray:
    """Class probabilities for a batch of images already at the model's size.

    An ensemble's members each get the images resized to their own size (prefer
    :func:`predict_views`, which gives each member its own decode of the file).

    Args:
        loaded: from :func:`load_model_ref`.
        images_uint8: (N, H, W, C) uint8 with H == W == ``loaded.image_size``; C of 1 or 3
            (converted to the model's channels).
        batch_size: images per forward pass.

    Returns:
        (N, n_classes) float probabilities in ``loaded.labels`` order.

    Raises:
        ConfigError: wrong shape or size, or batch_size < 1.
    """
    x = np.asarray(images_uint8)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[1:3] != (loaded.image_size, loaded.image_size) \
            or x.shape[3] not in (1, 3):
        raise ConfigError(f"images must be (N, {loaded.image_size}, {loaded.image_size}, 1|3). "
                          f"Received: shape={x.shape}")
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be >= 1. Received: batch_size={batch_size}")
    if loaded.members:
        return combine_members(loaded, [predict_probs(m, _resized(x, m.image_size),
                                                      batch_size=batch_size)
                                        for m in loaded.members])
    if x.shape[3] != loaded.channels:  # gray repeated, or ITU-R 601 luma (PIL's "L")
        luma = np.array([0.299, 0.587, 0.114], np.float32)
        x = (np.repeat(x, 3, axis=3) if loaded.channels == 3 else
             np.round(x.astype(np.float32) @ luma)[..., None])
    if len(x) == 0:
        return np.zeros((0, len(loaded.labels)))
    x = x.astype(np.float32)
    # predict_on_batch per chunk of batch_size: the same batches and predict step as
    # model.predict, without its per-call data-adapter setup (about 100 ms), which dominates
    # the one-film requests of the Predict page (about 6 ms for one 128 px film on CPU).
    raw = [np.asarray(loaded.model.predict_on_batch(x[i:i + batch_size]))
           for i in range(0, len(x), batch_size)]
    return outputs(loaded, np.concatenate(raw))


def decide(loaded: LoadedModel, probs: np.ndarray) -> list[str]:
    """Predicted class names at the model's operating point (argmax for multi-class).

    Args:
        loaded: the model (its ``threshold`` is the stored operating point).
        probs: (N, C) probabilities from :func:`predict_probs`.

    Returns:
        One label per row.
    """
    from cxr_core.stats.metrics import predict

    p = np.asarray(probs, dtype=float)
    if p.ndim == 1:
        p = p[None, :]
    # Binary: the operating point; the hierarchical reading: its pneumonia step's operating
    # point, then the more probable subtype; any other multi-class model: the argmax.
    idx = predict(p, threshold=loaded.threshold if loaded.is_binary or loaded.is_hierarchical
                  else None)
    return [loaded.labels[i] for i in idx]
