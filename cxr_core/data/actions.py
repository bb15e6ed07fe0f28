"""The data actions a principal may take: saving an augmentation preset (replacing someone
else's is for admins), checked and audited through :mod:`cxr_core.auth.gate`.
"""
from __future__ import annotations

from typing import Any

from cxr_core.auth.gate import audited, authorize, authorize_owned
from cxr_core.auth.policy import Principal
from cxr_core.data import indexing, presets
from cxr_core.storage import Database


def save_preset(db: Database, p: Principal, name: str, cfg: Any) -> None:

    exists, owner = presets.owner(db, name)
    if exists:  # replacing someone else's preset (or one saved before sign-in): admins only
        authorize_owned(db, p, owner=owner, own="save_preset", any_="overwrite_any_preset",
                         target=f"preset:{name}")
    else:
        authorize(db, p, "save_preset", f"preset:{name}")
    presets.save(db, name, cfg, created_by=p.identity,
                 and_then=audited(p, "save_preset", f"preset:{name}"))


def flag_external(db: Database, p: Principal, dataset_id: int, external: bool) -> None:
    """Flag a dataset as another site or period (external validation data), or unflag it: the
    roles that may index a dataset, audited in the same transaction."""
    target = f"dataset:{dataset_id}"
    authorize(db, p, "index_dataset", target)
    indexing.set_external(db, dataset_id, external,
                          and_then=audited(p, "index_dataset", target,
                                           {"external": bool(external)}))
