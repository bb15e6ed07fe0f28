"""Facts about the deployment that must not drift (``install_facts``): recorded once, then
compared (e.g. the patient salt's fingerprint)."""
from __future__ import annotations

from sqlalchemy.orm import Session

from db.models import InstallFact


def get_fact(*, session: Session, key: str) -> str | None:
    row = session.get(InstallFact, key)
    return None if row is None else row.value


def record_fact_once(*, session: Session, key: str, value: str) -> str:
    """The fact's value: ``value`` if none was recorded (it is now), else the recorded one."""
    row = session.get(InstallFact, key)
    if row is None:
        session.add(InstallFact(key=key, value=value))
        session.flush()
        return value
    return row.value
