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


def save_preset(*, session: Session, name: str, config: dict) -> None:
    """Create or replace a user preset."""
    row = session.scalar(select(AugPreset).where(AugPreset.name == name))
    if row is None:
        session.add(AugPreset(name=name, config_json=json.dumps(config), builtin=False))
    else:
        row.config_json = json.dumps(config)


def delete_preset(*, session: Session, name: str) -> bool:
    return session.execute(delete(AugPreset).where(AugPreset.name == name)).rowcount > 0
