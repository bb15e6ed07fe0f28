"""Per-run limits and the per-user run quota (issue 15 item 4): cxr_core.core.limits, pure."""
from __future__ import annotations

import os

import pytest

from cxr_core.core.settings import apply_secrets
from cxr_core.core.errors import ConfigError, QuotaExceeded
from cxr_core.core.limits import ENV, Limits, check_active, check_run, check_view_jobs
from cxr_core.training.config import TrainConfig


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"dataset": "tiny", "model": "custom5_224", **kw})


@pytest.fixture()
def clean_env(monkeypatch):
    for var in (*ENV.values(), "CXR_DATA_ROOTS"):
        # setenv first: a bare delenv of an unset variable records nothing, so a value the
        # test's code sets (apply_secrets writes os.environ) would leak into later tests.
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)


def test_defaults(clean_env):
    lim = Limits.from_env()
    assert lim == Limits(max_active_runs=3, max_image_size=512, max_epochs=200,
                         max_train_images=0, max_view_jobs=4)
    check_run(cfg(), lim)  # the default recipe passes


def test_from_env_reads_every_limit(clean_env, monkeypatch):
    monkeypatch.setenv("CXR_MAX_ACTIVE_RUNS_PER_USER", "1")
    monkeypatch.setenv("CXR_MAX_IMAGE_SIZE", " 256 ")
    monkeypatch.setenv("CXR_MAX_EPOCHS", "20")
    monkeypatch.setenv("CXR_MAX_TRAIN_IMAGES", "1000")
    monkeypatch.setenv("CXR_MAX_QUEUED_VIEW_JOBS", "7")
    assert Limits.from_env() == Limits(1, 256, 20, 1000, 7)


@pytest.mark.parametrize("raw", ["three", "-1", "2.5"])
def test_a_bad_value_is_a_config_error_naming_the_variable(clean_env, monkeypatch, raw):
    monkeypatch.setenv("CXR_MAX_EPOCHS", raw)
    with pytest.raises(ConfigError, match="CXR_MAX_EPOCHS"):
        Limits.from_env()


def test_secrets_fill_the_limit_variables(clean_env, monkeypatch):
    done = apply_secrets({"max_epochs": 50, "CXR_MAX_IMAGE_SIZE": 128,
                          "data_roots": ["/data/a", "/data/b"], "max_queued_view_jobs": 2})
    assert done == {"CXR_MAX_EPOCHS": "50", "CXR_MAX_IMAGE_SIZE": "128",
                    "CXR_DATA_ROOTS": os.pathsep.join(["/data/a", "/data/b"]),
                    "CXR_MAX_QUEUED_VIEW_JOBS": "2"}
    assert Limits.from_env().max_epochs == 50 and Limits.from_env().max_view_jobs == 2


@pytest.mark.parametrize(("limits", "config", "match"), [
    (Limits(max_image_size=224), dict(image_size=256, model="custom5_224"),
     r"image size is limited to 224\. Received: image_size=256\. .*CXR_MAX_IMAGE_SIZE"),
    (Limits(max_epochs=10), dict(epochs=11),
     r"epochs per run is limited to 10\. Received: epochs=11\. Choose fewer .*CXR_MAX_EPOCHS"),
    (Limits(max_train_images=100), dict(max_images=101),
     r"images per run is limited to 100\. Received: max_images=101\. Set max images to 100 "
     r"or fewer .*CXR_MAX_TRAIN_IMAGES"),
    (Limits(max_train_images=100), dict(),
     r"Received: max_images=None \(the whole dataset\)"),
])
def test_each_run_limit_refuses_with_what_and_how(limits, config, match):
    with pytest.raises(QuotaExceeded, match=match):
        check_run(cfg(**config), limits)


def test_at_the_limit_passes_and_zero_turns_a_limit_off():
    check_run(cfg(epochs=10, max_images=100), Limits(max_epochs=10, max_train_images=100))
    check_run(cfg(epochs=5000), Limits(max_epochs=0))
    check_run(cfg(), Limits(max_train_images=100), n_images=80)  # the whole, small dataset
    check_run(cfg(max_images=500), Limits(max_train_images=100), n_images=80)  # takes 80
    with pytest.raises(QuotaExceeded, match="Received: max_images=500"):
        check_run(cfg(max_images=500), Limits(max_train_images=100), n_images=300)
    with pytest.raises(QuotaExceeded, match="the whole dataset, 500 images"):
        check_run(cfg(), Limits(max_train_images=100), n_images=500)


def test_active_run_quota():
    lim = Limits(max_active_runs=2)
    check_active(1, lim, "ana@example.org")
    with pytest.raises(QuotaExceeded) as exc:
        check_active(2, lim, "ana@example.org")
    msg = str(exc.value)
    assert "ana@example.org already has 2 queued or running run(s)" in msg
    assert "the limit is 2 per user" in msg and "CXR_MAX_ACTIVE_RUNS_PER_USER" in msg
    check_active(99, Limits(max_active_runs=0), "ana@example.org")


def test_limits_validate_their_fields():
    with pytest.raises(ConfigError, match="Received: max_epochs=-3"):
        Limits(max_epochs=-3)


def test_view_job_cap():
    lim = Limits(max_view_jobs=2)
    check_view_jobs(1, lim, "cfo@example.org")
    with pytest.raises(QuotaExceeded) as exc:
        check_view_jobs(2, lim, "cfo@example.org")
    msg = str(exc.value)
    assert "cfo@example.org already has 2 queued or running view job(s)" in msg
    assert "the limit is 2 per user" in msg and "CXR_MAX_QUEUED_VIEW_JOBS" in msg
    check_view_jobs(99, Limits(max_view_jobs=0), "cfo@example.org")
