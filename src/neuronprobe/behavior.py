"""The model's own answer: how well the model, read at its output, tells the two classes apart.

The activations stage records, from the same forward pass, the model's log-probability of the
positive followers' first tokens at the last token (``"'t"`` after ``" can"``): its own
prediction of the class. ``logodds_positive = log P - log(1 - P)`` is a score for the positive
class, as a neuron's activation is; this module measures it the way the statistics measure a
neuron, on the same train/test split:

- :func:`behavior_summary`: the held-out ROC AUC of ``logodds_positive``, and the held-out
  accuracy of the one threshold that is best on the training contexts;
- :func:`behavior_correlation`: each neuron's Spearman correlation with ``logodds_positive``
  over the held-out contexts (``behavior_corr`` in ``neurons.parquet``): does the neuron rise
  and fall with the model's own prediction?
- :func:`roc_auc`: the AUC itself (Mann-Whitney, ties counted half).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """The ROC AUC of ``scores`` for the positive labels: the probability that a random
    positive scores above a random negative, ties counted half (scikit-learn's
    ``roc_auc_score``). NaN when one class is absent.

    Parameters
    ----------
    scores:
        float [contexts].
    labels:
        bool [contexts], True = positive class.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if not positives or not negatives:
        return float("nan")
    ranks = stats.rankdata(scores)  # average ranks: ties count half
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def behavior_summary(
    logodds: np.ndarray, labels: np.ndarray, train_mask: np.ndarray
) -> dict[str, Any]:
    """The model's own answer as a classifier of the two classes, on the statistics' split.

    Parameters
    ----------
    logodds:
        float64 [contexts], ``logodds_positive`` of each context.
    labels:
        bool [contexts], True = positive class.
    train_mask:
        bool [contexts], the training contexts of the split (the rest are held out).

    Returns
    -------
    dict
        ``auc`` (held-out ROC AUC), ``accuracy`` (held-out, percent) with ``threshold`` (the
        log-odds above which a context is called positive: of the midpoints between
        consecutive training scores, the one with the best training accuracy; ties go to the
        one nearest 0, the model's own even-odds point), ``train_accuracy`` (percent), and the
        numbers of ``train_contexts`` and ``test_contexts``.
    """
    logodds = np.asarray(logodds, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    train = np.asarray(train_mask, dtype=bool)
    test = ~train
    threshold, train_accuracy = _best_threshold(logodds[train], labels[train])
    held_out = (logodds[test] > threshold) == labels[test]
    return {
        "auc": roc_auc(logodds[test], labels[test]),
        "accuracy": float(100 * held_out.mean()) if test.any() else float("nan"),
        "threshold": threshold,
        "train_accuracy": train_accuracy,
        "train_contexts": int(train.sum()),
        "test_contexts": int(test.sum()),
    }


def _best_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The threshold (``score > t`` -> positive) with the best accuracy on these contexts."""
    values = np.unique(scores)
    candidates = np.concatenate(
        [[values[0] - 1.0], (values[:-1] + values[1:]) / 2, [values[-1] + 1.0]]
    )
    # [candidates, contexts] is small: a few hundred training contexts.
    correct = ((scores[None, :] > candidates[:, None]) == labels[None, :]).sum(axis=1)
    best = np.flatnonzero(correct == correct.max())
    chosen = best[np.argmin(np.abs(candidates[best]))]
    return float(candidates[chosen]), float(100 * correct[chosen] / len(scores))


def behavior_correlation(activations: Any, logodds: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Each neuron's Spearman correlation with the model's own log-odds over ``mask``'s contexts.

    Parameters
    ----------
    activations:
        float32 [layers, contexts, neurons] (a memory map is read one layer at a time).
    logodds:
        float64 [contexts], ``logodds_positive``.
    mask:
        bool [contexts], the contexts to use (the held-out ones).

    Returns
    -------
    np.ndarray
        float64 [layers, neurons]; NaN for a neuron that is constant on those contexts.
    """
    mask = np.asarray(mask, dtype=bool)
    target = stats.rankdata(np.asarray(logodds, dtype=np.float64)[mask])
    target -= target.mean()
    out = np.full((activations.shape[0], activations.shape[2]), np.nan)
    if not np.linalg.norm(target) > 0:
        return out  # the model's answer is constant there: no correlation is defined
    target /= np.linalg.norm(target)
    for layer in range(activations.shape[0]):
        values = np.asarray(activations[layer], dtype=np.float64)[mask]  # [contexts, neurons]
        ranks = stats.rankdata(values, axis=0)
        ranks -= ranks.mean(axis=0)
        norms = np.linalg.norm(ranks, axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[layer] = np.where(norms > 0, target @ ranks / norms, np.nan)
    return out
