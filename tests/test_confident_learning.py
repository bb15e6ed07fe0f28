"""Confident learning written in the project (cxr_core.stats.confident_learning), and its
dev-only cross-check against cleanlab (AGPL-3.0: requirements-dev.txt only, never imported by
the product)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from cxr_core.core.errors import ConfigError
from cxr_core.stats import confident_learning as cl

REPO = Path(__file__).resolve().parents[1]

# Six images, two classes: given labels and out-of-fold P(NORMAL), P(PNEUMONIA).
Y = np.array([0, 0, 0, 1, 1, 1])
P = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9],   # the third NORMAL looks like pneumonia
              [0.2, 0.8], [0.3, 0.7], [0.7, 0.3]])  # the third PNEUMONIA looks normal


def test_thresholds_are_each_class_mean_self_confidence():
    t = cl.class_thresholds(Y, P)
    assert t == pytest.approx([(0.9 + 0.8 + 0.1) / 3, (0.8 + 0.7 + 0.3) / 3])
    # A class nobody was given can never be reached.
    assert cl.class_thresholds(np.array([0, 0]), np.array([[0.6, 0.4], [0.7, 0.3]]))[1] == 2.0


def test_confident_joint_noise_matrix_and_ranked_issues_by_hand():
    # t = (0.6, 0.6): image 2 is confidently PNEUMONIA, image 5 confidently NORMAL.
    cj = cl.confident_joint(Y, P)
    assert cj.tolist() == [[2, 1], [1, 2]]
    joint = cl.calibrate_joint(cj, Y)
    assert joint.sum(axis=1).tolist() == [3, 3] and joint.sum() == 6
    noise = cl.noise_matrix(joint)
    assert noise.sum(axis=0) == pytest.approx([1.0, 1.0])  # P(given | true): columns sum to 1
    found = cl.find_label_issues(Y, P)
    assert found.flagged.tolist() == [False, False, True, False, False, True]
    assert found.ranked.tolist() == [2, 5]  # self-confidence 0.1 before 0.3
    assert found.rank_of().tolist() == [0, 0, 1, 0, 0, 2]
    assert found.suggested[[2, 5]].tolist() == [1, 0]
    assert found.self_confidence == pytest.approx(P[np.arange(6), Y])


def test_an_image_whose_given_class_is_the_most_probable_is_not_flagged():
    # Image 0 reaches PNEUMONIA's low threshold (0.35) but NORMAL is still its most probable
    # class; image 2 (given PNEUMONIA) reaches NORMAL's (0.725) and nothing else.
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.55, 0.45], [0.9, 0.1], [0.8, 0.2], [0.5, 0.5]])
    found = cl.find_label_issues(y, p)
    assert not found.flagged[0] and found.flagged[2]


@pytest.mark.parametrize("labels, probs, match", [
    ([0, 1], [[0.5, 0.5]], "one given label per row"),
    ([0, 2], [[0.5, 0.5], [0.5, 0.5]], "class indices"),
    ([0, 1], [[0.5, 0.6], [0.5, 0.5]], "summing to 1"),
    ([0, 1], [[1.5, -0.5], [0.5, 0.5]], "in \\[0, 1\\]"),
    ([], np.zeros((0, 2)), "summing to 1"),
])
def test_bad_input_names_what_was_received(labels, probs, match):
    with pytest.raises(ConfigError, match=match):
        cl.find_label_issues(np.array(labels, dtype=np.int64), np.array(probs, dtype=float))


def test_detection_scores_of_a_perfect_and_an_empty_flagging():
    noisy = np.array([True, False, False, True])
    conf = np.array([0.1, 0.9, 0.8, 0.2])
    out = cl.detection_scores(noisy, conf, noisy)
    assert (out["auroc"], out["precision"], out["recall"], out["precision_at_k"]) == \
        (1.0, 1.0, 1.0, 1.0)
    out = cl.detection_scores(noisy, conf, np.zeros(4, bool))
    assert out["precision"] == 0.0 and out["recall"] == 0.0 and out["n_flagged"] == 0
    with pytest.raises(ConfigError, match="both wrong and right"):
        cl.detection_scores(np.zeros(4, bool), conf, noisy)


def _noisy_problem(seed: int, k: int, n: int = 400, noise: float = 0.1):
    """Labels with ``noise`` of them flipped and probabilities of an imperfect model."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, k, n)
    logits = rng.normal(0, 1.0, (n, k))
    logits[np.arange(n), true] += rng.uniform(0.5, 3.0, n)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    given = true.copy()
    flip = rng.random(n) < noise
    given[flip] = (true[flip] + rng.integers(1, k, flip.sum())) % k
    return given, p


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_the_same_issues_joint_and_noise_matrix_as_cleanlab(k):
    """Dev-only cross-check (cleanlab is AGPL-3.0, in requirements-dev.txt only): on the same
    probabilities (30 problems per class count: sizes 50-1000, 2-30% noise) the flagged set, its
    ranking by self-confidence, the calibrated confident joint and the noise matrix are
    cleanlab's (``filter_by="confident_learning"``) exactly: no difference to explain."""
    cleanlab_filter = pytest.importorskip("cleanlab.filter")
    from cleanlab.count import compute_confident_joint, estimate_latent

    for seed in range(30):
        given, p = _noisy_problem(100 * k + seed, k, n=(50, 200, 1000)[seed % 3],
                                  noise=(0.02, 0.1, 0.3)[seed % 3])
        ours = cl.find_label_issues(given, p)
        theirs = cleanlab_filter.find_label_issues(given, p, filter_by="confident_learning")
        assert np.flatnonzero(ours.flagged).tolist() == np.flatnonzero(theirs).tolist(), seed
        ranked = cleanlab_filter.find_label_issues(given, p, filter_by="confident_learning",
                                                   return_indices_ranked_by="self_confidence")
        assert ours.ranked.tolist() == list(ranked), seed
        cj = compute_confident_joint(given, p, calibrate=True)
        assert ours.joint.tolist() == cj.tolist(), seed
        _, noise, _ = estimate_latent(cj, given, converge_latent_estimates=False)
        assert ours.noise == pytest.approx(noise, abs=1e-9), seed


def test_cleanlab_is_a_dev_requirement_only():
    """AGPL-3.0: never in the runtime requirements, never imported by the product."""
    assert "cleanlab" not in (REPO / "requirements.txt").read_text().lower()
    assert re.search(r"^cleanlab==\d", (REPO / "requirements-dev.txt").read_text(), re.M)
    for path in [*(REPO / "cxr_core").rglob("*.py"), *(REPO / "app_pages").rglob("*.py"),
                 REPO / "streamlit_app.py", *(REPO / "bench").rglob("*.py")]:
        assert not re.search(r"^\s*(import|from)\s+cleanlab", path.read_text(), re.M), path
