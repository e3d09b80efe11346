"""Hand-computed metric values, unknown-label masking and the empty-class rule."""
import math

import numpy as np
import pytest

from dart_core.metrics import average_precision, evaluate, mean_average_precision, precision_recall_f1_at_k


def test_average_precision_hand_computed_with_unknown_masked():
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    labels = np.array([[1, -1], [-1, -1], [1, -1], [0, -1]])
    ap = average_precision(scores, labels)
    # class 0: ranking of known rows: + - +  -> precisions 1/1, 2/3 -> AP 5/6 (the unknown row is dropped)
    assert ap[0] == pytest.approx(5 / 6)
    # class 1 has no positive
    assert math.isnan(ap[1])
    assert mean_average_precision(scores, labels) == pytest.approx(5 / 6)
    # legacy convention: the empty class counts as AP 0
    assert mean_average_precision(scores, labels, empty_as_zero=True) == pytest.approx(5 / 12)


def test_unknown_label_changes_ap_when_it_would_rank_first():
    scores = np.array([[0.9], [0.5], [0.1]])
    # with the top image unknown, the one positive is first among the known -> AP 1
    assert average_precision(scores, np.array([[0], [1], [-1]]))[0] == pytest.approx(1.0)
    # had it been a negative, AP = 1/2
    assert average_precision(scores, np.array([[-1], [1], [-1]]))[0] == pytest.approx(0.5)


def test_precision_recall_f1_at_k_hand_computed():
    scores = np.array([[0.9, 0.8, 0.1, 0.0], [0.1, 0.2, 0.3, 0.9]])
    labels = np.array([[1, -1, 1, 0], [0, 1, -1, -1]])
    # k=2: image 0 top {0,1} -> 1 TP; image 1 top {3,2} -> 0 TP. TP=1, P=1/4, R=1/3
    p, r, f1 = precision_recall_f1_at_k(scores, labels, 2)
    assert (p, r) == (pytest.approx(0.25), pytest.approx(1 / 3))
    assert f1 == pytest.approx(2 * 0.25 * (1 / 3) / (0.25 + 1 / 3))
    # no positive at all -> R = 0 and F1 = 0
    assert precision_recall_f1_at_k(scores, -np.ones_like(labels), 1) == (0.0, 0.0, 0.0)


def test_evaluate_zsl_restricts_to_unseen():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.4]])
    labels = np.array([[1, -1, -1], [-1, 1, 1]])
    unseen = np.array([False, True, True])
    res = evaluate(scores, labels, unseen, ks=(1,))
    assert res["zsl"]["mAP"] == pytest.approx(np.nanmean(average_precision(scores[:, 1:], labels[:, 1:])))
    assert res["gzsl"]["P@1"] == pytest.approx(1.0)
    assert res["zsl"]["P@1"] == pytest.approx(0.5)  # image 0's best unseen class (0.5) is a negative


def test_bad_labels_are_named():
    with pytest.raises(ValueError, match="row 1, class 0"):
        average_precision(np.zeros((2, 2)), np.array([[1, 0], [2, 0]]))
    with pytest.raises(ValueError, match="same"):
        average_precision(np.zeros((2, 2)), np.zeros((2, 3)))
