"""UI-side helpers shared by the pages: cached resources, the dataset picker, background jobs.

Streamlit-only code lives here (cxr_core never imports streamlit). Cached functions take
arguments starting with ``_`` when those must not be hashed.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import streamlit as st

from app_pages._access import principal
from app_pages._db import get_db, startup_jobs
from cxr_core.core.data_roots import allowed_roots, describe
from cxr_core.core.errors import CxrError
from cxr_core.core.text_safe import md_escape, plotly_escape
from cxr_core.data import images as cxr_images
from cxr_core.data import indexing
from cxr_core.data.indexing import DatasetInfo
from cxr_core.jobs import queue
from cxr_core.jobs.queue import JobRecord


def list_datasets() -> list[DatasetInfo]:
    return indexing.list_datasets(get_db())


@st.cache_data(show_spinner=False, max_entries=2000)
def thumbnail(path: str, mtime_ns: int | None, size: int = 160):
    """A cached thumbnail (decoded once per file version, not per rerun); None if unreadable."""
    try:
        return cxr_images.thumbnail(path, size)
    except CxrError:
        return None


def image_path(info: DatasetInfo, relpath: str) -> str:
    return str(Path(info.root) / relpath)


def image_picker(info: DatasetInfo, key: str, *, label: str | None = None,
                 max_selections: int = 64, default_first: bool = False,
                 sample_button: bool = False) -> list:
    """Pick indexed images by searching their paths on the server (50 matches a search):
    the browser never gets the dataset's path list. Returns the picked ImageRecords.

    The widgets' keys carry the dataset id: a selection never follows the user to another
    dataset (whose root would not hold those paths)."""
    key = f"{key}_{info.id}"
    picked: dict[str, int] = st.session_state.setdefault(f"{key}_ids", {})
    c1, c2 = st.columns([2, 3], vertical_alignment="bottom")
    text = c1.text_input("Search file names", key=f"{key}_search",
                         placeholder="e.g. person1_ or IM-0115")
    found = dict((p, i) for i, p in indexing.search_images(get_db(), info.id, text,
                                                            label=label, limit=50))
    if default_first and f"{key}_sel" not in st.session_state and found:
        first = next(iter(found))
        picked[first] = found[first]
        st.session_state[f"{key}_sel"] = [first]
    if sample_button and st.button("Sample 8", key=f"{key}_sample", icon=":material/shuffle:"):
        drawn = indexing.random_images(get_db(), info.id, 8,
                                       seed=int(time.time_ns() % (1 << 31)))
        picked.update({p: i for i, p in drawn})
        st.session_state[f"{key}_sel"] = [p for _, p in drawn]
    options = list(dict.fromkeys([*st.session_state.get(f"{key}_sel", []), *found]))
    chosen = c2.multiselect("Images", options, max_selections=max_selections, key=f"{key}_sel",
                            placeholder="Choose from the matches",
                            help="The first 50 paths containing the search text; search "
                                 "again to add others (picked ones stay).")
    picked.update({p: found[p] for p in chosen if p in found})
    ids = [picked[p] for p in chosen if p in picked]
    return indexing.get_images(get_db(), ids)


# -- Jobs: heavy work a worker process does, polled by fragments ----------------------------

def job_ui(state_key: str, label: str) -> None:
    """Progress of the job whose id is in ``st.session_state[state_key]``, polled each second.

    When it ends the id moves to ``state_key + "_done"`` and the whole page reruns, so the
    caller draws the result with :func:`finished_job` (anything drawn inside a fragment
    vanishes with the rerun).
    """
    if st.session_state.get(state_key):
        _job_progress(state_key, label)


@st.fragment(run_every=1.0)
def _job_progress(state_key: str, label: str) -> None:
    job_id = st.session_state.get(state_key)
    if not job_id or (job := queue.get_job(get_db(), job_id)) is None:
        return
    if job.status == "queued":
        st.progress(0.0, text=f"{label}: job #{job.id} queued for a worker")
    elif job.status == "running":
        st.progress(job.done / job.total if job.total else 0.0,
                    text=f"{label} (worker): {job.done:,}/{job.total:,}" if job.total else label)
    else:
        st.session_state.pop(state_key, None)
        st.session_state[f"{state_key}_done"] = job.id
        st.rerun(scope="app")


def finished_job(state_key: str, *, keep: bool = False) -> JobRecord | None:
    """The job of ``state_key`` once it has ended (returned once, unless ``keep``), whether
    :func:`job_ui` saw it end or this page did not poll it; its error is shown here."""
    done_key = f"{state_key}_done"
    if (job_id := st.session_state.get(state_key)) and (job := queue.get_job(
            get_db(), job_id)) is not None and job.status in ("finished", "failed"):
        st.session_state.pop(state_key)
        st.session_state[done_key] = job_id
    job_id = (st.session_state.get if keep else st.session_state.pop)(done_key, None)
    job = queue.get_job(get_db(), job_id) if job_id else None
    if job is not None and job.status == "failed":
        st.error(md_escape(job.error), icon=":material/error:")
        return None
    return job


def kept_result(kind: str, params: dict, label: str, key: str) -> dict | None:
    """The result of the job ``kind`` with exactly ``params``, computed once by a worker and
    kept with the job (the params name everything it depends on: a label version, thresholds).

    None while it is queued or running (its progress is drawn, polled each second) or when it
    failed (its error is drawn, with a button to ask again).
    """
    job = queue.latest_job(get_db(), kind, params)
    if job is not None and job.status == "finished":
        return job.result
    if job is not None and job.status == "failed":
        st.error(f"{label} failed: {md_escape(job.error)}", icon=":material/error:")
        if st.button("Try again", key=f"{key}_retry", icon=":material/refresh:") and \
                _submit_view(kind, params, key, once=False):
            st.rerun()
        return None
    if (job is None or st.session_state.get(key) != job.id) and \
            not _submit_view(kind, params, key):
        return None
    job_ui(key, label)
    return None


def _submit_view(kind: str, params: dict, key: str, *, once: bool = True) -> bool:
    """Ask for a view job as the page's principal (:func:`cxr_core.jobs.actions.submit_job`:
    ``compute_view``, capped per user); its id goes to ``st.session_state[key]``. A refusal is
    shown here (False)."""
    from cxr_core.jobs import actions

    try:
        st.session_state[key] = actions.submit_job(get_db(), principal(), kind, params,
                                                   once=once)
    except CxrError as exc:  # PermissionDenied (no role), QuotaExceeded (the per-user cap)
        st.warning(md_escape(str(exc)), icon=":material/block:")
        return False
    return True


# -- Dataset picker -------------------------------------------------------------------------

def add_dataset_ui(key: str = "add_ds") -> None:
    """Register a dataset by path: a worker indexes it; the page shows the job's progress."""

    if not principal().can("index_dataset"):
        st.caption("Adding datasets needs the scientist role.")
        return
    with st.form(f"{key}_form", clear_on_submit=False, border=False):
        path = st.text_input("Dataset folder or PneumoniaMNIST .npz",
                             placeholder="/data/chest_xray or /data/pneumoniamnist.npz",
                             help="Kaggle layout train|val|test/NORMAL|PNEUMONIA, class folders "
                                  "(e.g. COVID19|NORMAL|PNEUMONIA), or a MedMNIST .npz")
        name = st.text_input("Name (optional)")
        st.caption(f"Allowed folders: {md_escape(describe(allowed_roots()))}")
        submitted = st.form_submit_button("Index dataset", icon=":material/add:")
    if submitted and path.strip():
        from cxr_core.jobs import actions

        try:
            st.session_state[f"{key}_job"] = actions.submit_job(
                get_db(), principal(), "index", {"path": path.strip(), "name": name.strip() or None})
        except CxrError as exc:
            st.error(md_escape(exc), icon=":material/block:")
    job_ui(f"{key}_job", "Scanning headers")
    index_report_ui(key)


def index_report_ui(key: str = "add_ds") -> None:
    """The report of the index job started by ``add_dataset_ui(key)``, shown once."""
    job = finished_job(f"{key}_job")
    if job is None or not job.result:
        return
    rep = job.result
    st.success(f"Indexed **{md_escape(rep['dataset'])}**: {rep['images']:,} images "
               f"({rep['scanned']:,} read, {rep['unchanged']:,} unchanged) in "
               f"{rep['seconds']:.1f} s")
    for w in rep.get("warnings", []):
        st.warning(md_escape(w), icon=":material/warning:")
    problems = rep.get("problems", [])
    for p in problems[:10]:
        st.warning(md_escape(p))
    if len(problems) > 10:
        st.warning(f"… and {len(problems) - 10} more problems")


def startup_index_ui() -> None:
    """The jobs queued at start (a ``CXR_DATA_DIR`` index job per folder, or the first-launch
    demo): progress while they run, and the error of one that failed."""
    for job_id in startup_jobs():
        job = queue.get_job(get_db(), job_id)
        if job is None:
            continue
        demo = job.kind == "demo"
        if job.status in ("queued", "running"):
            key = f"startup_job_{job_id}"
            st.session_state.setdefault(key, job_id)
            job_ui(key, "Setting up the demo dataset (300 real films) and evaluating the "
                   "shipped model on it" if demo else f"Indexing {job.params['path']}")
        elif job.status == "failed":
            where = "The demo dataset" if demo else f"CXR_DATA_DIR {md_escape(job.params['path'])}"
            st.warning(f"{where}: {md_escape(job.error)}", icon=":material/warning:")


def dataset_picker(key: str) -> DatasetInfo | None:
    """Sidebar select of indexed datasets, shared across pages; None when there are none."""
    datasets = list_datasets()
    startup_index_ui()
    if not datasets:
        st.info("No dataset yet. Add one below by path, set `CXR_DATA_DIR` before starting the "
                "app, or run `python -m cxr_core index PATH`.", icon=":material/info:")
        add_dataset_ui()
        return None
    names = [d.name for d in datasets]
    current = st.session_state.get("dataset_name")
    index = names.index(current) if current in names else 0
    name = st.sidebar.selectbox("Dataset", names, index=index, key=f"{key}_dataset")
    st.session_state["dataset_name"] = name
    with st.sidebar.expander("Add a dataset"):
        add_dataset_ui()
    return datasets[names.index(name)]


PLOT_TEXT_COLUMNS = ("run", "class", "subtype", "split", "mode", "group")


def plot_safe(frame: Any, columns: Sequence[str] = PLOT_TEXT_COLUMNS) -> Any:
    """A DataFrame whose name columns (runs, classes, folders) Plotly shows literally: its
    legends, axes and hover labels render some HTML (links, styles), so user text is escaped."""
    for col in columns:
        if col in frame:
            frame[col] = frame[col].map(plotly_escape)
    return frame
