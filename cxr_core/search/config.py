"""What a study is: :class:`StudyConfig` and its search space (:class:`Param`).

A study config file (``python -m cxr_core search create --config SEARCH.json``)::

    {"name": "head-search",
     "base": {"recipe": "cpu128", "dataset": "kermany", "image_size": 64, "epochs": 6},
     "space": {"learning_rate": {"type": "log", "low": 1e-4, "high": 1e-2},
               "optimizer": {"type": "categorical", "choices": ["adam", "rmsprop", "sgd"]},
               "head.layers": {"type": "int", "low": 1, "high": 3},
               "head.units": {"type": "categorical", "choices": [32, 64, 512, 1024]},
               "head.activation": {"type": "categorical", "choices": ["relu", "selu"]}},
     "objective": {"metric": "auc"},            (validation AUC; "dataset": NAME = external)
     "sampler": "tpe", "pruner": "median", "n_trials": 20, "parallel": 1, "seed": 0}

Space names are :class:`~cxr_core.training.config.TrainConfig` fields, or ``head.<field>``
(:class:`~cxr_core.models.specs.HeadConfig`). Every bound and choice is checked by building
the base config with it, so a value the run config would refuse is refused here, naming it.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cxr_core.core.errors import ConfigError
from cxr_core.models.specs import HeadConfig
from cxr_core.training.config import TrainConfig

PARAM_TYPES = ("float", "log", "int", "categorical")
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")
METRICS = ("auc", "accuracy", "sensitivity", "specificity")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,99}$")
# Run config keys a study sets itself: a trial is not a search of these.
NOT_SEARCHABLE = ("recipe", "dataset", "name", "external", "extra", "head")
MAX_TRIALS = 1000


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Param:
    """One searched value: ``float`` / ``log`` (a float drawn on a log scale) / ``int`` (with
    ``log`` optional) between ``low`` and ``high``, or ``categorical`` over ``choices``."""

    name: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple = ()
    log: bool = False
    step: float | int | None = None

    @classmethod
    def from_value(cls, name: str, value: Any) -> Param:
        if not isinstance(value, Mapping):
            raise ConfigError(f"space.{name} must be an object like {{\"type\": \"float\", "
                              f"\"low\": 0.1, \"high\": 0.5}}. Received: {value!r}")
        unknown = sorted(set(value) - {"type", "low", "high", "choices", "log", "step"})
        if unknown:
            raise ConfigError(f"space.{name}: unknown keys {unknown}; expected type, low, "
                              "high, log, step or choices")
        kind = value.get("type")
        if kind not in PARAM_TYPES:
            raise ConfigError(f"space.{name}: type must be one of {list(PARAM_TYPES)}. "
                              f"Received: type={kind!r}")
        if kind == "categorical":
            choices = value.get("choices")
            if not isinstance(choices, (list, tuple)) or not choices:
                raise ConfigError(f"space.{name}: categorical needs a non-empty choices list. "
                                  f"Received: choices={choices!r}")
            if not all(c is None or isinstance(c, (str, int, float, bool)) for c in choices):
                raise ConfigError(f"space.{name}: choices must be strings, numbers, booleans "
                                  f"or null. Received: choices={list(choices)!r}")
            if len(set(map(repr, choices))) != len(choices):
                raise ConfigError(f"space.{name}: each choice once. Received: "
                                  f"choices={list(choices)!r}")
            return cls(name, kind, choices=tuple(choices))
        low, high = value.get("low"), value.get("high")
        if not (_num(low) and _num(high)):
            raise ConfigError(f"space.{name}: {kind} needs numbers low and high. Received: "
                              f"low={low!r}, high={high!r}")
        if low > high:
            raise ConfigError(f"space.{name}: low must be at most high. Received: low={low!r}, "
                              f"high={high!r}")
        log = kind == "log" or bool(value.get("log", False))
        if log and low <= 0:
            raise ConfigError(f"space.{name}: a log scale needs low > 0. Received: low={low!r}")
        if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
            raise ConfigError(f"space.{name}: int bounds must be whole numbers. Received: "
                              f"low={low!r}, high={high!r}")
        step = value.get("step")
        if step is not None and (not _num(step) or step <= 0 or log):
            raise ConfigError(f"space.{name}: step must be a positive number (not with a log "
                              f"scale). Received: step={step!r}")
        if kind == "int":
            return cls(name, kind, int(low), int(high), log=log,
                       step=int(step) if step else None)
        return cls(name, kind, float(low), float(high), log=log,
                   step=float(step) if step else None)

    def values_to_check(self) -> list:
        """The values a run config must accept: both bounds, or every choice."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]

    def to_dict(self) -> dict[str, Any]:
        if self.type == "categorical":
            return {"type": self.type, "choices": list(self.choices)}
        out: dict[str, Any] = {"type": self.type, "low": self.low, "high": self.high}
        if self.log and self.type != "log":
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out


def apply_params(base: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """A run config: ``base`` with the trial's values set (``head.<field>`` into the head;
    a head searched without one in ``base`` starts from :class:`HeadConfig`'s defaults)."""
    out = dict(base)
    head = {k[5:]: v for k, v in params.items() if k.startswith("head.")}
    if head:
        start = HeadConfig.from_value(out.get("head")) or HeadConfig()
        out["head"] = {**start.to_dict(), **head}
        if out.get("dropout") is not None:
            out["dropout"] = None  # the head has its own dropout
    out.update({k: v for k, v in params.items() if not k.startswith("head.")})
    return out


@dataclass(frozen=True)
class Objective:
    """What a trial's value is: ``metric`` of the finished run on its validation split, or on
    ``dataset`` (an external dataset, chosen explicitly: it is then no longer external for the
    chosen model)."""

    metric: str = "auc"
    dataset: str | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"objective.metric must be one of {list(METRICS)}. "
                              f"Received: metric={self.metric!r}")
        if self.dataset is not None and (not isinstance(self.dataset, str)
                                         or not self.dataset.strip()):
            raise ConfigError("objective.dataset must be null (validation) or an external "
                              f"dataset's name. Received: dataset={self.dataset!r}")
        if self.dataset is not None and self.metric != "auc":
            raise ConfigError("on an external dataset the objective is its AUC (the "
                              f"threshold is the run's own). Received: metric={self.metric!r}")

    def describe(self) -> str:
        where = f"external dataset {self.dataset!r}" if self.dataset else "the validation split"
        return f"{self.metric} on {where}"


@dataclass(frozen=True)
class StudyConfig:
    """A hyperparameter study (see the module docstring for the file form).

    Attributes:
        name: The study's name (letters, digits, space, ``_.-``; unique).
        base: The run config every trial starts from (a recipe and a dataset at least).
        space: Searched values by name.
        objective: What is maximised.
        sampler: ``tpe`` (default; constant liar when trials run at once) or ``random``.
        pruner: ``median`` (default), ``hyperband`` or ``none``; reports are the validation
            AUC (accuracy for multi-class runs) after each epoch.
        n_trials: Trials in all.
        parallel: Trials queued at once (each a run any worker takes).
        seed: Seeds the sampler (trial k's draw uses ``seed + k``, so workers agree).
        startup_trials: Trials the median pruner waits for before pruning.
        warmup_epochs: Epochs a trial runs before it may be pruned (median pruner).
    """

    name: str
    base: Mapping[str, Any]
    space: tuple[Param, ...]
    objective: Objective = field(default_factory=Objective)
    sampler: str = "tpe"
    pruner: str = "median"
    n_trials: int = 20
    parallel: int = 1
    seed: int = 0
    startup_trials: int = 3
    warmup_epochs: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_RE.match(self.name):
            raise ConfigError("name must be 1-100 letters, digits, spaces or _.- (starting "
                              f"with a letter or digit). Received: name={self.name!r}")
        for key, allowed in (("sampler", SAMPLERS), ("pruner", PRUNERS)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {list(allowed)}. "
                                  f"Received: {key}={getattr(self, key)!r}")
        for key, lo, hi in (("n_trials", 1, MAX_TRIALS), ("parallel", 1, MAX_TRIALS),
                            ("seed", 0, 2**31 - 1), ("startup_trials", 0, MAX_TRIALS),
                            ("warmup_epochs", 0, 10_000)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ConfigError(f"{key} must be an integer in [{lo}, {hi}]. "
                                  f"Received: {key}={v!r}")
        if self.parallel > self.n_trials:
            raise ConfigError(f"parallel must be at most n_trials ({self.n_trials}). "
                              f"Received: parallel={self.parallel}")
        if not self.space:
            raise ConfigError("space must name at least one value to search. Received: {}")
        cfg = self.base_config()  # the base itself must be a valid run config
        if self.objective.metric == "auc" and cfg.label_scheme != "binary":
            raise ConfigError("objective.metric 'auc' needs binary labels; use 'accuracy'. "
                              f"Received: label_scheme={cfg.label_scheme!r}")
        self._check_space()

    def base_config(self, **changes: Any) -> TrainConfig:
        data = {**self.base, **changes}
        if self.objective.dataset and self.objective.dataset not in data.get("external", []):
            data["external"] = [*data.get("external", []), self.objective.dataset]
        return TrainConfig.from_dict(data)

    def _check_space(self) -> None:
        fields = {f.name for f in dataclasses.fields(TrainConfig)} - set(NOT_SEARCHABLE)
        heads = {f"head.{f.name}" for f in dataclasses.fields(HeadConfig)}
        for p in self.space:
            if p.name not in fields | heads:
                raise ConfigError(f"space.{p.name}: unknown field; expected a run config field "
                                  f"({', '.join(sorted(fields))}) or one of "
                                  f"{sorted(heads)}. Received: {p.name!r}")
            for value in p.values_to_check():
                try:
                    TrainConfig.from_dict(apply_params(self.base_config().to_dict(),
                                                       {p.name: value}))
                except ConfigError as exc:
                    raise ConfigError(f"space.{p.name}: the value {value!r} is not a valid "
                                      f"run config: {exc}") from exc

    def trial_config(self, params: Mapping[str, Any]) -> TrainConfig:
        """The run config of a trial with these values."""
        return TrainConfig.from_dict(apply_params(self.base_config().to_dict(), params))

    @property
    def intermediate_key(self) -> str:
        """The per-epoch metric the pruner sees."""
        return "val_auc" if self.base_config().label_scheme == "binary" else "val_accuracy"

    def warnings(self) -> list[str]:
        """What the user must know before starting it."""
        out = []
        if self.objective.dataset:
            out.append(f"The objective is measured on {self.objective.dataset!r}: once the "
                       "search chooses on it, it is no longer external for the chosen model; "
                       "its figures there flatter it. Keep another external sample for the "
                       "final check.")
        return out

    @classmethod
    def from_dict(cls, data: Any) -> StudyConfig:
        """A study config from its JSON form; unknown keys are an error.

        Raises:
            ConfigError: naming the bad key or value.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"a study config must be a JSON object. Received: "
                              f"{type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown study config keys; expected some of {sorted(known)}. "
                              f"Received: {unknown}")
        if "base" not in data or not isinstance(data["base"], Mapping):
            raise ConfigError("base must be a run config object (a recipe and a dataset at "
                              f"least). Received: base={data.get('base')!r}")
        space = data.get("space")
        if not isinstance(space, Mapping):
            raise ConfigError('space must be an object: {"learning_rate": {"type": "log", '
                              f'"low": 1e-4, "high": 1e-2}}, ...}}. Received: space={space!r}')
        objective = data.get("objective") or {}
        if not isinstance(objective, Mapping) or set(objective) - {"metric", "dataset"}:
            raise ConfigError('objective must be {"metric": "auc", "dataset": null}. '
                              f"Received: objective={objective!r}")
        return cls(**{**data, "base": dict(data["base"]),
                      "space": tuple(Param.from_value(str(k), v) for k, v in space.items()),
                      "objective": Objective(**objective)})

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "base": dict(self.base),
                "space": {p.name: p.to_dict() for p in self.space},
                "objective": dataclasses.asdict(self.objective), "sampler": self.sampler,
                "pruner": self.pruner, "n_trials": self.n_trials, "parallel": self.parallel,
                "seed": self.seed, "startup_trials": self.startup_trials,
                "warmup_epochs": self.warmup_epochs}


# Search spaces from the reports the app grew from, for the Search page's "start from".
SPACE_PRESETS: dict[str, dict[str, Any]] = {
    # Seed 004 (COVID/pneumonia/normal, InceptionV3) chose its head by a search over these.
    "seed 004: head (layers, units, activation, optimizer, learning rate)": {
        "head.layers": {"type": "int", "low": 1, "high": 3},
        "head.units": {"type": "categorical", "choices": [32, 64, 128, 256, 512, 1024]},
        "head.activation": {"type": "categorical",
                            "choices": ["sigmoid", "tanh", "relu", "elu", "selu"]},
        "optimizer": {"type": "categorical", "choices": ["adam", "rmsprop", "adagrad",
                                                         "adadelta", "adamax", "nadam", "sgd"]},
        "learning_rate": {"type": "log", "low": 1e-4, "high": 1e-2},
    },
    "learning rate and batch size": {
        "learning_rate": {"type": "log", "low": 1e-4, "high": 1e-2},
        "batch_size": {"type": "categorical", "choices": [16, 32, 64]},
    },
    "regularisation: head dropout, label smoothing": {
        "head.dropout": {"type": "float", "low": 0.0, "high": 0.7},
        "label_smoothing": {"type": "float", "low": 0.0, "high": 0.2},
    },
}
