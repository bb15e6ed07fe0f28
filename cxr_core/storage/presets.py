"""Named augmentation presets (AugmentConfig JSON). Built-in presets live in code."""
from __future__ import annotations

import json

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from db.models import AugPreset


def list_presets(*, session: Session) -> dict[str, dict]:
    """User presets: name → AugmentConfig dict, by name."""
    rows = session.scalars(select(AugPreset).order_by(AugPreset.name)).all()
    return {r.name: json.loads(r.config_json) for r in rows}


def save_preset(*, session: Session, name: str, config: dict,
                created_by: str | None = None) -> None:
    """Create or replace a user preset (``created_by``: who saved it last)."""
    row = session.scalar(select(AugPreset).where(AugPreset.name == name))
    if row is None:
        session.add(AugPreset(name=name, config_json=json.dumps(config), builtin=False,
                              created_by=created_by))
    else:
        row.config_json, row.created_by = json.dumps(config), created_by


def preset_owner(*, session: Session, name: str) -> tuple[bool, str | None]:
    row = session.scalar(select(AugPreset).where(AugPreset.name == name))
    return (row is not None, row.created_by if row is not None else None)


def delete_preset(*, session: Session, name: str) -> bool:
    return session.execute(delete(AugPreset).where(AugPreset.name == name)).rowcount > 0
