"""Three-class figures (issue 30): fixed rules, and cross-fitted where a site chooses the
pneumonia threshold or the prior on the sample it is scored on."""
from __future__ import annotations

import numpy as np
import pytest

from cxr_core.core.errors import ConfigError
from cxr_core.stats import three_class as tc


def _sample(n=300, seed=0, prior=(0.35, 0.40, 0.25)):
    """Probabilities of a balanced three-class model on a site with ``prior``; 2 films per
    patient."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=prior)
    logits = rng.normal(size=(n, 3)) * 0.8
    logits[np.arange(n), y] += 1.6
    p = np.exp(logits)
    return y, p / p.sum(1, keepdims=True), [f"p{i // 2}" for i in range(n)]


def test_a_fixed_rule_reports_accuracy_macro_f1_recall_and_confusion():
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[.8, .1, .1], [.3, .4, .3], [.1, .8, .1], [.2, .3, .5], [.1, .1, .8],
                      [.1, .2, .7]])
    flat = tc.report(y, probs, "flat", n_boot=0)
    assert flat.accuracy == pytest.approx(4 / 6) and flat.confusion == [[1, 1, 0], [0, 1, 1],
                                                                          [0, 0, 2]]
    assert flat.recall == (0.5, 0.5, 1.0)
    hier = tc.report(y, probs, "hierarchical", threshold=0.75, n_boot=0)
    # film 2 (P(pneumonia) 0.7 < 0.75) is called normal; film 4 (0.8) stays pneumonia
    assert hier.confusion[1] == [0, 1, 1] and hier.confusion[0] == [2, 0, 0]
    assert hier.to_dict()["recall"]["NORMAL"] == 1.0


def test_the_subtype_prior_moves_only_the_subtype_in_the_hierarchical_rule():
    probs = np.array([[0.2, 0.4, 0.4]])
    as_is = tc.decide(probs, "hierarchical", threshold=0.5)
    viral = tc.decide(probs, "hierarchical", threshold=0.5, train_prior=[0.5, 0.5],
                      target_prior=[0.3, 0.7])
    assert as_is.tolist() == [1] and viral.tolist() == [2]
    assert tc.decide(probs, "hierarchical", threshold=0.9).tolist() == [0]


def test_cross_fitting_never_scores_a_film_with_a_rule_chosen_on_it():
    y, p, groups = _sample()
    fixed = tc.report(y, p, "flat", groups=groups, n_boot=100)
    fitted = tc.cross_fitted(y, p, "flat", groups=groups, choose_prior=True,
                             train_prior=[1 / 3] * 3, repeats=5, n_boot=100)
    assert fitted.chosen == "prior" and fitted.n == y.size
    assert fitted.accuracy_ci[0] <= fitted.accuracy <= fitted.accuracy_ci[1]
    assert fitted.macro_f1_ci[0] <= fitted.macro_f1 <= fitted.macro_f1_ci[1]
    assert abs(fitted.accuracy - fixed.accuracy) < 0.1
    hier = tc.cross_fitted(y, p, "hierarchical", groups=groups, repeats=5, n_boot=0)
    assert hier.chosen == "pneumonia threshold"
    assert hier.recall[0] < 1.0 and sum(map(sum, hier.confusion)) == y.size
    # a rule chosen on the very films it scores would be at least as good on its target
    pneumonia_recall = 1 - np.array(hier.confusion)[1:, 0].sum() / (y > 0).sum()
    assert pneumonia_recall > 0.85


@pytest.mark.parametrize("call, match", [
    (lambda: tc.report([0, 1], np.ones((2, 2)) / 2, "flat"), r"\(N, 3\)"),
    (lambda: tc.report([0, 3], np.ones((2, 3)) / 3, "flat"), "labels must be 0, 1, 2"),
    (lambda: tc.report([0, 1], np.ones((2, 3)) / 3, "vote"), "rule must be one of"),
    (lambda: tc.report([0, 1], np.ones((2, 3)) / 3, "hierarchical"), "pneumonia threshold"),
    (lambda: tc.cross_fitted([0, 1, 2], np.ones((3, 3)) / 3, "flat", choose_prior=True),
     "train_prior"),
    (lambda: tc.cross_fitted([0, 1, 2], np.ones((3, 3)) / 3, "flat"), "at least 2 images"),
])
def test_bad_three_class_inputs_are_refused(call, match):
    with pytest.raises(ConfigError, match=match):
        call()
