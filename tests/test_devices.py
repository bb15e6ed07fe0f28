"""The TF-free GPU count behind the Train page's default recipe."""
from __future__ import annotations

import pytest

from cxr_core.core.devices import visible_gpu_count


@pytest.fixture()
def driver(tmp_path):
    folder = tmp_path / "gpus"
    for bus in ("0000:17:00.0", "0000:65:00.0", "0000:ca:00.0"):
        (folder / bus).mkdir(parents=True)
    return folder


def test_no_driver_means_no_gpu(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_gpu_count(tmp_path / "absent") == 0


@pytest.mark.parametrize("visible, expected", [
    (None, 3), ("", 0), ("-1", 0), ("1", 1), ("0,2", 2), ("0,1,2,3,4", 3), ("0,-1,2", 1),
])
def test_cuda_visible_devices_narrows_the_driver_list(driver, monkeypatch, visible, expected):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert visible_gpu_count(driver) == expected


def test_host_recipe_is_the_default_with_or_without_a_gpu(monkeypatch):
    """robust128 trains in about 15 min on two CPU cores: no GPU needed to propose it."""
    from cxr_core.core import devices
    from cxr_core.training import service as svc

    for count in (2, 0):
        monkeypatch.setattr(devices, "visible_gpu_count", lambda count=count: count)
        assert svc.host_recipe("splits") == "robust128" and svc.host_recipe("npz") == "mnist28"