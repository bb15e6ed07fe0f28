"""Tests for cxr_core.stats.reports: metrics against sklearn, thresholds, CIs, McNemar, tables."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from cxr_core.stats import tables as eval_tables
from cxr_core.stats import metrics
from cxr_core.stats import paired
from cxr_core.stats import thresholds
from cxr_core.stats import reports as ev
from cxr_core.core.errors import ConfigError, CxrError

BINARY = ["NORMAL", "PNEUMONIA"]
THREE = ["NORMAL", "BACTERIA", "VIRUS"]


def _binary(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.clip(0.35 * y + 0.65 * rng.random(n), 0.0, 1.0)


def _three(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    p = rng.dirichlet([1.0, 1.0, 1.0], n)
    p[np.arange(n), y] += 0.6
    return y, p / p.sum(axis=1, keepdims=True)


# Hand-made binary case: 4 negatives, 4 positives.
Y_HAND = np.array([0, 0, 0, 0, 1, 1, 1, 1])
P_HAND = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.9, 0.2, 0.6])


# --- metrics against sklearn -----------------------------------------------------------------
def test_binary_hand_case_matches_sklearn():
    r = ev.evaluate(Y_HAND, P_HAND, BINARY, threshold=0.5, n_boot=0)
    pred = (P_HAND >= 0.5).astype(int)
    np.testing.assert_array_equal(r.confusion_matrix, skm.confusion_matrix(Y_HAND, pred))
    np.testing.assert_array_equal(r.confusion_matrix, [[3, 1], [1, 3]])
    # 11 of the 16 (positive, negative) pairs are ordered correctly
    assert r.auc == pytest.approx(skm.roc_auc_score(Y_HAND, P_HAND)) == pytest.approx(11 / 16)
    prec, rec, f1, sup = skm.precision_recall_fscore_support(Y_HAND, pred)
    assert [m.precision for m in r.per_class] == pytest.approx(prec)
    assert [m.recall for m in r.per_class] == pytest.approx(rec)
    assert [m.f1 for m in r.per_class] == pytest.approx(f1)
    assert [m.support for m in r.per_class] == list(sup)
    assert r.accuracy == pytest.approx(0.75)
    assert (r.sensitivity, r.specificity) == pytest.approx((0.75, 0.75))
    assert r.average_precision == pytest.approx(skm.average_precision_score(Y_HAND, P_HAND))
    assert r.reliability.brier == pytest.approx(skm.brier_score_loss(Y_HAND, P_HAND))
    assert r.reliability.brier == pytest.approx(np.mean((P_HAND - Y_HAND) ** 2))
    assert r.threshold == 0.5 and r.ci == {}


def test_threshold_changes_confusion_matrix_and_none_means_half():
    low = ev.evaluate(Y_HAND, P_HAND, BINARY, threshold=0.2, n_boot=0)
    np.testing.assert_array_equal(low.confusion_matrix, [[1, 3], [0, 4]])  # p >= t is positive
    default = ev.evaluate(Y_HAND, P_HAND, BINARY, n_boot=0)
    assert default.threshold == 0.5
    assert low.auc == default.auc  # threshold-free metrics do not move


def test_vector_and_two_column_probs_agree():
    a = ev.evaluate(Y_HAND, P_HAND, BINARY, n_boot=0).to_dict()
    b = ev.evaluate(Y_HAND, np.column_stack([1 - P_HAND, P_HAND]), BINARY, n_boot=0).to_dict()
    assert a == b


def test_binary_curves_match_sklearn():
    y, p = _binary()
    r = ev.evaluate(y, p, BINARY, n_boot=0)
    (roc,), (pr,) = r.roc, r.pr
    fpr, tpr, _ = skm.roc_curve(y, p)
    np.testing.assert_allclose(roc.x, fpr)
    np.testing.assert_allclose(roc.y, tpr)
    assert roc.label == "PNEUMONIA" and math.isnan(roc.thresholds[0])
    assert np.trapezoid(roc.y, roc.x) == pytest.approx(r.auc)
    assert pr.area == pytest.approx(skm.average_precision_score(y, p))
    assert pr.x[-1] == 0.0 and pr.y[-1] == 1.0 and math.isnan(pr.thresholds[-1])


def test_three_class_matches_sklearn_ovr():
    y, p = _three()
    r = ev.evaluate(y, p, THREE, n_boot=0)
    assert r.threshold is None and not r.is_binary
    assert r.auc == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"))
    per = skm.roc_auc_score(y, p, multi_class="ovr", average=None)
    assert [m.auc for m in r.per_class] == pytest.approx(per)
    pred = p.argmax(axis=1)
    np.testing.assert_array_equal(r.confusion_matrix, skm.confusion_matrix(y, pred))
    assert r.accuracy == pytest.approx(skm.accuracy_score(y, pred))
    assert r.reliability.brier == pytest.approx(skm.brier_score_loss(y, p, labels=[0, 1, 2]))
    assert r.reliability.brier == pytest.approx(np.mean(np.sum((p - np.eye(3)[y]) ** 2, axis=1)))
    assert r.reliability.kind == "top_label"
    assert [c.label for c in r.roc] == [*THREE, "macro"] and len(r.pr) == 3


def test_three_class_one_vs_rest_sensitivity_specificity():
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.eye(3)[[0, 1, 1, 1, 2, 0]] * 0.8 + 0.2 / 3
    r = ev.evaluate(y, p, THREE, n_boot=0)
    # class 0: TP 1, FN 1, FP 1 (a 2), TN 3; class 1: TP 2, FN 0, FP 1, TN 3; class 2: 1,1,0,4
    assert [m.sensitivity for m in r.per_class] == pytest.approx([0.5, 1.0, 0.5])
    assert [m.specificity for m in r.per_class] == pytest.approx([0.75, 0.75, 1.0])
    assert r.sensitivity == pytest.approx(np.mean([0.5, 1.0, 0.5]))


# --- calibration -----------------------------------------------------------------------------
def test_ece_hand_computed():
    y = np.array([0, 1, 0, 1, 1, 1])
    p = np.array([0.1, 0.1, 0.7, 0.7, 0.9, 0.9])
    cal = ev.evaluate(y, p, BINARY, n_boot=0, n_bins=2).reliability
    # bin [0, .5): conf .1, positives 1/2 -> gap .4 ; bin [.5, 1]: conf .8, positives 3/4 -> .05
    assert list(cal.count) == [2, 4]
    assert cal.confidence == pytest.approx([0.1, 0.8])
    assert cal.accuracy == pytest.approx([0.5, 0.75])
    assert cal.ece == pytest.approx(2 / 6 * 0.4 + 4 / 6 * 0.05)


def test_reliability_bins_match_calibration_curve():
    y, p = _binary(500, seed=3)
    cal = ev.evaluate(y, p, BINARY, n_boot=0, n_bins=10).reliability
    prob_true, prob_pred = calibration_curve(y, p, n_bins=10, strategy="uniform")
    filled = cal.count > 0
    np.testing.assert_allclose(cal.accuracy[filled], prob_true)
    np.testing.assert_allclose(cal.confidence[filled], prob_pred)
    assert cal.count.sum() == 500 and np.isnan(cal.confidence[~filled]).all()


def test_perfect_calibration_has_zero_ece():
    y = np.array([0, 1] * 5)
    p = np.full(10, 0.5)
    assert ev.evaluate(y, p, BINARY, n_boot=0).reliability.ece == pytest.approx(0.0)


# --- bootstrap -------------------------------------------------------------------------------
@pytest.mark.parametrize("make, labels", [(_binary, BINARY), (_three, THREE)])
def test_bootstrap_contains_estimate_and_is_seeded(make, labels):
    y, p = make()
    a = ev.evaluate(y, p, labels, n_boot=200, seed=7)
    b = ev.evaluate(y, p, labels, n_boot=200, seed=7)
    c = ev.evaluate(y, p, labels, n_boot=200, seed=8)
    assert set(a.ci) == {"auc", "sensitivity", "specificity"}
    for key, interval in a.ci.items():
        assert interval.low <= interval.estimate <= interval.high
        assert interval.estimate == pytest.approx(getattr(a, key))
        assert interval.n_boot == 200 and interval.level == 0.95
    assert a.ci == b.ci
    assert a.ci != c.ci


def test_rank_auc_equals_sklearn_with_ties():
    y, p = _binary(200, seed=5)
    p = np.round(p, 1)  # many ties
    assert metrics._rank_auc(y == 1, p) == pytest.approx(skm.roc_auc_score(y, p))


# --- operating points ------------------------------------------------------------------------
@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_sensitivity_threshold_is_highest_meeting_target(target, seed):
    y, p = _binary(257, seed=seed)
    t = thresholds.threshold_for_sensitivity(y, p, target)
    sens = lambda thr: np.mean(p[y == 1] >= thr)  # noqa: E731
    assert sens(t) >= target
    higher = np.unique(p[p > t])
    assert all(sens(h) < target for h in higher)  # no higher candidate still meets it
    op = thresholds.choose_threshold(y, p, method="sensitivity", target_sensitivity=target)
    assert op.threshold == t and op.target == target and op.sensitivity == pytest.approx(sens(t))


def test_sensitivity_threshold_exact_fraction():
    # 4 positives: target 0.75 needs 3 of them -> the 3rd highest positive score (0.6)
    assert thresholds.threshold_for_sensitivity(Y_HAND, P_HAND, 0.75) == 0.6
    assert thresholds.threshold_for_sensitivity(Y_HAND, P_HAND, 0.7) == 0.6
    assert thresholds.threshold_for_sensitivity(Y_HAND, P_HAND, 1.0) == 0.2


def test_youden_known_answer():
    y = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    op = thresholds.choose_threshold(y, p, method="youden")
    # t=0.4: sens 1, spec 3/4 -> J .75 ; t=0.6: sens .75, spec 1 -> J .75 ; tie -> higher 0.6
    assert op.threshold == 0.6 and op.target is None
    assert (op.sensitivity, op.specificity) == pytest.approx((0.75, 1.0))


def test_youden_separable():
    y = np.array([0, 0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.7, 0.9])
    op = thresholds.choose_threshold(y, p, method="youden")
    assert op.threshold == 0.7 and (op.sensitivity, op.specificity) == (1.0, 1.0)
    assert json.loads(json.dumps(op.to_dict()))["method"] == "youden"


def test_matched_thresholds_reach_same_sensitivity():
    y, p = _binary(seed=2)
    q = np.clip(p ** 2, 0, 1)
    out = thresholds.matched_thresholds(y, {"a": p, "b": q}, target=0.9)
    for scores, t in ((p, out["a"]), (q, out["b"])):
        assert np.mean(scores[y == 1] >= t) >= 0.9


# --- McNemar ---------------------------------------------------------------------------------
def _mcnemar_case(b: int, c: int, both_right: int = 5, both_wrong: int = 3):
    """Predictions giving exactly b (A right, B wrong) and c (A wrong, B right)."""
    n = b + c + both_right + both_wrong
    y = np.zeros(n, dtype=int)
    a = np.array([0] * b + [1] * c + [0] * both_right + [1] * both_wrong)
    bb = np.array([1] * b + [0] * c + [0] * both_right + [1] * both_wrong)
    return y, a, bb


def test_mcnemar_exact_small_table():
    res = paired.mcnemar(*_mcnemar_case(10, 2))
    assert (res.b, res.c, res.method, res.n) == (10, 2, "exact", 20)
    assert res.p_value == pytest.approx(0.0386, abs=1e-4)
    assert res.p_value == pytest.approx(158 / 4096)


def test_mcnemar_chi_square_large_table():
    res = paired.mcnemar(*_mcnemar_case(40, 20))
    expected = (abs(40 - 20) - 1) ** 2 / 60
    assert res.method == "chi2_cc"
    assert res.statistic == pytest.approx(expected)
    assert res.p_value == pytest.approx(stats.chi2.sf(expected, 1))
    assert json.loads(json.dumps(res.to_dict()))["b"] == 40


@pytest.mark.parametrize("b, c, method, p", [
    (0, 0, "exact", 1.0),
    (12, 12, "exact", 1.0),
    (24, 0, "exact", stats.binomtest(0, 24).pvalue),
    (25, 0, "chi2_cc", stats.chi2.sf(24**2 / 25, 1)),
    (30, 30, "chi2_cc", 1.0),
])
def test_mcnemar_boundaries(b, c, method, p):
    res = paired.mcnemar(*_mcnemar_case(b, c))
    assert res.method == method and res.p_value == pytest.approx(p)


# --- disagreements ---------------------------------------------------------------------------
def test_disagreements_between_runs_and_with_truth():
    y = np.array([0, 1, 1, 0, 1])
    preds = {"a": np.array([0, 1, 0, 1, 1]), "b": np.array([0, 0, 0, 1, 1])}
    np.testing.assert_array_equal(paired.disagreements(y, preds), [1])
    np.testing.assert_array_equal(paired.disagreements(y, preds, with_truth=True), [1, 2, 3])
    np.testing.assert_array_equal(paired.disagreements(y, {"a": preds["a"]}, with_truth=True),
                                  [2, 3])


# --- long-form tables ------------------------------------------------------------------------
def test_tables_are_long_form_and_json_safe():
    y, p = _binary()
    y3, p3 = _three()
    reports = {"bin": ev.evaluate(y, p, BINARY, n_boot=20),
               "tri": ev.evaluate(y3, p3, THREE, n_boot=20)}
    roc = eval_tables.roc_table(reports)
    assert {r["run"] for r in roc} == {"bin", "tri"}
    assert {r["class"] for r in roc if r["run"] == "tri"} == {*THREE, "macro"}
    assert set(roc[0]) == {"run", "class", "fpr", "tpr", "threshold", "area"}
    assert {"recall", "precision"} <= set(eval_tables.pr_table(reports)[0])
    cal = eval_tables.reliability_table(reports)
    assert sum(r["count"] for r in cal if r["run"] == "bin") == len(y)
    conf = eval_tables.confusion_table(reports)
    assert len(conf) == 4 + 9
    assert sum(r["count"] for r in conf if r["run"] == "tri") == len(y3)
    met = eval_tables.metrics_table(reports)
    auc = next(r for r in met if r["run"] == "bin" and r["class"] == "all" and r["metric"] == "auc")
    assert auc["low"] <= auc["value"] <= auc["high"]
    for rows in (roc, eval_tables.pr_table(reports), cal, conf, met):
        json.dumps(rows, allow_nan=False)


def test_to_dict_is_json_safe_with_cli_keys():
    d = ev.evaluate(Y_HAND, P_HAND, BINARY, n_boot=10).to_dict()
    text = json.dumps(d, allow_nan=False)
    assert {"n", "auc", "accuracy", "sensitivity", "specificity", "threshold",
            "confusion_matrix", "labels"} <= set(json.loads(text))
    assert d["confusion_matrix"] == [[3, 1], [1, 3]] and d["roc"][0]["thresholds"][0] is None


def test_report_arrays_are_read_only():
    r = ev.evaluate(Y_HAND, P_HAND, BINARY, n_boot=0)
    with pytest.raises(ValueError):
        r.confusion_matrix[0, 0] = 99


# --- bad inputs ------------------------------------------------------------------------------
@pytest.mark.parametrize("y, p, labels, kwargs, match", [
    ([0, 1, 1], [0.2, 0.8], BINARY, {}, r"N=3.*shape=\(2,\)"),
    ([0, 1], [[0.5, 0.6], [0.3, 0.7]], BINARY, {}, r"row 0 sums to 1\.1"),
    ([0, 1], [1.2, 0.3], BINARY, {}, r"\[0, 1\].*max=1\.2"),
    ([0, 1], [-0.2, 0.3], BINARY, {}, r"min=-0\.2"),
    ([0, 1], [np.nan, 0.3], BINARY, {}, r"finite"),
    ([1, 1, 1], [0.2, 0.8, 0.9], BINARY, {}, r"counts=\{'NORMAL': 0, 'PNEUMONIA': 3\}"),
    ([0, 2], [0.2, 0.8], BINARY, {}, r"0\.\.1.*max=2"),
    ([0, 1], [0.2, 0.8], ["only"], {}, r"2 distinct names.*\['only'\]"),
    ([0, 1], [0.2, 0.8], ["A", "A"], {}, r"distinct"),
    ([0.5, 1], [0.2, 0.8], BINARY, {}, r"integer.*float"),
    ([[0, 1]], [0.2, 0.8], BINARY, {}, r"1-D.*shape=\(1, 2\)"),
    ([0, 1], [0.2, 0.8], BINARY, {"threshold": 1.5}, r"threshold=1\.5"),
    ([0, 1, 2], np.eye(3), THREE, {"threshold": 1.5}, r"threshold must be in \[0, 1\]"),
    ([0, 1], [0.2, 0.8], BINARY, {"n_bins": 0}, r"n_bins=0"),
])
def test_evaluate_bad_inputs(y, p, labels, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ev.evaluate(y, p, labels, n_boot=0, **kwargs)


@pytest.mark.parametrize("call, match", [
    (lambda: thresholds.choose_threshold([0, 1, 2], np.eye(3)), r"argmax.*3 columns"),
    (lambda: thresholds.choose_threshold([0, 1], [0.2, 0.8], method="f1"), r"method='f1'"),
    (lambda: thresholds.choose_threshold([0, 1], [0.2, 0.8], target_sensitivity=0), r"Received: 0"),
    (lambda: thresholds.threshold_for_sensitivity([1, 1], [0.2, 0.8]), r"counts="),
    (lambda: thresholds.threshold_for_sensitivity([0, 1], [0.2, 0.8], 1.5), r"Received: 1\.5"),
    (lambda: paired.mcnemar([0, 1, 1], [0, 1], [0, 1, 1]), r"'A'.*N=3.*Received: 2"),
    (lambda: paired.disagreements([0, 1], {"a": [0, 1]}), r"1 run\(s\): \['a'\]"),
    (lambda: paired.disagreements([0, 1], {"a": [0, 1], "b": [1]}), r"'b'.*Received: 1"),
])
def test_other_bad_inputs(call, match):
    with pytest.raises(ConfigError, match=match) as info:
        call()
    assert isinstance(info.value, CxrError) and isinstance(info.value, ValueError)


def test_module_stays_pure():
    source = open(ev.__file__, encoding="utf-8").read()
    assert "import streamlit" not in source and "tensorflow" not in source
