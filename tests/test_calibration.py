"""The calibration slice: carved from validation by patient and identical bytes, stratified,
seeded; and the config field that sizes it."""
from __future__ import annotations

import pytest
from test_split_strategies import kermany, labels_of, rec

from cxr_core.data.calibration import carve_calibration
from cxr_core.core.errors import ConfigError
from cxr_core.training.config import TrainConfig


def test_slice_is_grouped_by_patient_and_bytes_stratified_and_seeded():
    records = kermany()
    dup = rec(999, "IM-0900-0001.jpeg", "NORMAL", sha=records[0].sha256)  # bytes of IM-0115
    records = [*records, dup]
    labels = labels_of(records)
    out = carve_calibration(records, labels, fraction=0.3, seed=4)
    assert out.skipped is None and set(out.selection) | set(out.calibration) == {
        r.id for r in records} and not set(out.selection) & set(out.calibration)
    by_id = {r.id: r for r in records}
    patients = [{by_id[i].patient for i in part} for part in (out.selection, out.calibration)]
    shas = [{by_id[i].sha256 for i in part} for part in (out.selection, out.calibration)]
    assert not patients[0] & patients[1] and not shas[0] & shas[1]
    for cls in ("NORMAL", "PNEUMONIA"):  # about 30% of each class
        total = sum(r.label == cls for r in records)
        taken = sum(by_id[i].label == cls for i in out.calibration)
        assert 0.3 * total <= taken <= 0.3 * total + 3, cls
    assert carve_calibration(list(reversed(records)), list(reversed(labels)), fraction=0.3,
                             seed=4).calibration == out.calibration  # order-free
    assert carve_calibration(records, labels, fraction=0.3, seed=5).calibration != \
        out.calibration


def test_no_slice_when_fraction_is_zero_or_a_class_has_one_group():
    records = kermany()
    zero = carve_calibration(records, labels_of(records), fraction=0.0)
    assert zero.calibration == () and "is 0" in zero.skipped
    tiny = [r for r in records if r.label == "NORMAL"][:5] + [
        r for r in records if r.patient == "person2"]  # one pneumonia patient, 3 images
    out = carve_calibration(tiny, labels_of(tiny), fraction=0.3)
    assert out.calibration == () and "too small" in out.skipped and "'PNEUMONIA': 1" in \
        out.skipped


@pytest.mark.parametrize("changes, error", [
    ({}, None),
    ({"calibration_fraction": 0}, None),
    ({"calibration_fraction": 0.5}, None),
    ({"calibration_fraction": -0.1}, "calibration_fraction must be a number in \\[0, 0.7\\]"),
    ({"calibration_fraction": 0.9}, "Received: calibration_fraction=0.9"),
    ({"calibration_fraction": "0.3"}, "Received: calibration_fraction='0.3'"),
    ({"calibration_fraction": 0.3, "label_scheme": "three_class", "monitor": "val_loss"},
     "multi-class runs decide by argmax"),
])
def test_calibration_fraction_is_validated(changes, error):
    base = {"recipe": "cpu128", "dataset": "d", **changes}
    if error is None:
        cfg = TrainConfig.from_dict(base)
        assert cfg.calibration_fraction == changes.get("calibration_fraction", 0.3)
    else:
        with pytest.raises(ConfigError, match=error):
            TrainConfig.from_dict(base)


def test_multi_class_recipes_default_to_no_slice():
    cfg = TrainConfig.from_dict({"recipe": "small50_3class", "dataset": "d"})
    assert cfg.calibration_fraction == 0.0
