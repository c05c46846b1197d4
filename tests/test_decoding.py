"""decoding: cross-validated sparse and whole-layer probes against scikit-learn, leakage, a
planted signal, and the one-line refusals."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

from neuronprobe import decode_layers
from neuronprobe.decoding import DECODING_COLUMNS, DecodingInputError, logistic_l2
from neuronprobe.statistics import neuron_statistic


def _sklearn_fit(x: np.ndarray, y: np.ndarray, C: float) -> LogisticRegression:
    """scikit-learn's own fit, run to a tight optimum (its defaults stop at tol=1e-4)."""
    return LogisticRegression(C=C, tol=1e-12, max_iter=100_000).fit(x, y)


@pytest.mark.parametrize(
    ("contexts", "features", "C"),
    [(300, 1, 1.0), (300, 5, 0.3), (300, 100, 1.0), (120, 400, 1.0), (120, 400, 20.0)],
)
def test_coefficients_equal_scikit_learn(contexts: int, features: int, C: float) -> None:
    """Small probes (the (k+1) x (k+1) Newton step) and probes wider than the training
    contexts (the Woodbury step) reach scikit-learn's optimum."""
    rng = np.random.default_rng(features)
    x = rng.normal(size=(contexts, features))
    x[:, : min(features, 20)] += rng.normal(size=(contexts, 1))  # correlated neurons
    y = x[:, 0] + 0.5 * rng.normal(size=contexts) > 0.3
    x = StandardScaler().fit_transform(x)
    coef, intercept = logistic_l2(x, y, C=C)
    reference = _sklearn_fit(x, y, C)
    scale = np.abs(reference.coef_[0]).max()
    assert np.abs(coef - reference.coef_[0]).max() <= 1e-4 * scale
    assert intercept == pytest.approx(reference.intercept_[0], rel=1e-4, abs=1e-4 * scale)


def _independent_cv(
    x: np.ndarray, y: np.ndarray, k: int | None, cv: int, seed: int, C: float
) -> np.ndarray:
    """The procedure written out with scikit-learn: select on each fold's training part by the
    per-neuron Wald statistic, scale, fit, score the held-out fold."""
    aucs = []
    folds = StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed)
    for train, test in folds.split(x, y):
        statistic = neuron_statistic(x, y, train)
        chosen = np.argsort(-statistic, kind="stable")[: k or x.shape[1]]
        scaler = StandardScaler().fit(x[np.ix_(train, chosen)])
        model = _sklearn_fit(scaler.transform(x[np.ix_(train, chosen)]), y[train], C)
        scores = model.decision_function(scaler.transform(x[np.ix_(test, chosen)]))
        aucs.append(roc_auc_score(y[test], scores))
    return np.array(aucs)


def test_cross_validated_figures_equal_an_independent_computation() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 160, 240)).astype(np.float32)
    y = rng.random(160) < 0.4
    x[:, y, :6] += 0.6
    table = decode_layers(x, y, k=(1, 4, 50, None), cv=4, seed=7, C=0.5, shuffled_control=False)
    assert list(table.columns) == list(DECODING_COLUMNS)
    assert table["layer"].tolist() == [0] * 4 + [1] * 4
    assert table["k"].tolist() == ["1", "4", "50", "all"] * 2
    assert table["neurons_used"].tolist() == [1, 4, 50, 240] * 2
    for row in table.itertuples():
        k = None if row.k == "all" else int(row.k)
        aucs = _independent_cv(x[row.layer].astype(np.float64), y, k, 4, 7, 0.5)
        assert row.cv_auc == pytest.approx(aucs.mean(), abs=1e-6)
        assert row.cv_auc_sd == pytest.approx(aucs.std(ddof=1), abs=1e-6)
    assert table["shuffled_auc"].isna().all()


def test_the_input_forms_agree_and_the_seed_decides() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 120, 30)).astype(np.float32)
    y = np.arange(120) % 3 == 0
    x[1, y, 4] += 1.0
    table = decode_layers(x, y, k=(2, None), cv=3, seed=1, layers=[5, 9])
    assert table["layer"].tolist() == [5, 5, 9, 9]
    pd.testing.assert_frame_equal(
        decode_layers(torch.from_numpy(x), torch.from_numpy(y), k=(2, None), cv=3, seed=1,
                      layers=[5, 9]),
        table,
    )  # fmt: skip
    pd.testing.assert_frame_equal(
        decode_layers(x[1], y.astype(int), k=[None, 2, 2], cv=3, seed=1, layers=[9]),
        table[table["layer"] == 9].reset_index(drop=True),
    )
    other = decode_layers(x, y, k=(2, None), cv=3, seed=2, layers=[5, 9])
    assert not np.allclose(other["cv_auc"], table["cv_auc"])


def _chance_bound(contexts: int, cv: int) -> float:
    """Four standard errors of a fold-mean AUC under the null (Hanley and McNeil's variance of
    one held-out fold's AUC, averaged over ``cv`` folds)."""
    per_class = contexts / cv / 2
    one_fold = np.sqrt((2 * per_class + 1) / (12 * per_class * per_class))
    return 4 * one_fold / np.sqrt(cv)


def test_no_leakage_on_pure_noise() -> None:
    """500 contexts x 2,000 noise neurons, random labels: every AUC, whole layer included, is at
    chance; selecting the neurons on all the contexts first (the common mistake, written out
    here only) is not."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(500, 2000)).astype(np.float32)
    y = rng.permutation(np.arange(500) < 250)
    table = decode_layers(x, y, k=(1, 10, 100, None), cv=5, seed=0)
    bound = _chance_bound(500, 5)
    assert bound < 0.11
    assert (table["cv_auc"] - 0.5).abs().max() < bound, table
    assert (table["shuffled_auc"] - 0.5).abs().max() < bound, table

    statistic = neuron_statistic(x, y, np.arange(500))  # selection on every context: the mistake
    chosen = np.argsort(-statistic)[:10]
    leaked = []
    for train, test in StratifiedKFold(n_splits=5, shuffle=True, random_state=0).split(x, y):
        scaler = StandardScaler().fit(x[np.ix_(train, chosen)])
        model = _sklearn_fit(scaler.transform(x[np.ix_(train, chosen)]), y[train], 1.0)
        leaked.append(
            roc_auc_score(
                y[test], model.decision_function(scaler.transform(x[np.ix_(test, chosen)]))
            )
        )
    assert np.mean(leaked) - 0.5 > bound, leaked


def test_a_planted_signal_is_found() -> None:
    """Three informative neurons among 300 noise neurons: the AUC rises up to k=3, does not
    rise after it, and the neurons chosen in every fold are the planted ones."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(400, 300))
    y = rng.permutation(np.arange(400) < 200)
    planted = [17, 150, 233]
    x[np.ix_(y, planted)] += 1.2
    table = decode_layers(x, y, k=(1, 2, 3, 10, None), cv=5, seed=0).set_index("k")
    auc = table["cv_auc"]
    assert auc["2"] > auc["1"] + 0.03 and auc["3"] > auc["2"] + 0.02, auc
    assert auc["10"] <= auc["3"] + 0.01, auc
    assert auc["3"] > 0.9
    assert sorted(map(int, table.loc["3", "selected"].split())) == planted
    assert set(map(int, table.loc["10", "selected"].split())) >= set(planted)
    assert table.loc["all", "selected"] == ""
    assert (table["shuffled_auc"] - 0.5).abs().max() < _chance_bound(400, 5)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"k": (1, 31)}, "k=31 is more than the layer's 30 neurons; use k <= 30"),
        ({"k": (0,)}, "k must hold positive whole numbers"),
        ({"k": ()}, "k is empty"),
        ({"cv": 1}, "cv must be a whole number of folds >= 2"),
        ({"cv": 13}, "cv=13 folds need at least 13 contexts of each class, the smaller class has "
                     "12; use --cv 12 or fewer"),
        ({"C": 0.0}, "C must be a positive finite number"),
        ({"test": "t"}, "test must be one of wald, lr"),
        ({"groups": np.repeat(np.arange(6), 10)}, "has only"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_naming_the_fix(options: dict, words: str) -> None:
    x = np.zeros((60, 30), dtype=np.float32)
    y = np.zeros(60, dtype=bool)
    y[:12] = True  # the first two documents hold every positive context
    with pytest.raises(DecodingInputError) as caught:
        decode_layers(x, y, **{"k": (1,), "cv": 3, **options})
    message = str(caught.value)
    assert words in message and "\n" not in message


def test_non_finite_activations_are_named() -> None:
    x = np.zeros((2, 40, 5))
    x[1, 3, 4] = np.nan
    with pytest.raises(DecodingInputError, match=r"layer 1 contain NaN or inf \(neuron 4\)"):
        decode_layers(x, np.arange(40) % 2 == 0, k=(1,), cv=2)
