"""Tests for the patient-clustered bootstrap of cxr_core.stats.reports.evaluate(groups=...)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cxr_core.stats import reports as ev
from cxr_core.stats import intervals
from cxr_core.core.errors import ConfigError

BINARY = ["NORMAL", "PNEUMONIA"]
THREE = ["NORMAL", "BACTERIA", "VIRUS"]
KEYS = ("auc", "sensitivity", "specificity")


from test_evaluation import _binary, _three  # the same synthetic scores


def _repeated_patients(n_patients: int = 120, per: int = 5, seed: int = 0):
    """Each patient: one label, ``per`` near-identical images; images shuffled."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, n_patients)
    score = np.clip(0.3 * label + 0.7 * rng.random(n_patients), 0.0, 1.0)
    pid = np.repeat(np.arange(n_patients), per)
    p = np.clip(score[pid] + 0.005 * rng.standard_normal(pid.size), 0.0, 1.0)
    perm = rng.permutation(pid.size)
    return label[pid][perm], p[perm], [f"patient-{i}" for i in pid[perm]]


def _widths(report: ev.EvalReport) -> dict[str, float]:
    return {k: report.ci[k].high - report.ci[k].low for k in KEYS}


# --- (a) singleton clusters reduce to the image bootstrap ------------------------------------
@pytest.mark.parametrize("make, labels", [(_binary, BINARY), (_three, THREE)])
@pytest.mark.parametrize("ids", ["strings", "ints", "none", "blank"])
def test_singleton_clusters_give_the_image_bootstrap_exactly(make, labels, ids):
    y, p = make()
    groups = {"strings": [f"p{i}" for i in range(y.size)], "ints": list(range(y.size)),
              "none": [None] * y.size, "blank": [""] * y.size}[ids]
    image = ev.evaluate(y, p, labels, n_boot=200, seed=3)
    patient = ev.evaluate(y, p, labels, n_boot=200, seed=3, groups=groups)
    assert patient.ci == image.ci  # same draws, bit for bit
    assert (image.ci_unit, image.n_clusters) == ("image", None)
    assert (patient.ci_unit, patient.n_clusters) == ("patient", y.size)


def test_without_groups_nothing_changes_for_existing_callers():
    y, p = _binary()
    a = ev.evaluate(y, p, BINARY, n_boot=100, seed=1)
    b = ev.evaluate(y, p, BINARY, n_boot=100, seed=1, groups=None)
    assert a.ci == b.ci and b.ci_unit == "image" and b.n_clusters is None


# --- (b) repeated images per patient widen the intervals -------------------------------------
def test_clustered_interval_is_wider_when_patients_repeat():
    y, p, groups = _repeated_patients()
    image = ev.evaluate(y, p, BINARY, threshold=0.5, n_boot=500, seed=0)
    patient = ev.evaluate(y, p, BINARY, threshold=0.5, n_boot=500, seed=0, groups=groups)
    wi, wp = _widths(image), _widths(patient)
    # 5 copies per patient: the honest interval is about sqrt(5) ~ 2.2 times wider
    assert wp["auc"] / wi["auc"] > 1.5
    assert wp["sensitivity"] / wi["sensitivity"] > 1.5
    assert wp["specificity"] / wi["specificity"] > 1.5
    # the point estimates do not depend on the resampling unit
    assert all(patient.ci[k].estimate == image.ci[k].estimate for k in KEYS)
    for k in KEYS:
        assert patient.ci[k].low <= patient.ci[k].estimate <= patient.ci[k].high
    assert patient.n_clusters == 120 and patient.ci_unit == "patient"


def test_clustered_bootstrap_is_seeded():
    y, p, groups = _repeated_patients(n_patients=60)
    a = ev.evaluate(y, p, BINARY, n_boot=100, seed=5, groups=groups)
    b = ev.evaluate(y, p, BINARY, n_boot=100, seed=5, groups=groups)
    c = ev.evaluate(y, p, BINARY, n_boot=100, seed=6, groups=groups)
    assert a.ci == b.ci and a.ci != c.ci


# --- (c) unit and cluster count are reported and serialised ----------------------------------
def test_ci_unit_and_n_clusters_reported_and_in_to_dict():
    y, p, groups = _repeated_patients(n_patients=40)
    groups[0] = None  # one image without an id: a cluster of its own
    r = ev.evaluate(y, p, BINARY, n_boot=50, groups=groups)
    assert r.n_clusters == 41
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["ci_unit"] == "patient" and d["n_clusters"] == 41
    assert set(d["ci"]) == set(KEYS)  # the ci mapping itself still holds intervals only
    plain = ev.evaluate(y, p, BINARY, n_boot=50).to_dict()
    assert plain["ci_unit"] == "image" and plain["n_clusters"] is None


def test_no_bootstrap_has_no_unit_but_counts_clusters():
    y, p, groups = _repeated_patients(n_patients=30)
    r = ev.evaluate(y, p, BINARY, n_boot=0, groups=groups)
    assert r.ci == {} and r.ci_unit is None and r.n_clusters == 30
    assert ev.evaluate(y, p, BINARY, n_boot=0).ci_unit is None


# --- (d) missing ids --------------------------------------------------------------------------
def test_missing_ids_are_each_their_own_cluster():
    ids = intervals.cluster_ids(["a", None, "b", "a", "", None, "b", float("nan"), "  "], 9)
    assert ids.tolist() == [0, 1, 2, 0, 3, 4, 2, 5, 6]
    arr = intervals.cluster_ids(np.array(["x", None, "x"], dtype=object), 3)
    assert arr.tolist() == [0, 1, 0]


def test_mixed_none_groups_run_and_stay_finite():
    y, p, groups = _repeated_patients(n_patients=50)
    groups = [g if i % 3 else None for i, g in enumerate(groups)]
    r = ev.evaluate(y, p, BINARY, n_boot=100, groups=groups)
    assert all(np.isfinite([r.ci[k].low, r.ci[k].high]).all() for k in KEYS)


def test_patients_with_mixed_labels_and_multiclass():
    y, p = _three(n=240)
    groups = [f"p{i // 4}" for i in range(y.size)]  # 60 patients, mostly mixed labels
    r = ev.evaluate(y, p, THREE, n_boot=100, groups=groups)
    assert r.n_clusters == 60 and r.ci_unit == "patient"
    for k in KEYS:
        assert np.isfinite(r.ci[k].low) and r.ci[k].low <= r.ci[k].estimate <= r.ci[k].high


# --- whole clusters are drawn ----------------------------------------------------------------
def test_replicates_hold_whole_clusters():
    y = np.array([0, 1, 1, 0, 1, 0, 1, 1])
    clusters = intervals.cluster_ids(["a", "b", "b", "c", "b", "d", "e", "e"], y.size)
    strata, expand = intervals.cluster_strata(y, clusters, 2)
    assert [s.tolist() for s in strata] == [[0, 2, 3], [1, 4]]  # class 0 only, class 1 only
    idx = expand(np.array([1, 1, 2, 4]))  # b twice, c, e
    assert sorted(idx.tolist()) == sorted([1, 2, 4, 1, 2, 4, 3, 6, 7])
    mixed = intervals.cluster_ids(["a", "a", "b", "c", "c", "d", "e", "e"], y.size)
    strata, _ = intervals.cluster_strata(y, mixed, 2)
    assert [s.tolist() for s in strata] == [[3], [1, 4], [0, 2]]  # mixed clusters last


# --- (e) bad groups -------------------------------------------------------------------------
@pytest.mark.parametrize("groups, match", [
    (["a", "b"], r"one patient id .*N=3.*Received: 2 entries"),
    (["a", "b", "c", "d"], r"N=3.*Received: 4 entries"),
    ("abc", r"sequence.*Received: str"),
    (5, r"sequence.*Received: int"),
    ([["a"], "b", "c"], r"hashable.*list at index 0"),
])
def test_bad_groups_raise(groups, match):
    with pytest.raises(ConfigError, match=match):
        ev.evaluate([0, 1, 1], [0.2, 0.8, 0.6], BINARY, n_boot=10, groups=groups)


def test_bad_groups_raise_even_without_bootstrap():
    with pytest.raises(ConfigError, match="N=3"):
        ev.evaluate([0, 1, 1], [0.2, 0.8, 0.6], BINARY, n_boot=0, groups=["a"])
