"""Class priors: a model balanced in training decides with the priors of the data it is applied
to (issue 30 item 2). Synthetic prior shift with known class-conditional densities, so the
Bayes posterior under any prior is exact."""
from __future__ import annotations

import numpy as np
import pytest

from cxr_core.core.errors import ConfigError
from cxr_core.stats import priors

MEANS = np.array([[0.0, 0.0], [1.2, 0.0], [0.0, 1.2]])  # three overlapping classes


def _likelihoods(x: np.ndarray) -> np.ndarray:
    d = ((x[:, None, :] - MEANS[None]) ** 2).sum(-1)
    return np.exp(-0.5 * d)


def _posterior(x: np.ndarray, prior: np.ndarray) -> np.ndarray:
    w = _likelihoods(x) * prior[None]
    return w / w.sum(1, keepdims=True)


def _site(prior, n, seed):
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=prior)
    return MEANS[y] + rng.normal(size=(n, 2)), y


def test_a_balanced_model_moved_to_the_sites_prior_is_the_sites_bayes_posterior():
    balanced, site = np.full(3, 1 / 3), np.array([0.6, 0.3, 0.1])
    x, y = _site(site, 20_000, 0)
    learned = _posterior(x, balanced)  # what a class-weighted network learns
    moved = priors.adjust(learned, balanced, site)
    np.testing.assert_allclose(moved, _posterior(x, site), atol=1e-12)
    acc_raw = (learned.argmax(1) == y).mean()
    acc_moved = (moved.argmax(1) == y).mean()
    assert acc_moved > acc_raw + 0.05  # the argmax no longer follows the training priors
    np.testing.assert_allclose(moved.sum(1), 1.0)


def test_oversampling_2_1_2_is_undone_by_its_own_ratio():
    ratio, site = (2.0, 1.0, 2.0), np.array([0.27, 0.47, 0.26])  # Kermany-like train frequencies
    train = priors.effective_prior([1341, 2530, 1345], "oversample", ratio)
    np.testing.assert_allclose(train, [0.4, 0.2, 0.4])
    x, y = _site(site, 20_000, 1)
    learned = _posterior(x, train)
    moved = priors.adjust(learned, train, site)
    assert (moved.argmax(1) == y).mean() > (learned.argmax(1) == y).mean() + 0.03
    # The viral class the 2:1:2 ratio inflated is called less often, as the site has it.
    assert (moved.argmax(1) == 2).mean() < (learned.argmax(1) == 2).mean()


@pytest.mark.parametrize("balancing, ratio, expected", [
    ("none", None, [0.25, 0.75]),
    ("class_weights", None, [0.5, 0.5]),
    ("undersample", None, [0.5, 0.5]),
    ("oversample", None, [0.5, 0.5]),
    ("oversample", (1.0, 3.0), [0.25, 0.75]),
])
def test_the_effective_training_prior(balancing, ratio, expected):
    np.testing.assert_allclose(priors.effective_prior([100, 300], balancing, ratio), expected)


@pytest.mark.parametrize("call, match", [
    (lambda: priors.effective_prior([10, 0], "none"), "positive numbers"),
    (lambda: priors.effective_prior([10, 20], "smote"), "balancing must be one of"),
    (lambda: priors.effective_prior([10, 20], "oversample", (1, 2, 3)), "one number per class"),
    (lambda: priors.adjust(np.ones((2, 3)) / 3, [0.5, 0.5], [0.5, 0.5]), "3 columns|2 columns"),
    (lambda: priors.adjust(np.ones((2, 2)) / 2, [0.5, 0.5], [1.0, 0.0]), "positive numbers"),
    (lambda: priors.bayes_threshold([1, 1, 1], [1, 1, 1]), "two classes"),
    (lambda: priors.estimate_prior([], 2), "needs labelled images"),
    (lambda: priors.estimate_prior([0, 2], 2), "labels must be 0..1"),
    (lambda: priors.em_prior(np.ones((0, 2)), [0.5, 0.5]), "N > 0"),
])
def test_bad_priors_are_refused_naming_the_value(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


def test_for_two_classes_the_correction_is_a_threshold():
    train, site = [0.5, 0.5], [0.65, 0.35]  # bacterial : viral among Kermany pneumonia
    t = priors.bayes_threshold(train, site)
    assert t == pytest.approx(0.65)
    p = np.linspace(0.0, 1.0, 101)
    moved = priors.adjust(np.column_stack([1 - p, p]), train, site)
    np.testing.assert_array_equal(moved[:, 1] >= 0.5, p >= t - 1e-12)
    assert priors.bayes_threshold(site, site) == pytest.approx(0.5)


def test_a_site_prior_from_its_labels_and_from_its_unlabelled_outputs():
    balanced, site = np.full(3, 1 / 3), np.array([0.55, 0.35, 0.10])
    x, y = _site(site, 30_000, 2)
    np.testing.assert_allclose(priors.estimate_prior(y, 3), site, atol=0.01)
    assert priors.estimate_prior([0, 0, 0], 2, smoothing=1.0).tolist() == [0.8, 0.2]
    em = priors.em_prior(_posterior(x, balanced), balanced)
    np.testing.assert_allclose(em, site, atol=0.02)
