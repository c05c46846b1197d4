"""Stage 4c, decoding: how well a layer's neurons tell the classes apart *together*.

The statistics ask about one neuron at a time. :func:`decode_layers` asks the question a
probing paper answers first: how well can the distinction be read from the ``k`` most
informative neurons of a layer, for ``k`` from 1 to the whole layer? For every layer, every
cross-validation fold and every ``k``:

1. rank the layer's neurons on the fold's **training part only**, by the per-neuron fit's
   deciding statistic (:func:`neuronprobe.statistics.neuron_statistic`: the Wald ``|z|`` or the
   likelihood-ratio statistic of the run's test);
2. keep the top ``k``, standardize them with the training part's mean and standard deviation;
3. fit an L2-penalised logistic regression, scikit-learn's objective
   ``0.5 * ||w||^2 + C * sum_i log-loss_i`` with an unpenalised intercept
   (:func:`logistic_l2`, exact to the optimum);
4. score the held-out fold: ROC AUC and accuracy (positive where ``w.x + b > 0``).

Selecting neurons on all the contexts before cross-validating is the common mistake that
makes pure noise look decodable; here the held-out fold never touches the selection, the
standardization or the fit. The shuffled-label control runs the same procedure, on the same
folds, with the labels permuted (seeded): its AUC is what the procedure finds where there is
nothing to find.

Every fit is Newton's method to the optimum, in float64: for ``k`` below the number of
training contexts, the fits of one layer and one ``k`` (all folds, real and shuffled labels)
together, with the ``(k+1) x (k+1)`` Hessian; for wider probes one by one, the same Newton step
through the Woodbury identity on the contexts' Gram matrix, an ``n x n`` system (``n``
training contexts) instead of ``k x k``, factored in float32 (the gradient, line search and
stopping rule stay float64, so only the step is inexact, never the optimum). The main thread
ranks one layer after another while the layers ranked so far are fitted in a thread pool.

References: Gurnee et al., "Finding neurons in a haystack: case studies with sparse probing",
TMLR 2023 (k-sparse probes); Dalvi et al., "NeuroX: a toolkit for analyzing individual neurons
in neural networks", AAAI 2019 (whole-layer probes); Hewitt and Liang, "Designing and
interpreting probes with control tasks", EMNLP 2019 (controls); Ambroise and McLachlan,
"Selection bias in gene extraction on the basis of microarray gene-expression data", PNAS 2002
(selection inside the cross-validation loop).
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from neuronprobe import rundir
from neuronprobe.behavior import roc_auc
from neuronprobe.config import DEFAULT_DECODE_K, TESTS, decode_k_sizes
from neuronprobe.errors import NeuronprobeError
from neuronprobe.statistics import cv_folds, neuron_statistic

__all__ = [
    "DECODING_COLUMNS",
    "DEFAULT_K",
    "DecodingInputError",
    "decode_layers",
    "k_label",
    "logistic_l2",
]

logger = logging.getLogger(__name__)

#: The default sweep: 1 to 100 neurons, and the whole layer (None): ``--decode-k``'s default.
DEFAULT_K: tuple[int | None, ...] = tuple(decode_k_sizes(list(DEFAULT_DECODE_K)))

#: Columns of :func:`decode_layers`' table (``decoding.csv``), in order.
DECODING_COLUMNS = rundir.DECODING_COLUMNS

#: ``selected`` lists the neurons chosen in every fold for probes up to this size.
SELECTED_UP_TO = 20

_MAX_NEWTON = 100
_MAX_HALVINGS = 50
#: Newton stops once its step moves no decision value by more than this (relative to 1 + |z|).
_STEP_TOL = 1e-6


class DecodingInputError(NeuronprobeError, ValueError):
    """Unusable input to :func:`decode_layers` (a ``ValueError`` and a ``NeuronprobeError``)."""


def k_label(k: int | None) -> str:
    """The label of a probe size in tables and on the command line: ``"5"``, or ``"all"``."""
    return "all" if k is None else str(int(k))


# ----------------------------------------------------------------------------------------------
# The L2-penalised logistic regression (scikit-learn's objective), batched
# ----------------------------------------------------------------------------------------------


def _loss(z: torch.Tensor, y: torch.Tensor, s: torch.Tensor, C: float) -> torch.Tensor:
    """``C * sum_i s_i (log(1 + exp(z_i)) - y_i z_i)`` per problem: ``[batch]``."""
    return C * (s * (torch.nn.functional.softplus(z) - y * z)).sum(-1)


def _line_search(
    f: torch.Tensor,
    norms: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    z: torch.Tensor,
    step_z: torch.Tensor,
    decrement: torch.Tensor,
    y: torch.Tensor,
    s: torch.Tensor,
    C: float,
) -> torch.Tensor:
    """Backtracking (Armijo) step lengths ``[batch]`` along a Newton direction.

    ``norms`` are ``(w'w, w'dw, dw'dw)``, so ``||w - t dw||^2`` needs no new product with the
    features; ``z`` and ``step_z`` ``[batch, n]`` are the decision values and their change.
    """
    ww, wd, dd = norms
    t = torch.ones_like(f)
    for _ in range(_MAX_HALVINGS):
        f_new = 0.5 * (ww - 2 * t * wd + t * t * dd) + _loss(z - t.unsqueeze(-1) * step_z, y, s, C)
        # Room for rounding: at the optimum the objective cannot fall any further.
        ok = f_new <= f - 1e-4 * t * decrement + 1e-13 * f.abs()
        if bool(ok.all()):
            break
        t = torch.where(ok, t, 0.5 * t)
    return t


def _converged(
    t: torch.Tensor, step_z: torch.Tensor, z: torch.Tensor, decrement: torch.Tensor
) -> torch.Tensor:
    """Newton is done once its step moves no decision value by more than ``_STEP_TOL``
    relative to the largest (quadratic convergence: the error left is far smaller)."""
    size = t * step_z.abs().amax(-1)
    return (size <= _STEP_TOL * (1.0 + z.abs().amax(-1))) | (decrement <= 0)


def _start(y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The intercept-only optimum ``[batch]``: the log-odds of the positive class."""
    prior = ((s * y).sum(-1) / s.sum(-1)).clamp(1e-12, 1 - 1e-12)
    return torch.log(prior) - torch.log1p(-prior)


def _fit_primal(
    x: torch.Tensor, y: torch.Tensor, s: torch.Tensor, C: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Newton's method with the ``(p+1) x (p+1)`` Hessian, for ``p`` below the contexts.

    Parameters
    ----------
    x : torch.Tensor
        float64 ``[batch, n, p]`` standardized features (rows with ``s == 0`` are padding).
    y, s : torch.Tensor
        float64 ``[batch, n]`` labels in {0, 1} and sample weights (1, or 0 for padding).
    C : float
        Inverse penalty strength.

    Returns
    -------
    w : torch.Tensor
        ``[batch, p]`` coefficients.
    b : torch.Tensor
        ``[batch]`` intercepts.
    converged : torch.Tensor
        bool ``[batch]``.
    """
    batch, _, p = x.shape
    w = torch.zeros(batch, p, dtype=x.dtype)
    b = _start(y, s)
    z = b.unsqueeze(-1).expand_as(y).clone()
    f = _loss(z, y, s, C)
    done = torch.zeros(batch, dtype=torch.bool)
    for _ in range(_MAX_NEWTON):
        prob = torch.sigmoid(z)
        residual = C * s * (prob - y)
        d = C * s * prob * (1.0 - prob)
        hessian = torch.empty(batch, p + 1, p + 1, dtype=x.dtype)
        hessian[:, :p, :p] = (x * d.unsqueeze(-1)).transpose(1, 2) @ x  # X' D X
        hessian[:, :p, :p].diagonal(dim1=1, dim2=2).add_(1.0)
        cross = (x.transpose(1, 2) @ d.unsqueeze(-1)).squeeze(-1)  # X' d: [batch, p]
        hessian[:, :p, p] = cross
        hessian[:, p, :p] = cross
        hessian[:, p, p] = d.sum(-1)
        grad = torch.cat(
            [w + (x.transpose(1, 2) @ residual.unsqueeze(-1)).squeeze(-1),
             residual.sum(-1, keepdim=True)], dim=-1,
        )  # fmt: skip
        factor, info = torch.linalg.cholesky_ex(hessian)
        if bool((info == 0).all()):
            step = torch.cholesky_solve(grad.unsqueeze(-1), factor).squeeze(-1)
        else:  # an intercept with (numerically) no curvature left: a least-squares step
            step = torch.linalg.lstsq(hessian, grad.unsqueeze(-1)).solution.squeeze(-1)
        step = torch.where(done.unsqueeze(-1), 0.0, step)
        step_w, step_b = step[:, :p], step[:, p]
        step_z = (x @ step_w.unsqueeze(-1)).squeeze(-1) + step_b.unsqueeze(-1)
        decrement = (grad * step).sum(-1)  # g' H^-1 g >= 0
        norms = ((w * w).sum(-1), (w * step_w).sum(-1), (step_w * step_w).sum(-1))
        t = _line_search(f, norms, z, step_z, decrement, y, s, C)
        w = w - t.unsqueeze(-1) * step_w
        b = b - t * step_b
        z = z - t.unsqueeze(-1) * step_z
        f = 0.5 * (w * w).sum(-1) + _loss(z, y, s, C)
        done = done | _converged(t, step_z, z, decrement)
        if bool(done.all()):
            break
    return w, b, done


def _fit_kernel(gram: np.ndarray, y: np.ndarray, C: float) -> tuple[np.ndarray, float, bool]:
    """The same Newton's method for ``p`` above the contexts, in the contexts' space.

    The coefficients stay ``w = X' a`` (the gradient ``w + X' r`` is in that span, and so is
    every Newton step), so only the Gram matrix ``K = X X'`` is needed: ``z = K a + b``,
    ``||w||^2 = a' K a``. The step on ``A = I + X' D X`` goes through Woodbury,
    ``A^-1 X' v = X' (v - D^1/2 M^-1 D^1/2 K v)`` with ``M = I + D^1/2 K D^1/2`` ``[n, n]``,
    and the intercept joins through the Schur complement. ``M`` is factored in float32 (LAPACK's
    ``spotrf``, twice as fast); the gradient, the line search and the stopping rule stay
    float64, so the inexact step costs at most a step more, never the optimum.

    Parameters
    ----------
    gram : np.ndarray
        float64 ``[n, n]``, ``X X'`` of the standardized training features; only its upper
        triangle is read (BLAS ``dsyrk``'s output).
    y : np.ndarray
        float64 ``[n]`` labels in {0, 1}.
    C : float
        Inverse penalty strength.

    Returns
    -------
    a : np.ndarray
        float64 ``[n]`` dual coefficients: ``w = X' a``.
    b : float
        The intercept.
    converged : bool
    """
    from scipy.linalg import blas, lapack

    n = y.size
    gram = np.asfortranarray(gram)
    gram32 = gram.astype(np.float32, order="F")
    m = np.empty_like(gram32)
    diagonal = np.arange(n)

    def k_times(v: np.ndarray) -> np.ndarray:  # K v from the upper triangle: [n, columns]
        return np.asarray(blas.dsymm(1.0, gram, v, side=0, lower=0))

    a = np.zeros(n)
    ka = np.zeros(n)  # K a
    b = float(_start(torch.from_numpy(y[None]), torch.ones(1, n, dtype=torch.float64))[0])
    z = np.full(n, b)
    f = _loss_np(z, y, C)
    for _ in range(_MAX_NEWTON):
        prob = _sigmoid(z)
        residual = C * (prob - y)
        d = C * prob * (1.0 - prob)
        g = a + residual  # grad_w = X' g
        grad_b = residual.sum()
        root = np.sqrt(d)
        root32 = root.astype(np.float32)
        np.multiply(gram32, root32[:, None], out=m)
        m *= root32[None, :]
        m[diagonal, diagonal] += 1.0
        both = np.column_stack([g, d])  # grad_w and X' d, as X' (.)
        inner = root[:, None] * k_times(both)
        factor, info = lapack.spotrf(m, lower=0, clean=0, overwrite_a=1)
        if info == 0:
            solved = lapack.spotrs(factor, inner.astype(np.float32), lower=0)[0].astype(float)
        else:  # too ill-conditioned for float32
            exact = (gram * root[:, None]) * root[None, :]
            exact[diagonal, diagonal] += 1.0
            factor, info = lapack.dpotrf(exact, lower=0, clean=0, overwrite_a=1)
            solved = lapack.dpotrs(factor, inner, lower=0)[0]
        inverse = both - root[:, None] * solved  # A^-1 X' v = X' inverse
        k_inverse = k_times(inverse)
        schur = d.sum() - d @ k_inverse[:, 1]
        step_b = (grad_b - d @ k_inverse[:, 0]) / schur
        step_a = inverse[:, 0] - inverse[:, 1] * step_b
        k_step = k_inverse[:, 0] - k_inverse[:, 1] * step_b  # K step_a
        step_z = k_step + step_b
        decrement = g @ k_step + grad_b * step_b
        if not decrement > 0:
            return a, b, True
        ww, wd, dd = a @ ka, a @ k_step, step_a @ k_step
        t = 1.0
        for _ in range(_MAX_HALVINGS):  # backtracking (Armijo); room for rounding at the optimum
            f_new = 0.5 * (ww - 2 * t * wd + t * t * dd) + _loss_np(z - t * step_z, y, C)
            if f_new <= f - 1e-4 * t * decrement + 1e-13 * abs(f):
                break
            t *= 0.5
        a -= t * step_a
        ka -= t * k_step
        b -= t * step_b
        z -= t * step_z
        f = 0.5 * float(a @ ka) + _loss_np(z, y, C)
        if t * np.abs(step_z).max() <= _STEP_TOL * (1.0 + np.abs(z).max()):
            return a, b, True
    return a, b, False


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.asarray(torch.sigmoid(torch.from_numpy(z)).numpy())


def _loss_np(z: np.ndarray, y: np.ndarray, C: float) -> float:
    """:func:`_loss` of one problem in numpy: ``C * sum_i (log(1 + exp(z_i)) - y_i z_i)``."""
    return float(C * (np.logaddexp(0.0, z) - y * z).sum())


def logistic_l2(x: np.ndarray, y: np.ndarray, *, C: float = 1.0) -> tuple[np.ndarray, float]:
    """Fit scikit-learn's L2-penalised logistic regression, to its optimum.

    Minimises ``0.5 * ||w||^2 + C * sum_i [log(1 + exp(z_i)) - y_i z_i]``,
    ``z_i = x_i . w + b``, with the intercept ``b`` unpenalised: the objective of
    ``sklearn.linear_model.LogisticRegression(C=C)`` (penalty ``"l2"``, solver ``"lbfgs"``).

    Parameters
    ----------
    x : np.ndarray
        ``[contexts, features]`` finite features.
    y : np.ndarray
        bool or 0/1 ``[contexts]``, both classes present.
    C : float, default 1.0
        Inverse penalty strength.

    Returns
    -------
    coef : np.ndarray
        float64 ``[features]``.
    intercept : float
    """
    xt = torch.as_tensor(np.asarray(x, dtype=np.float64)).unsqueeze(0)
    yt = torch.as_tensor(np.asarray(y, dtype=np.float64)).unsqueeze(0)
    if xt.ndim != 3 or yt.shape[1] != xt.shape[1]:
        raise DecodingInputError(
            f"x must be [contexts, features] and y [contexts]; got shapes {np.shape(x)} and "
            f"{np.shape(y)}."
        )
    _check_c(C)
    ones = torch.ones_like(yt)
    with torch.no_grad():
        if xt.shape[2] < xt.shape[1]:
            w, b, _ = _fit_primal(xt, yt, ones, float(C))
            return w[0].numpy(), float(b[0])
    features = xt[0].numpy()
    a, intercept, _ = _fit_kernel(_gram(features), yt[0].numpy(), float(C))
    return features.T @ a, intercept


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------


def _check_c(C: Any) -> None:
    if isinstance(C, bool) or not isinstance(C, (int, float)) or not (math.isfinite(C) and C > 0):
        raise DecodingInputError(f"C must be a positive finite number, got {C!r}.")


def _check_k(k: Any, width: int) -> list[int | None]:
    """Validate the probe sizes; return them in increasing order, the whole layer last."""
    values = [k] if k is None or isinstance(k, (int, np.integer)) else list(k)
    if not values:
        raise DecodingInputError("k is empty; give at least one probe size, e.g. k=(1, 10, None).")
    sizes: set[int] = set()
    whole = False
    for value in values:
        if value is None:
            whole = True
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise DecodingInputError(
                f"k must hold positive whole numbers of neurons or None (the whole layer); got "
                f"{value!r}."
            )
        if value > width:
            raise DecodingInputError(
                f"k={int(value)} is more than the layer's {width} neurons; use k <= {width}, or "
                "None (--decode-k all) for the whole layer."
            )
        sizes.add(int(value))
    ordered: list[int | None] = [*sorted(sizes)]
    return [*ordered, None] if whole else ordered


def _check_inputs(activations: Any, labels: Any) -> tuple[Any, np.ndarray]:
    """Return the activations as ``[layers, contexts, neurons]`` and the labels as bool."""
    if isinstance(activations, torch.Tensor):
        if activations.is_complex() or activations.dtype == torch.bool:
            raise DecodingInputError(
                f"activations must be real numbers, got dtype {activations.dtype}."
            )
    elif isinstance(activations, np.ndarray):
        if activations.dtype.kind not in "iuf":
            raise DecodingInputError(
                f"activations must be real numbers, got dtype {activations.dtype}."
            )
    else:
        raise DecodingInputError(
            "activations must be a numpy array (np.memmap is fine) or a torch tensor "
            f"[layers, contexts, neurons], got {type(activations).__name__}."
        )
    if activations.ndim == 2:
        activations = activations[None]
    if activations.ndim != 3:
        raise DecodingInputError(
            "activations must be [layers, contexts, neurons] (or [contexts, neurons]), got "
            f"shape {tuple(activations.shape)}."
        )
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != activations.shape[1]:
        raise DecodingInputError(
            f"labels must be [contexts] with one label per context ({activations.shape[1]}), "
            f"got shape {y.shape}."
        )
    if y.dtype != np.bool_:
        if y.dtype.kind not in "iuf" or not np.isin(np.unique(y), (0, 1)).all():
            raise DecodingInputError(
                "labels must be binary (bool, or 0/1); convert them with labels == positive_class."
            )
        y = y.astype(bool)
    return activations, y


def _check_folds(folds: list[np.ndarray], y: np.ndarray, cv: int, what: str) -> None:
    """Every fold's training part and held-out part must hold both classes."""
    for number, held_out in enumerate(folds):
        train = np.ones(y.size, dtype=bool)
        train[held_out] = False
        for part, mask in (("held-out", ~train), ("training", train)):
            values = y[mask]
            if values.all() or not values.any():
                present = "positive" if values.all() else "negative"
                raise DecodingInputError(
                    f"{what}: fold {number + 1} of cv={cv} has only {present} contexts in its "
                    f"{part} part ({values.size} contexts), so no AUC or fit is defined; use "
                    "fewer folds (--cv), more documents, or no grouping by document."
                )


# ----------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------


def _layer(activations: Any, layer: int) -> np.ndarray:
    """One layer as float32 or float64 numpy ``[contexts, neurons]`` (a memory map reads only
    this layer)."""
    x = activations[layer]
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    return x if x.dtype in (np.float32, np.float64) else x.astype(np.float64)


@dataclass
class _Fold:
    """One fold of one layer: the split, the standardized neurons, and each task's ranking."""

    train: np.ndarray  # int64 [n_train]
    test: np.ndarray  # int64 [n_test]
    standardized: np.ndarray  # float64 [contexts, neurons], with the training part's mean, sd
    orders: list[np.ndarray]  # per task (labels, shuffled labels): neurons, strongest first
    gram: tuple[np.ndarray, np.ndarray] | None = None  # all neurons' Gram matrices, made once


def _folds_of_layer(
    x: np.ndarray, tasks: list[np.ndarray], folds: list[np.ndarray], test: str, alpha: float
) -> list[_Fold]:
    """Rank and standardize on each fold's training part only."""
    out = []
    wide = x.astype(np.float64)
    for held_out in folds:
        train_mask = np.ones(x.shape[0], dtype=bool)
        train_mask[held_out] = False
        train = np.flatnonzero(train_mask)
        mean = wide[train].mean(axis=0)
        sd = wide[train].std(axis=0)
        sd = np.where(sd > 0, sd, 1.0)  # constant on the training part: scikit-learn's scale 1
        orders = [
            np.argsort(-neuron_statistic(x, labels, train, test=test, alpha=alpha), kind="stable")
            for labels in tasks
        ]  # strongest first; ties by neuron index
        out.append(_Fold(train, held_out, (wide - mean) / sd, orders))
    return out


def _gram(x: np.ndarray) -> np.ndarray:
    """``x x'`` ``[rows, rows]`` by BLAS's symmetric rank-k update (half the work of a matrix
    product): only the upper triangle is filled, all that :func:`_fit_kernel` reads."""
    from scipy.linalg.blas import dsyrk

    return np.asarray(dsyrk(1.0, np.asarray(x, dtype=np.float64, order="F")))


def _grams(x: np.ndarray, train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The training contexts' Gram matrix (upper triangle) ``[n_train, n_train]`` and the
    held-out contexts' products with them ``[n_test, n_train]``."""
    return _gram(x[train]), x[test] @ x[train].T


def _probe_scores(
    folds: list[_Fold], tasks: list[np.ndarray], k: int | None, C: float
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Fit the top-``k`` probe of every fold and task; score the held-out folds.

    Probes narrower than the training contexts are solved together (one batched Newton
    method); wider ones one by one on their Gram matrices.

    Returns the held-out ROC AUC and accuracy (percent), each ``[tasks, folds]``, and whether
    every fit converged.
    """
    problems = [(fold, task) for task in range(len(tasks)) for fold in folds]
    n = max(fold.train.size for fold in folds)
    width = folds[0].standardized.shape[1]
    p = width if k is None else k
    decisions: list[np.ndarray] = []
    if p < n:  # the (k+1) x (k+1) Newton step, every problem at once
        batch = len(problems)
        features = np.zeros((batch, n, p))
        targets = np.zeros((batch, n))
        weights = np.zeros((batch, n))
        for i, (fold, task) in enumerate(problems):
            columns = fold.orders[task][:p]
            features[i, : fold.train.size] = fold.standardized[np.ix_(fold.train, columns)]
            targets[i, : fold.train.size] = tasks[task][fold.train]
            weights[i, : fold.train.size] = 1.0  # 0: padding to the largest training part
        with torch.no_grad():
            w, b, converged = _fit_primal(
                torch.from_numpy(features), torch.from_numpy(targets), torch.from_numpy(weights), C
            )
        converged_all = bool(converged.all())
        for i, (fold, task) in enumerate(problems):
            held = fold.standardized[np.ix_(fold.test, fold.orders[task][:p])]
            decisions.append(held @ w[i].numpy() + float(b[i]))
    else:  # wider than the training contexts: the n x n step on the Gram matrix
        if p == width and folds[0].gram is None:  # one Gram matrix per fold, for both tasks
            for fold in folds:
                fold.gram = _grams(fold.standardized, fold.train, fold.test)

        def solve(problem: tuple[_Fold, int]) -> tuple[np.ndarray, bool]:
            fold, task = problem
            if p == width and fold.gram is not None:
                gram, cross = fold.gram
            else:
                columns = fold.standardized[:, fold.orders[task][:p]]
                gram, cross = _grams(columns, fold.train, fold.test)
            a, intercept, ok = _fit_kernel(gram, tasks[task][fold.train].astype(float), C)
            return cross @ a + intercept, ok

        solved = [solve(problem) for problem in problems]
        decisions = [decision for decision, _ in solved]
        converged_all = all(ok for _, ok in solved)
    aucs = np.empty(len(problems))
    accs = np.empty(len(problems))
    for i, ((fold, task), decision) in enumerate(zip(problems, decisions, strict=True)):
        truth = tasks[task][fold.test]
        aucs[i] = roc_auc(decision, truth)
        accs[i] = 100.0 * np.mean((decision > 0) == truth)
    shape = (len(tasks), len(folds))
    return aucs.reshape(shape), accs.reshape(shape), converged_all


@contextmanager
def _one_thread_per_fit() -> Iterator[None]:
    """Torch and BLAS on one thread each while the layers' fits run side by side in threads:
    on a busy machine, multithreaded BLAS and OpenMP spin-wait and run many times slower
    than one thread per fit; the previous settings come back afterwards."""
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(threads)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _selected(folds: list[_Fold], k: int | None) -> str:
    """The neurons in every fold's top ``k`` (real labels), strongest (by mean rank) first."""
    if k is None or k > SELECTED_UP_TO:
        return ""
    tops = [fold.orders[0][:k].tolist() for fold in folds]
    common = set(tops[0]).intersection(*tops[1:])
    rank = {neuron: sum(top.index(neuron) for top in tops) for neuron in common}
    return " ".join(str(neuron) for neuron in sorted(common, key=lambda n: (rank[n], n)))


def decode_layers(
    activations: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    *,
    k: Sequence[int | None] | int | None = DEFAULT_K,
    cv: int = 5,
    seed: int = 0,
    groups: np.ndarray | None = None,
    C: float = 1.0,
    shuffled_control: bool = True,
    test: str = "wald",
    alpha: float = 0.1,
    layers: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Cross-validated sparse and whole-layer probes, one row per layer and probe size.

    Parameters
    ----------
    activations : np.ndarray or torch.Tensor
        ``[layers, contexts, neurons]`` (or ``[contexts, neurons]``, one layer); a memory map
        is read one layer at a time.
    labels : np.ndarray or torch.Tensor
        bool or 0/1 ``[contexts]``, True = positive class.
    k : sequence of int or None, default ``(1, 2, 5, 10, 20, 50, 100, None)``
        Probe sizes: the ``k`` strongest neurons of the fold's training part; None is the
        whole layer.
    cv : int, default 5
        Stratified folds (each context is held out once).
    seed : int, default 0
        Seed of the folds and of the shuffled labels.
    groups : np.ndarray, optional
        ``[contexts]`` document of each context: the folds then keep every document on one
        side (``StratifiedGroupKFold``), as the run's split does with ``--split-by-document``.
    C : float, default 1.0
        Inverse L2 penalty strength, scikit-learn's ``C``, on standardized neurons.
    shuffled_control : bool, default True
        Also run the whole procedure on seeded permuted labels (``shuffled_auc``).
    test : {"wald", "lr"}, default "wald"
        The per-neuron test whose statistic ranks the neurons (the run's ``--test``).
    alpha : float, default 0.1
        L1 weight of the per-neuron fits that rank the neurons (the run's ``--alpha``).
    layers : sequence of int, optional
        The model layer of each entry of ``activations`` (default ``0, 1, ...``).

    Returns
    -------
    pandas.DataFrame
        :data:`DECODING_COLUMNS`, one row per layer and ``k`` (layer-major, ``k`` increasing,
        the whole layer last): ``k`` as its label (``"5"``, ``"all"``), ``neurons_used``, the
        mean and sample sd over folds of the held-out accuracy (percent) and ROC AUC, the same
        for the shuffled labels (NaN without the control), and ``selected``: the neurons in
        every fold's top ``k`` (for ``k`` up to 20), strongest first.

    Raises
    ------
    DecodingInputError
        (a ``ValueError``) on bad shapes or labels, ``k`` above the layer width, ``cv`` below
        2 or above the smaller class, a fold holding one class only, or a bad ``C``.
    """
    activations, y = _check_inputs(activations, labels)
    n_layers, _, width = activations.shape
    sizes = _check_k(k, width)
    _check_c(C)
    if test not in TESTS:
        raise DecodingInputError(f"test must be one of {', '.join(TESTS)}; got {test!r}.")
    if isinstance(cv, bool) or not isinstance(cv, (int, np.integer)) or cv < 2:
        raise DecodingInputError(f"cv must be a whole number of folds >= 2 (--cv), got {cv!r}.")
    smallest = int(min(y.sum(), (~y).sum()))
    if smallest < 2:
        raise DecodingInputError(
            f"the labels hold {smallest} context(s) of one class; cross-validated decoding "
            "needs at least 2 of each class (one per fold): collect more contexts."
        )
    if cv > smallest:
        raise DecodingInputError(
            f"cv={cv} folds need at least {cv} contexts of each class, the smaller class has "
            f"{smallest}; use --cv {max(2, smallest)} or fewer, or collect more contexts."
        )
    layer_ids = list(range(n_layers)) if layers is None else [int(layer) for layer in layers]
    if len(layer_ids) != n_layers:
        raise DecodingInputError(
            f"layers names {len(layer_ids)} layers but activations hold {n_layers}."
        )

    folds = cv_folds(y, int(cv), seed=seed, groups=groups)
    tasks = [y]
    if shuffled_control:  # the same folds, the labels permuted: only the labels differ
        tasks.append(np.random.default_rng(seed).permutation(y))
    for task, what in zip(tasks, ("labels", "shuffled labels"), strict=False):
        _check_folds(folds, task, int(cv), f"the {what}")

    return _sweep(activations, layer_ids, tasks, folds, sizes, float(C), test, alpha)


def _sweep(
    activations: Any,
    layer_ids: list[int],
    tasks: list[np.ndarray],
    folds: list[np.ndarray],
    sizes: list[int | None],
    C: float,
    test: str,
    alpha: float,
) -> pd.DataFrame:
    """The sweep of :func:`decode_layers` over checked inputs: one row per layer and size.

    The main thread reads each layer and ranks its neurons (the compiled per-neuron kernel,
    on all cores); the probes of the layers ranked so far are fitted meanwhile in a pool of
    threads, one layer per thread (at most one layer per core waits, to bound the memory).
    """
    cores = _cores()
    rows: list[dict[str, Any]] = []
    unconverged = 0
    with _one_thread_per_fit(), ThreadPoolExecutor(cores) as pool:
        pending: deque[Future[tuple[list[dict[str, Any]], int]]] = deque()
        for index, layer in enumerate(layer_ids):
            x = _layer(activations, index)  # [contexts, neurons]
            if not np.isfinite(x).all():
                bad = np.flatnonzero(~np.isfinite(x).all(axis=0))
                raise DecodingInputError(
                    f"activations of layer {layer} contain NaN or inf (neuron {int(bad[0])}"
                    f"{f' and {bad.size - 1} more' if bad.size > 1 else ''}); clean or drop "
                    "those neurons first."
                )
            layer_folds = _folds_of_layer(x, tasks, folds, test, alpha)
            pending.append(pool.submit(_decode_layer, layer, layer_folds, tasks, sizes, C))
            while len(pending) > cores:
                done, failed = pending.popleft().result()
                rows += done
                unconverged += failed
        while pending:
            done, failed = pending.popleft().result()
            rows += done
            unconverged += failed
    if unconverged:
        logger.warning(
            "%d batches of probe fits stopped after %d Newton steps before converging",
            unconverged, _MAX_NEWTON,
        )  # fmt: skip
    return pd.DataFrame(rows, columns=list(DECODING_COLUMNS))


def _decode_layer(
    layer: int, folds: list[_Fold], tasks: list[np.ndarray], sizes: list[int | None], C: float
) -> tuple[list[dict[str, Any]], int]:
    """Every probe size of one ranked layer: its rows, and how many fits did not converge."""
    width = folds[0].standardized.shape[1]
    shuffled_control = len(tasks) == 2
    rows = []
    unconverged = 0
    for size in sizes:
        aucs, accs, ok = _probe_scores(folds, tasks, size, C)
        unconverged += not ok
        rows.append(
            {
                "layer": layer,
                "k": k_label(size),
                "neurons_used": width if size is None else size,
                "cv_acc": accs[0].mean(),
                "cv_acc_sd": accs[0].std(ddof=1),
                "cv_auc": aucs[0].mean(),
                "cv_auc_sd": aucs[0].std(ddof=1),
                "shuffled_auc": aucs[1].mean() if shuffled_control else math.nan,
                "shuffled_auc_sd": aucs[1].std(ddof=1) if shuffled_control else math.nan,
                "selected": _selected(folds, size),
            }
        )
    logger.debug("decoded layer %d", layer)
    return rows, unconverged
