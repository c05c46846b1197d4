"""The statsmodels reference engine: the notebook's own call, neuron by neuron, in processes.

``fit_neurons_statsmodels`` must give exactly what a direct
``sm.Logit(y, add_constant(x)).fit_regularized(method="l1", alpha=.1, maxiter=3000, disp=0)``
gives, whether it runs in this process or in worker processes.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import stats

from neuronprobe.logit_kernel import intercept_only_optimum
from neuronprobe.logit_reference import (
    REFERENCE_OUTPUTS,
    _intercept_only_optimum,
    fit_neurons_statsmodels,
)
from neuronprobe.statistics import fit_neuron_logits

ALPHA = 0.1


def make_layers(seed: int = 0, n: int = 300) -> tuple[list[np.ndarray], np.ndarray]:
    """Two layers (150 and 170 neurons: several 128-neuron tasks) and unbalanced labels."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.4
    centred = labels - labels.mean()
    layers = []
    for width in (150, 170):
        effect = rng.choice([0.0, 0.3, 1.0, 3.0], size=width)
        scale = 10.0 ** rng.uniform(-2, 2, size=width)
        layers.append((rng.normal(size=(n, width)) + effect * centred[:, None]) * scale)
    layers[0][:, 7] = 0.25  # constant
    magnitude = 1.0 + rng.random(n)
    layers[1][:, 3] = np.where(labels, magnitude, -magnitude)  # separating
    return layers, labels


@pytest.fixture(scope="module")
def problem() -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    layers, labels = make_layers()
    order = np.random.default_rng(1).permutation(labels.size)
    return layers, labels, np.sort(order[:240]), np.sort(order[240:])


@pytest.fixture(scope="module")
def serial(problem):
    layers, labels, train_idx, test_idx = problem
    return fit_neurons_statsmodels(layers, labels, train_idx, test_idx, alpha=ALPHA, n_jobs=1)


def notebook_fit(x: np.ndarray, y: np.ndarray) -> object:
    import statsmodels.api as sm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sm.Logit(y.astype(np.float64), sm.add_constant(x)).fit_regularized(
            method="l1", alpha=ALPHA, maxiter=3000, disp=0
        )


def test_worker_processes_give_exactly_the_serial_results(problem, serial):
    layers, labels, train_idx, test_idx = problem
    results, counters = serial
    parallel, parallel_counters = fit_neurons_statsmodels(
        layers, labels, train_idx, test_idx, alpha=ALPHA, n_jobs=2
    )
    assert len(parallel) == len(results) == 2
    for layer, (ours, theirs) in enumerate(zip(parallel, results, strict=True)):
        assert list(ours) == list(REFERENCE_OUTPUTS)
        for name in REFERENCE_OUTPUTS:
            assert ours[name].shape == (layers[layer].shape[1],), name
            np.testing.assert_array_equal(ours[name], theirs[name], err_msg=f"{layer} {name}")
    assert parallel_counters == counters


def test_equals_the_notebooks_statsmodels_call(problem, serial):
    import statsmodels.api as sm

    layers, labels, train_idx, test_idx = problem
    results, _ = serial
    y_train, y_test = labels[train_idx], labels[test_idx]
    for layer, j in ((0, 0), (0, 1), (0, 64), (0, 149), (1, 3), (1, 130), (1, 169)):
        x = layers[layer][:, j]
        result = notebook_fit(x[train_idx], y_train)
        got = {name: value[j] for name, value in results[layer].items()}
        assert got["intercept"] == result.params[0], (layer, j)
        assert got["beta"] == result.params[1], (layer, j)
        if result.params[1] != 0:
            assert got["beta_se"] == result.bse[1], (layer, j)
        else:
            assert np.isnan(got["beta_se"])
        assert got["converged"] == result.mle_retvals["converged"]
        predicted_train = result.predict(sm.add_constant(x[train_idx])) > 0.5
        predicted_test = result.predict(sm.add_constant(x[test_idx])) > 0.5
        assert got["train_acc"] == 100.0 * np.mean(predicted_train == y_train)
        assert got["test_acc"] == 100.0 * np.mean(predicted_test == y_test)


def test_constant_neuron_gets_the_intercept_only_optimum(problem, serial):
    import statsmodels.api as sm

    layers, labels, train_idx, _ = problem
    results, _ = serial
    y = labels[train_idx]
    n1, n = int(y.sum()), y.size
    assert results[0]["beta"][7] == 0.0 and np.isnan(results[0]["beta_se"][7])
    assert results[0]["intercept"][7] == intercept_only_optimum(n1, n, ALPHA)
    assert results[0]["train_acc"][7] == 100.0 * max(n1, n - n1) / n
    # The notebook's own code cannot fit it: add_constant skips a constant column, so
    # result.params has no slope and the notebook's params[1] raises.
    exog = sm.add_constant(layers[0][train_idx, 7])
    assert exog.shape[1] == 1
    with pytest.raises(IndexError):
        notebook_fit(layers[0][train_idx, 7], y).params[1]


def test_intercept_only_optimum_matches_the_kernels():
    for n, n1 in ((100, 50), (100, 51), (100, 80), (37, 2), (1000, 999)):
        for alpha in (0.01, 0.1, 1.0, 5.0):
            assert _intercept_only_optimum(n1, n, alpha) == intercept_only_optimum(n1, n, alpha)


def test_statsmodels_engine_reports_the_reference_fits(problem, serial):
    layers, labels, train_idx, _ = problem
    results, _ = serial
    mask = np.zeros(labels.size, dtype=bool)
    mask[train_idx] = True
    stacked = np.stack([layers[0][:, :150], layers[1][:, :150]])
    fits = fit_neuron_logits(stacked, labels, train_mask=mask, engine="statsmodels", n_jobs=2)
    assert fits.engine == "statsmodels"
    for layer in (0, 1):
        for name in ("beta", "intercept", "beta_se", "train_acc", "test_acc", "converged"):
            np.testing.assert_array_equal(
                getattr(fits, name)[layer], results[layer][name][:150], err_msg=name
            )
    # The notebook's Wald p-value: 2 * Phi(-|beta / se|), NaN where the slope is zero.
    z = np.abs(fits.beta / fits.beta_se)
    np.testing.assert_allclose(fits.pvalue, 2 * stats.norm.sf(z), rtol=1e-12)
    assert np.isnan(fits.pvalue[fits.beta == 0]).all()
    # Likelihood-ratio p-values, flags and folds come from the fast kernel on the same split.
    fast = fit_neuron_logits(stacked, labels, train_mask=mask)
    for name in ("pvalue_lr", "separated", "constant"):
        np.testing.assert_array_equal(getattr(fits, name), getattr(fast, name), err_msg=name)
