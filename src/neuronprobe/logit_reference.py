"""The notebook's statsmodels call, neuron by neuron, in parallel processes (the reference engine).

For every neuron the notebook runs::

    sm.Logit(y_train, add_constant(x_train)).fit_regularized(maxiter=3000, disp=0, method="l1",
                                                              alpha=.1)

:func:`fit_neurons_statsmodels` does exactly that for a block of neurons on one shared split
(the notebook drew a new split per neuron; here all neurons share one), spreading the neurons
over worker processes.  This module imports only numpy and statsmodels, so that the workers
start quickly.  ``statistics.fit_neuron_logits(..., engine="statsmodels")`` is the entry point.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

__all__ = ["REFERENCE_OUTPUTS", "fit_neurons_statsmodels"]

#: Names of the per-neuron arrays returned by :func:`fit_neurons_statsmodels`.
REFERENCE_OUTPUTS = ("beta", "intercept", "beta_se", "train_acc", "test_acc", "converged")

#: Neurons per task sent to a worker process.
_TASK_NEURONS = 128


def _intercept_only_optimum(n1: int, n: int, alpha: float) -> float:
    """Minimiser of ``-loglik(b0) + alpha*|b0|`` (see ``logit_kernel.intercept_only_optimum``)."""
    if abs(n1 - n / 2.0) <= alpha:
        return 0.0
    s = 1.0 if n1 > n / 2.0 else -1.0
    q = (n1 - alpha * s) / n
    return math.log(q) - math.log1p(-q)


def _nan_safe_cov_l1(
    likelihood_model: Any, xopt: np.ndarray, retvals: dict[str, Any]
) -> np.ndarray:
    """statsmodels' ``cov_params_func_l1``, but NaN instead of raising on a singular Hessian."""
    hess = likelihood_model.hessian(xopt)
    nz = np.flatnonzero(~np.asarray(retvals["trimmed"]))
    cov = np.full(hess.shape, np.nan)
    sub = hess[nz[:, None], nz]
    if nz.size and np.isfinite(sub).all():
        with contextlib.suppress(np.linalg.LinAlgError):
            cov[nz[:, None], nz] = np.linalg.inv(-sub)
    return cov


def _statsmodels_fit(
    yf: np.ndarray, exog: np.ndarray, alpha: float, counters: dict[str, int]
) -> Any:
    """The notebook's ``sm.Logit(y, X).fit_regularized(...)`` with warnings counted, not shown.

    statsmodels 0.15 raises ``LinAlgError`` when the Hessian at SLSQP's stopping point is
    singular (e.g. a separable neuron driven to huge coefficients); the fit is then redone
    with the same optimiser and a covariance function that returns NaN instead.
    """
    import statsmodels.api as sm
    from statsmodels.tools.sm_exceptions import ConvergenceWarning, ModelWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = sm.Logit(yf, exog)
        try:
            result = model.fit_regularized(maxiter=3000, disp=0, method="l1", alpha=alpha)
        except np.linalg.LinAlgError:
            counters["singular"] = counters.get("singular", 0) + 1
            model = sm.Logit(yf, exog)
            model.cov_params_func_l1 = _nan_safe_cov_l1
            result = model.fit_regularized(maxiter=3000, disp=0, method="l1", alpha=alpha)
    seen: set[str] = set()
    for item in caught:
        if issubclass(item.category, ModelWarning):
            seen.add(
                "ConvergenceWarning"
                if issubclass(item.category, ConvergenceWarning)
                else item.category.__name__
            )
    for name in seen:
        counters[name] = counters.get(name, 0) + 1
    return result


def _fit_task(
    x_train: np.ndarray, x_test: np.ndarray, y_train: np.ndarray, y_test: np.ndarray, alpha: float
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Fit the neurons (rows) of ``x_train [m, n_train]``; evaluate on ``x_test [m, n_test]``."""
    import statsmodels.api as sm

    m, n = x_train.shape
    n1 = int(y_train.sum())
    yf = y_train.astype(np.float64)
    counters: dict[str, int] = {}
    out = {
        "beta": np.zeros(m),
        "intercept": np.zeros(m),
        "beta_se": np.full(m, np.nan),
        "train_acc": np.zeros(m),
        "test_acc": np.full(m, np.nan),
        "converged": np.ones(m, dtype=bool),
    }
    for j in range(m):
        xtr = x_train[j].astype(np.float64)
        xte = x_test[j].astype(np.float64)
        if xtr.max() == xtr.min():
            # statsmodels cannot fit a constant column beside the constant; the notebook's
            # `params[1]` would raise.  The intercept-only optimum is the answer.
            b0, b1 = _intercept_only_optimum(n1, n, alpha), 0.0
            pred_tr = np.full(n, b0 > 0)
            pred_te = np.full(xte.shape[0], b0 > 0)
        else:
            ex_train = sm.add_constant(xtr, has_constant="add")
            ex_test = sm.add_constant(xte, has_constant="add")
            result = _statsmodels_fit(yf, ex_train, alpha, counters)
            b0, b1 = float(result.params[0]), float(result.params[1])
            out["beta_se"][j] = float(result.bse[1])
            out["converged"][j] = bool(result.mle_retvals["converged"])
            pred_tr = result.predict(ex_train) > 0.5
            pred_te = result.predict(ex_test) > 0.5 if xte.shape[0] else np.zeros(0, bool)
        out["beta"][j], out["intercept"][j] = b1, b0
        out["train_acc"][j] = 100.0 * np.mean(pred_tr == y_train)
        if xte.shape[0]:
            out["test_acc"][j] = 100.0 * np.mean(pred_te == y_test)
    out["beta_se"][out["beta"] == 0] = np.nan
    return out, counters


def fit_neurons_statsmodels(
    layers: Sequence[np.ndarray],
    labels: np.ndarray,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    *,
    alpha: float,
    n_jobs: int | None = None,
    progress: bool = False,
) -> tuple[list[dict[str, np.ndarray]], dict[str, int]]:
    """Run the notebook's statsmodels fit for every neuron of every layer.

    Parameters
    ----------
    layers : sequence of np.ndarray
        One ``[contexts, neurons]`` array per layer (finite values).
    labels : np.ndarray
        bool ``[contexts]``.
    train_idx, test_idx : np.ndarray
        The shared split.
    alpha : float
        statsmodels' ``alpha``.
    n_jobs : int, optional
        Worker processes (default: the machine's cores); 1 runs in this process.
    progress : bool, default False
        Show a progress bar over the neurons (this engine takes minutes).

    Returns
    -------
    results : list of dict
        Per layer, the arrays of :data:`REFERENCE_OUTPUTS`, each ``[neurons]``.
    counters : dict
        How many neurons raised each kind of statsmodels warning (``ConvergenceWarning``, ...)
        and how many had a singular Hessian (``singular``).
    """
    if n_jobs is None:
        n_jobs = os.cpu_count() or 1
    y_train = labels[train_idx]
    y_test = labels[test_idx]
    tasks: list[tuple[int, int, int]] = []
    for layer, x in enumerate(layers):
        for start in range(0, x.shape[1], _TASK_NEURONS):
            tasks.append((layer, start, min(start + _TASK_NEURONS, x.shape[1])))

    def payload(task: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        layer, start, stop = task
        block = np.asarray(layers[layer][:, start:stop])
        return np.ascontiguousarray(block[train_idx].T), np.ascontiguousarray(block[test_idx].T)

    results = [
        {
            name: np.zeros(x.shape[1], dtype=bool if name == "converged" else np.float64)
            for name in REFERENCE_OUTPUTS
        }
        for x in layers
    ]
    counters: dict[str, int] = {}

    def collect(task: tuple[int, int, int], part: dict[str, np.ndarray], seen: dict[str, int]):
        layer, start, stop = task
        for name in REFERENCE_OUTPUTS:
            results[layer][name][start:stop] = part[name]
        for name, count in seen.items():
            counters[name] = counters.get(name, 0) + count

    from tqdm.auto import tqdm

    bar = tqdm(
        total=sum(stop - start for _, start, stop in tasks),
        desc="statsmodels fits",
        unit="neuron",
        disable=not progress,
    )
    if n_jobs <= 1 or len(tasks) <= 1:
        for task in tasks:
            collect(task, *_fit_task(*payload(task), y_train, y_test, alpha))
            bar.update(task[2] - task[1])
        bar.close()
        return results, counters
    # "spawn": the parent may hold torch and OpenMP threads, which fork does not copy safely.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=n_jobs, mp_context=context) as pool:
        futures = [
            (task, pool.submit(_fit_task, *payload(task), y_train, y_test, alpha)) for task in tasks
        ]
        for task, future in futures:
            collect(task, *future.result())
            bar.update(task[2] - task[1])
    bar.close()
    return results, counters
