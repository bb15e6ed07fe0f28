"""The model actions a principal may take: making a named ensemble (it fixes an operating point:
``set_operating_point``'s roles), checked and audited through :mod:`cxr_core.auth.gate`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cxr_core.auth.gate import authorize, record
from cxr_core.auth.policy import Principal
from cxr_core.core import model_refs
from cxr_core.models import ensembles
from cxr_core.storage import Database


def create_ensemble(db: Database, p: Principal, name: str, members: Sequence[str], *,
                    threshold: float | None = None, note: str = "") -> Any:
    """A named ensemble fixes an operating point: ``set_operating_point``'s roles; made by
    ``p`` (never a typed name); an app principal's members must be model references (the CLI
    may name .keras files). The card is a write-once file, not a row, so its ``ok`` audit
    row follows the write. Returns the EnsembleInfo."""

    target = f"ensemble:{name}"
    authorize(db, p, "set_operating_point", target)
    if p.source != "cli":  # app principals name members by reference, never a file path
        try:
            model_refs.check_params({"members": list(members)}, identity=p.identity)
        except Exception as exc:
            record(db, p, "set_operating_point", target, outcome="denied",
                   detail={"why": str(exc)})
            raise
    info = ensembles.create_ensemble(db, name, members, threshold=threshold,
                                     changed_by=p.identity, note=note)
    record(db, p, "set_operating_point", target,
           detail={"members": list(info.members), "threshold": info.threshold,
                   "source": info.threshold_source, "note": note})
    return info
