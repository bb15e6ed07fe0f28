"""The review actions a principal may take: relabel (by image, upload or path), undo (own, or
anyone's as admin), send a prediction to review; recorded under the principal's identity, never a
typed name, and audited in the relabel's own transaction (:mod:`cxr_core.auth.gate`).
"""
from __future__ import annotations

from typing import Any

from cxr_core.auth.gate import audited, authorize, authorize_owned
from cxr_core.auth.policy import Principal
from cxr_core.core.errors import ConfigError
from cxr_core.predict import uploads
from cxr_core.review import queues as review
from cxr_core.review import reading
from cxr_core.review import relabel_import
from cxr_core.review.relabel_import import relabel_by_path
from cxr_core.storage import Database
from cxr_core.storage import audit as store


def relabel(db: Database, p: Principal, *, choice: Any, image_id: int | None = None,
            upload_sha256: str | None = None, note: str = "", run_ref: str | None = None,
            score: float | None = None) -> int:

    target = f"image:{image_id}" if image_id is not None else f"upload:{upload_sha256}"
    authorize(db, p, "relabel", target)
    return review.submit_relabel(
        db, image_id=image_id, upload_sha256=upload_sha256, choice=choice, reviewer=p.identity,
        note=note, run_ref=run_ref, score=score,
        and_then=audited(p, "relabel", lambda rid: f"relabel:{rid}",
                     {"on": target, "label": choice.label, "subtype": choice.subtype}))


def relabel_path(db: Database, p: Principal, *, dataset: str, relpath: str, label: str,
                 subtype: str | None = None, note: str = "") -> Any:
    """The CLI's ``relabel add``: one image named by its path, relabelled as ``p`` (never a
    typed name), the audit row in the relabel's transaction. Returns the RelabelRecord."""

    target = f"{dataset}:{relpath}"
    authorize(db, p, "relabel", target)
    return relabel_by_path(db, dataset=dataset, relpath=relpath, label=label, subtype=subtype,
                           reviewer=p.identity, note=note,
                           and_then=audited(p, "relabel", lambda rid: f"relabel:{rid}",
                                        {"on": target, "label": label, "subtype": subtype}))


def undo_relabel(db: Database, p: Principal, *, relabel_id: int, note: str = "undo") -> int:

    with db.session() as s:
        owner = store.relabel_owner(session=s, relabel_id=relabel_id)
    if owner is None:
        raise ConfigError(f"no relabel with id {relabel_id}. Received: relabel_id={relabel_id}")
    action = authorize_owned(db, p, owner=owner, own="undo_own_relabel",
                              any_="undo_any_relabel", target=f"relabel:{relabel_id}")
    return review.submit_undo(
        db, relabel_id=relabel_id, reviewer=p.identity, note=note,
        and_then=audited(p, action, f"relabel:{relabel_id}",
                     lambda rid: {"undo_row": rid, "owner": owner}))


def send_to_review(db: Database, p: Principal, prediction: Any, *, model_ref: str) -> int:

    authorize(db, p, "send_to_review", model_ref)
    return uploads.send_to_review(
        db, prediction, model_ref=model_ref, sent_by=p.identity,
        and_then=audited(p, "send_to_review", lambda item: f"review_item:{item}",
                     {"model": model_ref}))


def import_relabels(db: Database, p: Principal, *, dataset: str | int, source: Any,
                    source_name: str | None = None) -> list:
    """Relabel many images from a CSV as ``p`` (all rows or none): every row is recorded under
    the principal's identity, never a name from the file (a ``reviewer`` cell is kept only in
    the note), and the audit row commits in the same transaction as the rows."""
    target = f"{dataset}:{source_name or source}"
    authorize(db, p, "import_relabels", target)
    return relabel_import.import_relabels(
        db, dataset=dataset, source=source, reviewer=p.identity, source_name=source_name,
        and_then=audited(p, "import_relabels", target, lambda rows: {"rows": len(rows)}))


def adjudicate(db: Database, p: Principal, *, image_id: int, choice: Any, note: str = "") -> int:
    """Settle an image whose readers conflict, as ``p`` (the adjudicator role, or an admin): its
    own append-only row (undone like a relabel), audited in its transaction. Returns its id."""
    target = f"image:{image_id}"
    authorize(db, p, "adjudicate", target)
    return reading.submit_adjudication(
        db, image_id=image_id, choice=choice, adjudicator=p.identity, note=note,
        and_then=audited(p, "adjudicate", lambda rid: f"relabel:{rid}",
                         {"on": target, "label": choice.label, "subtype": choice.subtype}))


def set_reading(db: Database, p: Principal, *, dataset_id: int, blind: bool,
                reads_per_image: int, note: str = "") -> int:
    """Set how a dataset is read on Review (blind or open, reads per image), as ``p``: an
    append-only setting row, audited in its transaction. Returns its id."""
    target = f"dataset:{dataset_id}"
    authorize(db, p, "review_settings", target)
    return reading.save_setting(
        db, dataset_id=dataset_id, blind=blind, reads_per_image=reads_per_image,
        changed_by=p.identity, note=note,
        and_then=audited(p, "review_settings", target,
                         {"blind": blind, "reads_per_image": reads_per_image}))
