"""The model's own answer as a classifier, and each neuron's correlation with it: against
scikit-learn's AUC, a brute-force threshold search and scipy's Spearman correlation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from neuronprobe.behavior import behavior_correlation, behavior_summary, roc_auc


def test_roc_auc_equals_scikit_learn_with_ties() -> None:
    rng = np.random.default_rng(0)
    labels = rng.random(200) < 0.4
    scores = np.round(rng.normal(labels * 0.7, 1.0), 1)  # rounded: many ties
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert roc_auc(-scores, labels) == pytest.approx(1 - roc_auc_score(labels, scores), abs=1e-12)
    assert np.isnan(roc_auc(scores, np.ones(200, dtype=bool)))


def test_behavior_summary_is_the_best_training_threshold_scored_held_out() -> None:
    rng = np.random.default_rng(1)
    labels = rng.random(300) < 0.5
    logodds = rng.normal(np.where(labels, -1.0, -3.0), 1.5)
    train = rng.random(300) < 0.8
    got = behavior_summary(logodds, labels, train)
    assert got["train_contexts"] == int(train.sum()) and got["test_contexts"] == int((~train).sum())
    assert got["auc"] == pytest.approx(roc_auc_score(labels[~train], logodds[~train]), abs=1e-12)
    # Brute force over every cut between training scores: none is better on the training set.
    cuts = np.sort(logodds[train])
    best = max(((logodds[train] > t) == labels[train]).mean() for t in cuts)
    assert got["train_accuracy"] == pytest.approx(100 * best)
    threshold = got["threshold"]
    assert ((logodds[train] > threshold) == labels[train]).mean() == pytest.approx(best)
    held_out = ((logodds[~train] > threshold) == labels[~train]).mean()
    assert got["accuracy"] == pytest.approx(100 * held_out)


def test_behavior_correlation_is_spearman_over_the_held_out_contexts() -> None:
    rng = np.random.default_rng(2)
    logodds = rng.normal(size=60)
    activations = rng.normal(size=(2, 60, 5)).astype(np.float32)
    activations[1, :, 0] = logodds * 2 + 1  # a neuron that follows the answer exactly
    activations[1, :, 1] = 3.0  # a constant neuron
    activations[0, :, 2] = np.round(activations[0, :, 2])  # ties
    mask = rng.random(60) < 0.4
    got = behavior_correlation(activations, logodds, mask)
    assert got.shape == (2, 5)
    for layer in range(2):
        for neuron in range(5):
            if (layer, neuron) == (1, 1):
                continue
            expected = stats.spearmanr(activations[layer, mask, neuron], logodds[mask])[0]
            assert got[layer, neuron] == pytest.approx(expected, abs=1e-12), (layer, neuron)
    assert got[1, 0] == pytest.approx(1.0) and np.isnan(got[1, 1])
    assert np.isnan(behavior_correlation(activations, np.zeros(60), mask)).all()
