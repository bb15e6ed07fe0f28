"""UI-side helpers shared by the pages: cached resources, the dataset picker, background jobs.

Streamlit-only code lives here (cxr_core never imports streamlit). Cached functions take
arguments starting with ``_`` when those must not be hashed.
"""
from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import streamlit as st

from cxr_core import images as cxr_images
from cxr_core import indexing
from cxr_core.config import apply_secrets
from cxr_core.errors import CxrError
from cxr_core.indexing import Database, DatasetInfo, index_dataset


@st.cache_resource(show_spinner="Opening the database…")
def _open_db() -> Database:
    """One migrated database per app process; CXR_DATA_DIR datasets are indexed once.

    Settings: the environment, then the ``[cxr]`` table of ``.streamlit/secrets.toml``.
    """
    if st.secrets.load_if_toml_exists() and "cxr" in st.secrets:
        apply_secrets(st.secrets["cxr"])
    db, warnings = indexing.open_indexed_db()
    for warning in warnings:
        print(f"warning: {warning}")
    return db


def get_db() -> Database:
    """The app's database; a settings mistake (a mistyped CXR_* value, a bad secrets table,
    an unreachable DB URL) stops the page with its message instead of a traceback. Nothing is
    cached then, so fixing the setting and reloading is enough."""
    try:
        return _open_db()
    except CxrError as exc:
        st.error(f"The app cannot start with these settings: {exc}", icon=":material/error:")
        st.stop()


def list_datasets() -> list[DatasetInfo]:
    return indexing.list_datasets(get_db())


@st.cache_data(show_spinner=False, max_entries=8)
def load_records(dataset_id: int, indexed_at: object) -> list:
    """Records of a dataset; ``indexed_at`` keys the cache so a re-index refreshes it."""
    return indexing.indexed_records(get_db(), dataset_id)


@st.cache_data(show_spinner=False, max_entries=2000)
def thumbnail(path: str, mtime_ns: int | None, size: int = 160):
    """A cached thumbnail (decoded once per file version, not per rerun); None if unreadable."""
    try:
        return cxr_images.thumbnail(path, size)
    except CxrError:
        return None


def image_path(info: DatasetInfo, relpath: str) -> str:
    return str(Path(info.root) / relpath)


# -- Background jobs: long work off the script thread, polled by fragments ------------------

@dataclass
class Job:
    """State of one background job, updated by the worker thread, read by the page."""

    name: str
    done: int = 0
    total: int = 0
    result: object = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    future: Future | None = None

    @property
    def running(self) -> bool:
        return self.future is not None and not self.future.done()


@st.cache_resource
def _jobs() -> tuple[ThreadPoolExecutor, dict[str, Job], threading.Lock]:
    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="cxr-job"), {}, threading.Lock()


def start_job(key: str, fn: Callable[[Callable[[int, int], None]], object]) -> Job:
    """Run ``fn(progress)`` in a background thread once per key (no Streamlit calls inside)."""
    pool, jobs, lock = _jobs()
    with lock:
        job = jobs.get(key)
        if job is not None and job.running:
            return job
        job = Job(key)
        jobs[key] = job

    def progress(done: int, total: int) -> None:
        job.done, job.total = done, total

    def run() -> None:
        try:
            job.result = fn(progress)
        except CxrError as exc:
            job.error = str(exc)
        except Exception as exc:  # shown to the user; the app keeps running
            job.error = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()

    job.future = pool.submit(run)
    return job


def get_job(key: str) -> Job | None:
    return _jobs()[1].get(key)


def show_job(job: Job, label: str) -> None:
    """Progress bar of a running job, or its error."""
    if job.running:
        frac = job.done / job.total if job.total else 0.0
        st.progress(frac, text=f"{label}: {job.done:,}/{job.total:,}" if job.total else label)
    elif job.error:
        st.error(job.error)


# -- Dataset picker -------------------------------------------------------------------------

def add_dataset_ui(key: str = "add_ds") -> None:
    """Register a dataset by path (indexed in the background with a progress bar)."""
    with st.form(f"{key}_form", clear_on_submit=False, border=False):
        path = st.text_input("Dataset folder or PneumoniaMNIST .npz",
                             placeholder="/data/chest_xray or /data/pneumoniamnist.npz",
                             help="Kaggle layout train|val|test/NORMAL|PNEUMONIA, class folders "
                                  "(e.g. COVID19|NORMAL|PNEUMONIA), or a MedMNIST .npz")
        name = st.text_input("Name (optional)")
        submitted = st.form_submit_button("Index dataset", icon=":material/add:")
    if submitted and path.strip():
        db = get_db()
        start_job(f"index:{path.strip()}", lambda progress: index_dataset(
            db, path.strip(), name=name.strip() or None, progress=progress))
        st.session_state[f"{key}_job"] = f"index:{path.strip()}"
    job_key = st.session_state.get(f"{key}_job")
    if job_key:
        _index_job_status(job_key, key)
    index_report_ui(key)


@st.fragment(run_every=0.5)
def _index_job_status(job_key: str, key: str) -> None:
    job = get_job(job_key)
    if job is None:
        return
    show_job(job, "Scanning headers")
    if not job.running and job.result is not None:
        # Reported by index_report_ui after the app rerun: anything drawn here vanishes with it.
        st.session_state[f"{key}_report"] = job.result
        load_records.clear()
        st.session_state.pop(f"{key}_job", None)
        st.rerun(scope="app")


def index_report_ui(key: str = "add_ds") -> None:
    """The result of the indexing job started by ``add_dataset_ui(key)``, shown once."""
    rep = st.session_state.pop(f"{key}_report", None)
    if rep is None:
        return
    st.success(f"Indexed **{rep.dataset}**: {rep.summary['images']:,} images "
               f"({rep.scanned:,} read, {rep.unchanged:,} unchanged) in {rep.seconds:.1f} s")
    for w in rep.warnings:
        st.warning(w, icon=":material/warning:")
    for p in rep.problems[:10]:
        st.warning(p)
    if len(rep.problems) > 10:
        st.warning(f"… and {len(rep.problems) - 10} more problems")


def dataset_picker(key: str) -> DatasetInfo | None:
    """Sidebar select of indexed datasets, shared across pages; None when there are none."""
    datasets = list_datasets()
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
