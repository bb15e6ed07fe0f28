"""Augmentation presets: the built-in report recipes plus user presets saved in the DB.

Training resolves a run's ``augment`` name here, so a preset saved on the augmentation page
is exactly what a run trains with (its JSON is also stored with the run).
"""
from __future__ import annotations

import re

from cxr_core.core.errors import ConfigError
from cxr_core.data.augment_config import PRESETS, AugmentConfig
from cxr_core.storage import AndThen, Database
from cxr_core.storage import presets as store

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,63}$")

# Which report each built-in preset reproduces (shown on the page).
PRESET_NOTES = {
    "none": "no augmentation",
    "zoom_shift": "zoom 0.1 + width/height shift 0.1",
    "rot30_zoom_shift_flip": "rotation 30 + zoom 0.2 + shifts 0.1 + horizontal flip",
    "hflip": "horizontal flip only",
    "rot10_shift_flip": "rotation 10 + shifts 0.1 + horizontal flip",
    "oneof_flip_rot20_bright": "OneOf(flip, rotate 20, brightness ×1.2–1.5), as imgaug's OneOf",
    "shift_robust": "rotation 10 + shifts 0.05 + crop 0.2 + brightness ×0.8–1.2 + contrast 0.3 "
                    "+ gamma 0.4 + blur σ1.5 + noise 6 (for other sites' films)",
}


def all_presets(db: Database) -> dict[str, AugmentConfig]:
    """Built-in presets first, then user presets (a user preset never shadows a built-in)."""
    with db.session() as s:
        user = store.list_presets(session=s)
    out = dict(PRESETS)
    out.update({k: AugmentConfig.from_dict(v) for k, v in user.items() if k not in PRESETS})
    return out


def resolve(name: str, db: Database | None = None) -> AugmentConfig:
    """The config of a built-in or saved preset.

    Raises:
        ConfigError: no preset has that name.
    """
    if name in PRESETS:
        return PRESETS[name]
    presets = all_presets(db) if db is not None else PRESETS
    if name not in presets:
        raise ConfigError(f"unknown augmentation preset. Expected one of {sorted(presets)}. "
                          f"Received: augment={name!r}")
    return presets[name]


def save(db: Database, name: str, cfg: AugmentConfig, *, created_by: str | None = None,
         and_then: AndThen | None = None) -> None:
    """Save a user preset under ``name`` (built-in names are read-only); ``and_then(session,
    None)`` runs in the same transaction (an audit row).

    Raises:
        ConfigError: invalid or built-in name.
    """
    if not _NAME.match(name or ""):
        raise ConfigError("preset name must be 1-64 letters, digits, spaces, '_', '-' or '.'. "
                          f"Received: name={name!r}")
    if name in PRESETS:
        raise ConfigError(f"{name!r} is a built-in preset; save under another name")
    db.write(lambda s: store.save_preset(session=s, name=name, config=cfg.to_dict(),
                                         created_by=created_by), and_then=and_then)


def owner(db: Database, name: str) -> tuple[bool, str | None]:
    """(whether a user preset ``name`` exists, who saved it last)."""
    with db.session() as s:
        return store.preset_owner(session=s, name=name)
