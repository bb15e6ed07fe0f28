"""Datasets as user actions: open the app's database with its data folders indexed, index a
dataset (incrementally), list and open indexed datasets, read their records and labels.

The scan reads headers and hashes only; an unchanged file (same size and mtime) is never
re-read, so opening an indexed dataset again costs a directory walk and one query. Pages hold
the :class:`Database` this module opens as an opaque handle and pass it to every service.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cxr_core.core import data_roots, settings
from cxr_core.core import labels as core_labels
from cxr_core.core import records as core_records
from cxr_core.core.errors import DatasetError
from cxr_core.data import datasets as ds
from cxr_core.data import metadata
from cxr_core.storage import (
    AndThen,
    Database,  # also the pages' handle type: they import it from here
    aggregates,
    facts,
    relabels,
    review_queue,
)
from cxr_core.storage import datasets as store
from cxr_core.storage.datasets import DatasetInfo  # returned to the pages, typed from here
from cxr_core.storage.relabels import LabelSnapshot

Progress = Callable[[int, int], None]
BATCH = 500  # scanned rows per transaction: a killed or restarted index resumes from the last


@dataclass(frozen=True)
class IndexReport:
    """What an index run did and found (the CLI prints :meth:`to_json`)."""

    dataset: str
    dataset_id: int
    layout: str
    root: str
    summary: dict
    duplicate_groups: int
    cross_split_duplicates: int
    scanned: int  # files read in this run (new or changed)
    unchanged: int
    removed: int  # files newly gone from disk: their rows are flagged missing, never deleted
    seconds: float
    problems: tuple[str, ...] = field(default=())  # empty folders, unreadable files
    content_changed: tuple[str, ...] = ()  # files whose bytes changed in this run (rows kept)
    restored: int = 0  # files back on disk after being missing
    missing: int = 0  # rows whose file is gone (all of them, not only this run's)
    changed_since_relabel: tuple[str, ...] = ()  # relabelled images whose bytes changed since
    external: bool = False  # flagged as another site or period (external validation data)

    def to_json(self) -> dict:
        s = self.summary
        return {"dataset": self.dataset, "images": s["images"], "by_split": s["by_split"],
                "by_class": s["by_class"], "by_subtype": s["by_subtype"],
                "patients": s["patients"], "duplicate_groups": self.duplicate_groups,
                "cross_split_duplicates": self.cross_split_duplicates,
                "unreadable": s["unreadable"], "layout": self.layout, "root": self.root,
                "scanned": self.scanned, "unchanged": self.unchanged, "removed": self.removed,
                "missing": self.missing, "restored": self.restored,
                "content_changed": list(self.content_changed),
                "changed_since_relabel": list(self.changed_since_relabel),
                "seconds": round(self.seconds, 3), "problems": list(self.problems),
                "external": self.external}

    @property
    def warnings(self) -> list[str]:
        """What a person must see: missing files and relabelled images whose bytes changed."""
        out = []
        if self.changed_since_relabel:
            shown = ", ".join(self.changed_since_relabel[:5])
            more = f" and {len(self.changed_since_relabel) - 5} more" if len(
                self.changed_since_relabel) > 5 else ""
            out.append(f"{len(self.changed_since_relabel)} image(s) changed since they were "
                       f"relabelled (relabels kept; check them on Review): {shown}{more}")
        if self.missing:
            out.append(f"{self.missing} indexed file(s) are missing from disk (their rows and "
                       "relabels are kept; they are left out of training and evaluation)")
        return out


def default_name(path: str | Path) -> str:
    """A dataset name from its path: the folder (or file stem), skipping split/wrapper names."""
    p = Path(path).expanduser().resolve()
    if p.is_file():
        return p.stem
    while p.name.lower() in core_labels.SPLIT_NAMES and p.parent != p:
        p = p.parent
    return p.name or "dataset"


def index_dataset(db: Database, path: str | Path, *, name: str | None = None,
                  progress: Progress | None = None, external: bool | None = None) -> IndexReport:
    """Discover, scan (incrementally) and store a dataset's image index.

    Rows are committed every :data:`BATCH` files read, so an index killed midway (an app
    restart) keeps what it read: the next run reads only the files not stored yet. Files gone
    from disk are flagged at the end, once the whole folder was walked.

    Args:
        db: the database.
        path: dataset folder or .npz file.
        name: dataset name (default from the path). Re-indexing a name updates it.
        progress: called with (done, total) during the scan.
        external: flag the dataset as another site or period (external validation data), or
            not; None keeps what it was (new datasets: not external).

    Returns:
        The index report.

    Raises:
        DatasetError: missing path, no images in a known layout, or the name is taken by
            another path.
        PathNotAllowed: the path (its real path) is outside the configured data roots.
    """
    t0 = time.perf_counter()
    data_roots.check_path(path, what="dataset folder")
    check_patient_salt(db)
    layout = ds.discover(path)
    root = str(layout.root.resolve())
    with db.session() as s:
        if name is None:  # a folder indexed before keeps its name (its rows, its relabels)
            name = next((d.name for d in store.list_datasets(session=s) if d.root == root),
                        None) or default_name(path)
        existing = store.get_dataset(session=s, name_or_id=name)
        if existing and existing.root != root:
            raise DatasetError(f"dataset name {name!r} is already used for {existing.root}; "
                               f"choose another --name. Received path: {root}")
        dataset_id = store.upsert_dataset(session=s, name=name, root=root, layout=layout.kind,
                                          classes=layout.classes)
        if external is not None:
            store.set_external(session=s, dataset_id=dataset_id, external=external)
        known = store.known_files(session=s, dataset_id=dataset_id)
    cached = existing.summary if existing else None
    batches: list[store.ScanApplied] = []

    def commit(chunk: list) -> None:  # every BATCH rows: a killed index resumes from here
        def write(s) -> None:
            if not batches:
                store.mark_indexing(session=s, dataset_id=dataset_id)
            batches.append(store.apply_scan(session=s, dataset_id=dataset_id, rows=chunk,
                                            gone=()))
        db.write(write)

    rows, unchanged, gone = ds.scan_changed(layout, known, progress=progress, on_batch=commit,
                                            batch_size=BATCH)
    meta = _read_metadata(layout.root) if layout.kind != "npz" else None
    if meta is not None:  # after the scan: a re-read file gets its metadata back
        rest = rows[len(batches) * BATCH:]
        db.write(lambda s: batches.append(store.apply_scan(session=s, dataset_id=dataset_id,
                                                           rows=rest, gone=())))
        meta_updated, meta_unknown = db.write(lambda s: store.apply_metadata(
            session=s, dataset_id=dataset_id, rows=meta.rows))
        meta_problems = list(meta.problems) + [
            f"{metadata.FILENAME}: no image at {p}" for p in meta_unknown[:50]] + (
            [f"{metadata.FILENAME}: … and {len(meta_unknown) - 50} more unknown paths"]
            if len(meta_unknown) > 50 else [])
        cached = None  # patients may have changed: recount
    if not rows and not gone and cached and cached.get("problems_layout") == list(layout.problems):
        summary = cached  # nothing changed on disk: the stored counts are still exact
        applied = store.ScanApplied(0, 0, (), 0, 0)
    else:
        rest = [] if meta is not None else rows[len(batches) * BATCH:]  # stored above
        with db.session() as s:
            batches.append(store.apply_scan(session=s, dataset_id=dataset_id, rows=rest,
                                            gone=gone))
            records = store.list_images(session=s, dataset_id=dataset_id)
        applied = store.ScanApplied(
            sum(b.added for b in batches), sum(b.updated for b in batches),
            tuple(p for b in batches for p in b.content_changed),
            sum(b.restored for b in batches), sum(b.missing for b in batches))
        summary = _summary(records, layout.problems)
    if meta is not None:
        summary = {**summary, "metadata": {"file": metadata.FILENAME, "rows": len(meta.rows),
                                           "applied": meta_updated,
                                           "unknown_paths": len(meta_unknown)},
                   "problems": list(summary["problems"]) + meta_problems}
    seconds = time.perf_counter() - t0
    with db.session() as s:
        store.mark_indexed(session=s, dataset_id=dataset_id, seconds=seconds, summary=summary)
        n_missing = store.count_missing(session=s, dataset_id=dataset_id)
        changed = relabels.changed_since_relabel(session=s, dataset_id=dataset_id)
        is_external = store.get_dataset(session=s, name_or_id=dataset_id).external
    return IndexReport(name, dataset_id, layout.kind, root, summary, summary["duplicate_groups"],
                       summary["cross_split_duplicates"], len(rows), len(unchanged), len(gone),
                       seconds, tuple(summary["problems"]), applied.content_changed,
                       applied.restored, n_missing, tuple(c.relpath for c in changed),
                       is_external)


SALT_FACT = "patient_salt_fingerprint"


def check_patient_salt(db: Database) -> None:
    """Refuse to index with a patient salt other than the one this database's patient ids were
    hashed with (its fingerprint is recorded the first time).

    Raises:
        DatasetError: the salt drifted (a wiped home, a host without ``CXR_PATIENT_SALT``).
    """
    mine = settings.salt_fingerprint(settings.patient_salt())
    recorded = db.write(lambda s: facts.record_fact_once(session=s, key=SALT_FACT, value=mine))
    if recorded != mine:
        raise DatasetError(
            "the patient salt differs from the one this database's patients were hashed with "
            f"(fingerprint {recorded[:12]}…, this host {mine[:12]}…): the same patients would "
            "get new ids and patient-grouped splits would leak. Restore the salt (python -m "
            "cxr_core restore --from BACKUP, or CXR_PATIENT_SALT / $CXR_HOME/patient_salt as "
            "before) and index again")


def set_external(db: Database, dataset_id: int, external: bool, *,
                 and_then: AndThen | None = None) -> None:
    """Flag a dataset as another site or period (external validation data), or unflag it.
    ``and_then(session, None)`` runs in the same transaction (the audit row)."""
    db.write(lambda s: store.set_external(session=s, dataset_id=dataset_id, external=external),
             and_then=and_then)


def _read_metadata(root: Path) -> metadata.Metadata | None:
    """The dataset's metadata CSV, patients hashed with the install's salt (as DICOM IDs)."""
    from cxr_core.data.images import patient_key

    salt = settings.patient_salt()
    return metadata.read_metadata(root, lambda raw: patient_key(raw, salt, prefix="pid-"))


def _summary(records: list[core_records.ImageRecord], layout_problems: tuple[str, ...]) -> dict:
    dups = ds.find_duplicates(records)
    out = ds.summarize(records)
    out["duplicate_groups"] = len(dups)
    out["cross_split_duplicates"] = sum(g.cross_split for g in dups)
    out["problems_layout"] = list(layout_problems)
    out["problems"] = list(layout_problems) + [f"{r.relpath}: {r.error}" for r in records
                                               if r.error]
    return out


def find_dataset(db: Database, name_or_path: str | int) -> DatasetInfo | None:
    """The indexed dataset of that name, id or folder; None when there is none (nothing is
    indexed here)."""
    with db.session() as s:
        info = store.get_dataset(session=s, name_or_id=name_or_path)
        if info is None and isinstance(name_or_path, str):
            root = str(Path(name_or_path).expanduser().resolve())
            known = store.list_datasets(session=s)
            info = next((d for d in known if d.root == root), None)
            if info is None and known and Path(root).is_dir():
                # One split folder (…/train) belongs to the dataset of its parent: the same
                # rows, relabels and ids, never a second copy of them under a new name.
                found = _discovered_root(root)
                info = next((d for d in known if d.root == found), None)
    return info


def _discovered_root(path: str) -> str | None:
    try:
        return str(ds.discover(path).root.resolve())
    except DatasetError:
        return None


def open_dataset(db: Database, name_or_path: str | int) -> tuple[DatasetInfo, list[core_records.ImageRecord]]:
    """The dataset and its records from the index; a path not yet indexed is indexed first."""
    info = find_dataset(db, name_or_path)
    if info is None:
        if isinstance(name_or_path, str) and Path(name_or_path).expanduser().exists():
            rep = index_dataset(db, name_or_path, name=_free_name(db, name_or_path))
            return open_dataset(db, rep.dataset_id)
        raise DatasetError(f"no dataset named {name_or_path!r} and no folder or .npz file at "
                           f"that path; index it first (python -m cxr_core index PATH)")
    with db.session() as s:
        return info, store.list_images(session=s, dataset_id=info.id)


def _free_name(db: Database, path: str | Path) -> str:
    """The default name of a path, suffixed -2, -3, ... when another folder already has it
    (a path given to evaluate or train has no --name to choose one)."""
    base = default_name(path)
    with db.session() as s:
        taken = {d.name for d in store.list_datasets(session=s)}
    n = 2
    name = base
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name


def list_datasets(db: Database) -> list[DatasetInfo]:
    """Every indexed dataset."""
    with db.session() as s:
        return store.list_datasets(session=s)


def indexed_records(db: Database, dataset_id: int) -> list[core_records.ImageRecord]:
    """The dataset's records as indexed (original labels; see :func:`current_records`)."""
    with db.session() as s:
        return store.list_images(session=s, dataset_id=dataset_id)


def label_snapshot(db: Database, dataset_id: int) -> LabelSnapshot:
    """The hash and relabel count of the dataset's current labels, as of now."""
    with db.session() as s:
        return relabels.label_snapshot(session=s, dataset_id=dataset_id)


def with_labels(records: list[core_records.ImageRecord],
                labels: dict[int, tuple[str, str | None]]) -> list[core_records.ImageRecord]:
    """Records with their label/subtype replaced by ``labels`` (e.g. current labels after
    clinician relabels); images not in the map keep their original label."""
    return [r._replace(label=labels[r.id][0], subtype=labels[r.id][1]) if r.id in labels else r
            for r in records]


def current_records(db: Database, dataset_id: int, *,
                    as_of_relabel_id: int | None = None) -> list[core_records.ImageRecord]:
    """The dataset's records with labels as of now (or as of a relabel id)."""
    with db.session() as s:
        records = store.list_images(session=s, dataset_id=dataset_id)
        labels = relabels.current_labels(session=s, dataset_id=dataset_id,
                                        as_of_relabel_id=as_of_relabel_id)
    return with_labels(records, labels)


def relabel_position(db: Database, dataset_id: int) -> tuple[int, int | None]:
    """(relabel rows of the dataset, the newest one's id): two indexed aggregates; labels as
    of that id never change, so it keys any cache of derived labels."""
    with db.session() as s:
        return (relabels.count_relabels(session=s, dataset_id=dataset_id),
                relabels.newest_relabel_id(session=s, dataset_id=dataset_id,
                                           include_uploads=False))


def sample_images(db: Database, dataset_id: int, *, per_class: int = 8) -> dict[str, list]:
    """Up to ``per_class`` images of each class spread over it: class -> [(relpath, subtype,
    bytes)] (SQL; the Class balance sample grid)."""
    with db.session() as s:
        return aggregates.sample_images(session=s, dataset_id=dataset_id, per_class=per_class)


def search_images(db: Database, dataset_id: int, text: str = "", *, label: str | None = None,
                  limit: int = 50) -> list[tuple[int, str]]:
    """(id, relpath) of up to ``limit`` readable images whose path contains ``text``: the
    server-side image pickers of Predict and Augmentation."""
    with db.session() as s:
        return aggregates.search_images(session=s, dataset_id=dataset_id, text=text,
                                        label=label, limit=limit)


def get_images(db: Database, image_ids: list[int]) -> list[core_records.ImageRecord]:
    """Indexed images by id, in the order asked."""
    with db.session() as s:
        return store.get_images(session=s, image_ids=image_ids)


def random_images(db: Database, dataset_id: int, n: int, *, seed: int) -> list[tuple[int, str]]:
    """(id, relpath) of ``n`` readable images drawn by ``seed`` (the review page's seeded
    order: one indexed query at any size)."""
    with db.session() as s:
        rows = review_queue.queue_page(session=s, dataset_id=dataset_id, kind="random",
                                       seed=seed, limit=n)
        found = store.get_images(session=s, image_ids=[r.image_id for r in rows])
    return [(r.id, r.relpath) for r in found]
