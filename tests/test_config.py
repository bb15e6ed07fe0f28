"""Settings: the environment wins; the app fills unset variables from secrets.toml [cxr]."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from cxr_core.core.settings import apply_secrets, get_settings
from cxr_core.core.errors import ConfigError

PAGE = str(Path(__file__).resolve().parents[1] / "app_pages" / "compare.py")


def test_secrets_fill_unset_variables_and_the_environment_wins(cxr_home, monkeypatch, tmp_path):
    for var in ("CXR_DB_URL", "CXR_DATA_DIR", "CXR_PATIENT_SALT"):
        # setenv first: a bare delenv of an unset variable records nothing, and a delenv after
        # apply_secrets would record (and restore) the value it wrote, leaking it to later tests
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    url = f"sqlite:///{tmp_path / 'from_secrets.db'}"
    done = apply_secrets({"db_url": url, "data_dir": ["/a", "/b"], "CXR_HOME": "/elsewhere",
                          "patient_salt": "s3cret"})
    assert done == {"CXR_DB_URL": url, "CXR_DATA_DIR": os.pathsep.join(["/a", "/b"]),
                    "CXR_PATIENT_SALT": "s3cret"}  # CXR_HOME was set: kept
    s = get_settings()
    assert s.db_url == url and s.home == cxr_home
    assert s.data_dirs == (Path("/a"), Path("/b"))


def test_unknown_secret_key_is_refused(cxr_home):
    with pytest.raises(ConfigError, match="unknown key"):
        apply_secrets({"db-url": "sqlite://"})


def test_app_reads_the_cxr_table_of_secrets(cxr_home, monkeypatch, tmp_path):
    monkeypatch.setenv("CXR_DB_URL", "")  # recorded: the value the page writes is undone
    monkeypatch.delenv("CXR_DB_URL")
    url = f"sqlite:///{tmp_path / 'app.db'}"
    st.cache_resource.clear()  # get_db() of an earlier test must not be reused
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.secrets["cxr"] = {"db_url": url}
    at.run()
    assert not at.exception, at.exception
    assert os.environ.get("CXR_DB_URL") == url and (tmp_path / "app.db").is_file()
    st.cache_resource.clear()


def test_artifacts_root_holds_runs_and_uploads_the_cache_stays_local(cxr_home, monkeypatch,
                                                                      tmp_path):
    assert get_settings().runs_dir == cxr_home / "runs"  # default: under CXR_HOME
    shared = tmp_path / "nfs" / "cxr"
    monkeypatch.setenv("CXR_ARTIFACTS", str(shared))
    s = get_settings()
    assert s.runs_dir == shared / "runs" and s.uploads_dir == shared / "uploads"
    assert s.cache_dir == cxr_home / "cache"  # decoded pixels are per host


@pytest.mark.parametrize("value, mode", [("", "auto"), ("auto", "auto"), ("OFF", "off")])
def test_worker_mode(cxr_home, monkeypatch, value, mode):
    monkeypatch.setenv("CXR_WORKER", value)
    assert get_settings().worker == mode


def test_a_mistyped_worker_mode_is_refused(cxr_home, monkeypatch):
    monkeypatch.setenv("CXR_WORKER", "of")
    with pytest.raises(ConfigError, match="CXR_WORKER must be one of"):
        get_settings()


def test_the_app_names_a_settings_mistake_instead_of_a_traceback(cxr_home, monkeypatch):
    monkeypatch.setenv("CXR_WORKER", "of")
    st.cache_resource.clear()
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception
    assert any("cannot start with these settings" in e.value  # the setting's name escaped
               and "CXR_WORKER" in e.value.replace("\\", "") for e in at.error)
    monkeypatch.setenv("CXR_WORKER", "auto")  # fixed: a reload works, nothing was cached
    at.run()
    assert not at.exception and not at.error
    st.cache_resource.clear()
