"""Per-neuron L1-penalised logistic regressions (the notebook's probe statistics).

For every neuron (a column of an activation matrix) the notebook fits::

    X = sm.add_constant(x)
    X_train, X_test, y_train, y_test = train_test_split(X, labels, test_size=.2, stratify=labels)
    result = sm.Logit(y_train, X_train).fit_regularized(maxiter=3000, disp=0, method="l1", alpha=.1)

i.e. it minimises, over the intercept ``b0`` and the slope ``b1``,

.. math::

    F(b) = -\\ell(b) + \\alpha (|b_0| + |b_1|), \\qquad
    -\\ell(b) = \\sum_i \\operatorname{softplus}(b_0 + b_1 x_i) - y_i (b_0 + b_1 x_i)

on the training contexts (the intercept is penalised too).  This module computes the *true*
optimum of that objective for all neurons at once (``engine="fast"``, a vectorised proximal
Newton method in torch float64), or runs the notebook's statsmodels call neuron by neuron
(``engine="statsmodels"``) on the same shared split.

Standard errors follow statsmodels: the unscaled Logit Hessian ``X' W X`` (``W = p (1 - p)``) at
the solution, restricted to the non-zero coefficients and inverted; the slope's Wald p-value is
``2 * Phi(-|b1 / se|)``, NaN where the slope is zero.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import stats

from neuronprobe.errors import NeuronprobeError

__all__ = ["FitInputError", "NeuronFits", "fit_neuron_logits", "stratified_train_mask"]

logger = logging.getLogger(__name__)

_EPS = float(np.finfo(np.float64).eps)
#: Armijo sufficient-decrease constant of the line search.
_ARMIJO = 1e-4
#: Maximum number of step halvings in one line search.
_MAX_HALVINGS = 60
#: Values above this are returned unchanged by softplus (error < exp(-40) ~ 4e-18).
_SOFTPLUS_THRESHOLD = 40.0
#: Rough count of [neurons, contexts] float64 work arrays alive at once in the solver.
_WORK_ARRAYS = 10


class FitInputError(NeuronprobeError, ValueError):
    """Unusable input to :func:`fit_neuron_logits` (a ``ValueError`` and a ``NeuronprobeError``)."""


@dataclass(frozen=True)
class NeuronFits:
    """Per-neuron results of the one-feature L1 logistic regressions.

    Every per-neuron array is shaped like the activations without the contexts axis:
    ``[neurons]`` for 2-D activations ``[contexts, neurons]`` or ``[layers, neurons]`` for
    3-D activations ``[layers, contexts, neurons]``.

    Attributes
    ----------
    beta : np.ndarray
        float64 slope ``b1``; exactly 0.0 where the optimum's slope is 0.
    intercept : np.ndarray
        float64 intercept ``b0`` (penalised, like statsmodels' ``add_constant`` column).
    beta_se : np.ndarray
        float64 standard error of the slope, NaN where ``beta == 0`` (statsmodels engine: also
        where statsmodels' Hessian at its stopping point was singular).
    pvalue : np.ndarray
        float64 two-sided Wald p-value of the slope (statsmodels' normal formula), NaN where
        ``beta == 0``.
    train_acc : np.ndarray
        float64 percent of training contexts classified correctly, predicting positive where
        ``b0 + b1 * x > 0`` (the notebook's ``predict(X) > .5``).
    test_acc : np.ndarray
        float64 percent of held-out contexts classified correctly (NaN if there are none).
    converged : np.ndarray
        bool, optimality (KKT) conditions met to tolerance (fast engine) or statsmodels'
        ``mle_retvals["converged"]`` (statsmodels engine).
    constant : np.ndarray
        bool, the neuron is constant on the training contexts; its slope is not fitted
        (``beta = 0``) and its intercept is the intercept-only L1 optimum.
    train_mask : np.ndarray
        bool ``[contexts]``, the one train/test split shared by all neurons (True = train).
    alpha : float
        L1 penalty weight on the summed (not averaged) negative log-likelihood.
    """

    beta: np.ndarray
    intercept: np.ndarray
    beta_se: np.ndarray
    pvalue: np.ndarray
    train_acc: np.ndarray
    test_acc: np.ndarray
    converged: np.ndarray
    constant: np.ndarray
    train_mask: np.ndarray
    alpha: float

    def to_frame(self) -> pd.DataFrame:
        """Return the results as a tidy table, one row per (layer, neuron).

        Returns
        -------
        pd.DataFrame
            Rows in C order (layer-major).  Columns ``layer`` (only for 2-D results
            ``[layers, neurons]``), ``neuron``, ``beta``, ``intercept``, ``beta_se``,
            ``pvalue``, ``train_acc``, ``test_acc``, ``converged``, ``constant``.
        """
        shape = self.beta.shape
        columns: dict[str, np.ndarray] = {}
        if len(shape) == 2:
            layer, neuron = np.indices(shape)
            columns["layer"] = layer.ravel()
            columns["neuron"] = neuron.ravel()
        else:
            columns["neuron"] = np.arange(self.beta.size)
        for name in (
            "beta",
            "intercept",
            "beta_se",
            "pvalue",
            "train_acc",
            "test_acc",
            "converged",
            "constant",
        ):
            columns[name] = np.asarray(getattr(self, name)).ravel()
        return pd.DataFrame(columns)


# ----------------------------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------------------------


def _labels_to_bool(labels: Any) -> np.ndarray:
    """Validate binary labels and return them as a bool numpy vector ``[contexts]``."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise FitInputError(
            f"labels must be a 1-D array [contexts], got shape {arr.shape}; "
            "pass one binary label per context."
        )
    if arr.dtype == np.bool_:
        return arr.copy()
    if arr.dtype.kind not in "iuf":
        raise FitInputError(
            f"labels must be binary (bool, or numbers 0/1), got dtype {arr.dtype}; "
            "convert them with labels == positive_class."
        )
    values = np.unique(arr)
    if not np.all(np.isin(values, (0, 1))):
        shown = values[:5].tolist()
        raise FitInputError(
            f"labels must be binary (bool, or 0/1), got values {shown}"
            f"{'...' if values.size > 5 else ''}; convert them with labels == positive_class."
        )
    return arr.astype(bool)


def stratified_train_mask(labels: np.ndarray, test_size: float = 0.2, seed: int = 0) -> np.ndarray:
    """Draw one seeded, stratified train/test split of the contexts.

    Uses ``sklearn.model_selection.train_test_split(np.arange(n), test_size=test_size,
    stratify=labels, random_state=seed)``, so the class counts of each side are sklearn's.

    Parameters
    ----------
    labels : np.ndarray
        bool (or 0/1) ``[contexts]``, True = positive class.
    test_size : float, default 0.2
        Fraction (or absolute count, as in sklearn) of contexts held out.
    seed : int, default 0
        ``random_state`` of the split.

    Returns
    -------
    np.ndarray
        bool ``[contexts]``, True = training context.
    """
    from sklearn.model_selection import train_test_split

    y = _labels_to_bool(labels)
    n = y.shape[0]
    try:
        train_idx, _ = train_test_split(
            np.arange(n), test_size=test_size, stratify=y, random_state=seed
        )
    except ValueError as err:
        raise FitInputError(
            f"cannot draw a stratified split of {n} contexts with test_size={test_size!r}: "
            f"{err}. Each class needs at least 2 contexts and both sides of the split at least "
            "one per class; adjust test_size or pass train_mask explicitly."
        ) from err
    mask = np.zeros(n, dtype=bool)
    mask[train_idx] = True
    return mask


def _check_activations(activations: Any) -> tuple[int, int, int | None]:
    """Validate activations; return ``(contexts, neurons, layers or None)``."""
    if isinstance(activations, torch.Tensor):
        if activations.is_complex() or activations.dtype == torch.bool:
            raise FitInputError(
                f"activations must be a real float tensor, got dtype {activations.dtype}."
            )
        shape = tuple(activations.shape)
    elif isinstance(activations, np.ndarray):
        if activations.dtype.kind not in "iuf":
            raise FitInputError(
                f"activations must be a real float array, got dtype {activations.dtype}."
            )
        shape = activations.shape
    else:
        raise FitInputError(
            "activations must be a numpy array (np.memmap is fine) or a torch tensor, got "
            f"{type(activations).__name__}; wrap it with np.asarray first."
        )
    if len(shape) == 2:
        return shape[0], shape[1], None
    if len(shape) == 3:
        return shape[1], shape[2], shape[0]
    raise FitInputError(
        "activations must be [contexts, neurons] or [layers, contexts, neurons], got shape "
        f"{shape}."
    )


def _check_train_mask(train_mask: Any, y: np.ndarray) -> np.ndarray:
    """Validate a user-supplied train mask and return it as bool numpy ``[contexts]``."""
    if isinstance(train_mask, torch.Tensor):
        train_mask = train_mask.detach().cpu().numpy()
    mask = np.asarray(train_mask)
    if mask.dtype != np.bool_:
        raise FitInputError(
            f"train_mask must be a bool array [contexts] (True = train), got dtype {mask.dtype}; "
            "build it with stratified_train_mask or an explicit comparison."
        )
    if mask.shape != y.shape:
        raise FitInputError(
            f"train_mask has shape {mask.shape} but labels have shape {y.shape}; "
            "they must both be [contexts]."
        )
    return mask.copy()


# ----------------------------------------------------------------------------------------------
# Chunk iteration
# ----------------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    """One block of neurons, neurons-major float64 tensors on the compute device."""

    layer: int | None
    start: int
    stop: int
    x_train: torch.Tensor  # [m, n_train]
    x_test: torch.Tensor  # [m, n_test]


def _iter_chunks(
    activations: np.ndarray | torch.Tensor,
    layers: int | None,
    neurons: int,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    chunk_size: int,
) -> Iterator[_Chunk]:
    """Yield float64 neuron blocks, layer by layer, checking that they are finite."""
    device = activations.device if isinstance(activations, torch.Tensor) else torch.device("cpu")
    tr = torch.as_tensor(train_idx, device=device)
    te = torch.as_tensor(test_idx, device=device)
    for layer in range(layers) if layers is not None else [None]:
        for start in range(0, neurons, chunk_size):
            stop = min(start + chunk_size, neurons)
            if isinstance(activations, torch.Tensor):
                block_t = activations[layer] if layer is not None else activations
                block_t = block_t[:, start:stop].detach().to(torch.float64)
                x_train = block_t.index_select(0, tr).T.contiguous()
                x_test = block_t.index_select(0, te).T.contiguous()
                finite = bool(torch.isfinite(block_t).all())
            else:
                block = activations[layer] if layer is not None else activations
                block = np.asarray(block[:, start:stop], dtype=np.float64)
                x_train = torch.from_numpy(np.ascontiguousarray(block[train_idx].T))
                x_test = torch.from_numpy(np.ascontiguousarray(block[test_idx].T))
                finite = bool(np.isfinite(block).all())
            if not finite:
                where = f"layer {layer}, " if layer is not None else ""
                raise FitInputError(
                    f"activations contain NaN or inf ({where}neurons {start}..{stop - 1}); "
                    "clean or drop those neurons before fitting."
                )
            yield _Chunk(layer, start, stop, x_train, x_test)


# ----------------------------------------------------------------------------------------------
# Closed forms
# ----------------------------------------------------------------------------------------------


def _intercept_only_optimum(n1: int, n: int, alpha: float) -> float:
    """Minimiser of ``-loglik(b0) + alpha*|b0|`` for an intercept-only logistic model.

    KKT: ``n*sigmoid(b0) - n1 + alpha*sign(b0) = 0``, so ``b0 = 0`` iff ``|n1 - n/2| <= alpha``,
    else ``sigmoid(b0) = (n1 - alpha*s) / n`` with ``s = sign(n1 - n/2)``.
    """
    if abs(n1 - n / 2.0) <= alpha:
        return 0.0
    s = 1.0 if n1 > n / 2.0 else -1.0
    q = (n1 - alpha * s) / n
    if q <= 0.0 or q >= 1.0:  # penalty too weak for a one-class sample; cannot happen here
        return float("inf") * s
    return math.log(q) - math.log1p(-q)


def _wald(beta: np.ndarray, se: np.ndarray) -> np.ndarray:
    """statsmodels' two-sided normal Wald p-value ``2 * Phi(-|beta / se|)`` (NaN-propagating)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.abs(beta / se)
    return np.asarray(stats.norm.sf(z) * 2.0, dtype=np.float64)


# ----------------------------------------------------------------------------------------------
# Fast engine: proximal Newton over many neurons at once
# ----------------------------------------------------------------------------------------------


def _objective(
    u: torch.Tensor,
    b0: torch.Tensor,
    b1: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """Penalised objective per neuron from the signed margins ``u = s*(b0 + b1*x)``.

    With ``s_i = 1 - 2*y_i`` the loss term ``softplus(eta_i) - y_i*eta_i`` equals
    ``softplus(s_i*eta_i)``: a sum of non-negative terms, free of the cancellation that
    ``sum softplus(eta) - sum y*eta`` suffers for well-separated neurons.

    Parameters
    ----------
    u : torch.Tensor
        ``[m, n]`` signed margins.
    b0, b1 : torch.Tensor
        ``[m]`` coefficients (for the penalty).
    alpha : float
        L1 weight.
    """
    loss = F.softplus(u, beta=1.0, threshold=_SOFTPLUS_THRESHOLD).sum(dim=1)
    return loss + alpha * (b0.abs() + b1.abs())


def _margins(b0: torch.Tensor, b1: torch.Tensor, s: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Signed margins ``u = s*(b0 + b1*x) = b0*s + b1*xs``, ``[m, n]``."""
    return torch.addcmul(torch.outer(b0, s), b1[:, None], xs)


def _abs_change(b: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``|b + d| - |b|`` without cancellation when ``b + d`` keeps the sign of ``b``."""
    z = b + d
    return torch.where(b * z > 0, torch.sign(b) * d, z.abs() - b.abs())


def _lasso2(
    g0: torch.Tensor,
    g1: torch.Tensor,
    h00: torch.Tensor,
    xbar: torch.Tensor,
    spread: torch.Tensor,
    b0: torch.Tensor,
    b1: torch.Tensor,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact minimiser of the proximal Newton model, per neuron.

    Minimises ``q(d) = g.d + d'Hd/2 + alpha*|b + d|_1`` over the step ``d`` (2-vector per
    neuron), with the Hessian in the factored form ``H = [[h00, h00*xbar],
    [h00*xbar, spread + h00*xbar^2]]`` (``xbar = sum w x / sum w``,
    ``spread = sum w (x - xbar)^2``), so that ``d'Hd = h00*(d0 + xbar*d1)^2 + spread*d1^2``
    is never negative and ``det H = h00*spread`` is free of cancellation.

    The minimiser ``z = b + d`` of this 2-D lasso has one of four supports; on each support
    it is one of these candidates: ``z = 0``; ``z0 = 0`` and ``z1 = -soft(c1, alpha)/H11``;
    ``z1 = 0`` and ``z0 = -soft(c0, alpha)/H00``; ``z = b - H^-1 (g + alpha*s)`` for the four
    sign patterns ``s`` (``c = g - H b``).  Two coordinate-descent points (one coordinate kept,
    the other minimised exactly) are added as safe fallbacks.  Every candidate is a point of
    R^2, so the argmin of ``q`` over them is the global minimiser; no sign-consistency checks
    are needed and exact zeros come out naturally.

    Returns
    -------
    d0, d1 : torch.Tensor
        ``[m]`` step.
    delta : torch.Tensor
        ``[m]`` ``g.d + alpha*(|b+d|_1 - |b|_1)`` (clamped to <= 0), for the Armijo test.
    """
    h01 = h00 * xbar
    h11 = spread + h01 * xbar
    c0 = g0 - (h00 * b0 + h01 * b1)
    c1 = g1 - (h01 * b0 + h11 * b1)
    zero = torch.zeros_like(b0)
    # Candidates 0-2: z = 0, (0, z1), (z0, 0); 3-4: coordinate descent; 5-8: both non-zero.

    def soft(v: torch.Tensor) -> torch.Tensor:
        return torch.sign(v) * torch.clamp(v.abs() - alpha, min=0.0)

    # Steps d = z - b; the stepped candidates are built as steps (not points) for accuracy.
    d0_list = [-b0, -b0, -soft(c0) / h00 - b0, zero, -soft(c0 + h01 * b1) / h00 - b0]
    d1_list = [-b1, -soft(c1) / h11 - b1, -b1, -soft(c1 + h01 * b0) / h11 - b1, zero]
    for sign0 in (1.0, -1.0):
        for sign1 in (1.0, -1.0):
            r0 = g0 + alpha * sign0
            r1 = g1 + alpha * sign1
            step1 = -(r1 - xbar * r0) / spread
            d0_list.append(-r0 / h00 - xbar * step1)
            d1_list.append(step1)
    d0 = torch.stack(d0_list, dim=1)
    d1 = torch.stack(d1_list, dim=1)
    lin = (
        g0[:, None] * d0
        + g1[:, None] * d1
        + alpha * (_abs_change(b0[:, None], d0) + _abs_change(b1[:, None], d1))
    )
    quad = 0.5 * (h00[:, None] * (d0 + xbar[:, None] * d1) ** 2 + spread[:, None] * d1 * d1)
    q = lin + quad
    q = torch.where(torch.isfinite(q), q, torch.full_like(q, math.inf))
    best = torch.argmin(
        q, dim=1, keepdim=True
    )  # first minimum: zero-containing candidates win ties
    d0_best = d0.gather(1, best).squeeze(1)
    d1_best = d1.gather(1, best).squeeze(1)
    delta = lin.gather(1, best).squeeze(1)
    # delta <= 0 in exact arithmetic; a non-finite step can only come from overflow: stay put.
    bad = ~(torch.isfinite(d0_best) & torch.isfinite(d1_best) & torch.isfinite(delta))
    d0_best = torch.where(bad, 0.0, d0_best)
    d1_best = torch.where(bad, 0.0, d1_best)
    delta = torch.where(bad, 0.0, delta.clamp(max=0.0))
    return d0_best, d1_best, delta


@dataclass
class _SolveResult:
    b0: torch.Tensor
    b1: torch.Tensor
    h00: torch.Tensor
    xbar: torch.Tensor
    spread: torch.Tensor
    converged: torch.Tensor
    iterations: int


def _prox_newton(
    x: torch.Tensor,
    y: torch.Tensor,
    alpha: float,
    max_iter: int,
    kkt_tol: float,
) -> _SolveResult:
    """Solve ``min F(b)`` for every row of ``x`` (``[m, n]`` float64, non-constant rows).

    Proximal Newton with the exact 2-D lasso model (:func:`_lasso2`) and a per-neuron
    backtracking Armijo line search on the true objective.  A neuron is frozen once its KKT
    conditions hold:

    * ``b_j != 0``: ``|g_j + alpha*sign(b_j)| <= tol_j``;
    * ``b_j == 0``: ``|g_j| <= alpha + tol_j``;

    with ``g`` the gradient of ``-loglik`` and ``tol_j = kkt_tol*alpha + 64*eps*S_j`` where
    ``S_0 = n`` and ``S_1 = sum_i |x_i|`` bound the summands of ``g_0`` and ``g_1`` (so the
    second term is a floor at the gradient's rounding error).

    Parameters
    ----------
    x : torch.Tensor
        ``[m, n]`` float64 training activations, neurons-major.
    y : torch.Tensor
        ``[n]`` float64 0/1 labels.
    alpha, max_iter, kkt_tol
        See :func:`fit_neuron_logits`.
    """
    m, n = x.shape
    device = x.device
    s = 1.0 - 2.0 * y  # +1 for negatives, -1 for positives
    xs_all = x * s
    tol0 = kkt_tol * alpha + 64.0 * _EPS * n
    tol1_all = kkt_tol * alpha + 64.0 * _EPS * x.abs().sum(dim=1)

    out_b0 = torch.zeros(m, dtype=torch.float64, device=device)
    out_b1 = torch.zeros_like(out_b0)
    out_h00 = torch.zeros_like(out_b0)
    out_xbar = torch.zeros_like(out_b0)
    out_spread = torch.zeros_like(out_b0)
    out_conv = torch.zeros(m, dtype=torch.bool, device=device)

    # Working set (compacted as neurons converge).
    idx = torch.arange(m, device=device)
    xw, xsw, tol1 = x, xs_all, tol1_all
    b0 = torch.zeros(m, dtype=torch.float64, device=device)
    b1 = torch.zeros_like(b0)
    u = torch.zeros((m, n), dtype=torch.float64, device=device)
    fval = torch.full((m,), n * math.log(2.0), dtype=torch.float64, device=device)
    live = torch.ones(m, dtype=torch.bool, device=device)

    iteration = 0
    while True:
        # Residual p_i - y_i = s_i*sigmoid(u_i), accurate even where p_i is close to y_i.
        sig = torch.sigmoid(u)
        g0 = sig @ s
        g1 = torch.linalg.vecdot(sig, xsw)
        w = sig.mul_(1.0 - sig)  # in place: sig is not needed any more
        h00 = w.sum(dim=1)
        xbar = torch.where(h00 > 0, torch.linalg.vecdot(w, xw) / h00, 0.0)
        centred = xw - xbar[:, None]
        spread = torch.linalg.vecdot(w.mul_(centred), centred)
        del sig, w, centred

        r0 = torch.where(b0 != 0, (g0 + alpha * torch.sign(b0)).abs(), g0.abs() - alpha)
        r1 = torch.where(b1 != 0, (g1 + alpha * torch.sign(b1)).abs(), g1.abs() - alpha)
        done = live & (r0 <= tol0) & (r1 <= tol1)
        final = live if iteration >= max_iter else done
        if bool(final.any()):
            sel = idx[final]
            out_b0[sel] = b0[final]
            out_b1[sel] = b1[final]
            out_h00[sel] = h00[final]
            out_xbar[sel] = xbar[final]
            out_spread[sel] = spread[final]
            out_conv[sel] = done[final]
        live = live & ~final
        n_live = int(live.sum())
        if n_live == 0:
            break
        iteration += 1

        if n_live <= 0.7 * live.numel():  # compact the working set
            keep = live.nonzero().squeeze(1)
            idx, xw, xsw, u = idx[keep], xw[keep], xsw[keep], u[keep]
            tol1, b0, b1, fval = tol1[keep], b0[keep], b1[keep], fval[keep]
            g0, g1, h00, xbar, spread = g0[keep], g1[keep], h00[keep], xbar[keep], spread[keep]
            live = torch.ones(n_live, dtype=torch.bool, device=device)

        d0, d1, delta = _lasso2(g0, g1, h00, xbar, spread, b0, b1, alpha)
        d0 = torch.where(live, d0, 0.0)
        d1 = torch.where(live, d1, 0.0)
        delta = torch.where(live, delta, 0.0)
        # Objective differences below this are rounding noise (F is a sum of n non-negative
        # terms, each accurate to a few ulps): accept such steps.
        slack = 1e-13 * (1.0 + fval)

        t0, t1 = b0 + d0, b1 + d1
        u_t = _margins(t0, t1, s, xsw)
        f_t = _objective(u_t, t0, t1, alpha)
        ok = f_t <= fval + _ARMIJO * delta + slack
        if bool(ok.all()):
            b0, b1, u, fval = t0, t1, u_t, f_t
            continue

        # Backtrack the neurons whose full step failed.
        b0 = torch.where(ok, t0, b0)
        b1 = torch.where(ok, t1, b1)
        fval = torch.where(ok, f_t, fval)
        u = torch.where(ok[:, None], u_t, u)
        del u_t
        bad = (~ok).nonzero().squeeze(1)
        step = 1.0
        for _ in range(_MAX_HALVINGS):
            step *= 0.5
            tb0 = b0[bad] + step * d0[bad]
            tb1 = b1[bad] + step * d1[bad]
            u_b = _margins(tb0, tb1, s, xsw[bad])
            f_b = _objective(u_b, tb0, tb1, alpha)
            acc = f_b <= fval[bad] + _ARMIJO * step * delta[bad] + slack[bad]
            if bool(acc.any()):
                rows = bad[acc]
                b0[rows], b1[rows], fval[rows] = tb0[acc], tb1[acc], f_b[acc]
                u[rows] = u_b[acc]
                bad = bad[~acc]
            if bad.numel() == 0:
                break
        # Neurons still in `bad` made no progress; they will hit max_iter (converged=False).

    return _SolveResult(out_b0, out_b1, out_h00, out_xbar, out_spread, out_conv, iteration)


def _fit_chunk_fast(
    chunk: _Chunk,
    y_train: torch.Tensor,
    y_test: torch.Tensor,
    alpha: float,
    max_iter: int,
    kkt_tol: float,
) -> dict[str, np.ndarray]:
    """Fit every neuron of one chunk; return per-neuron numpy arrays ``[m]``."""
    x, xt = chunk.x_train, chunk.x_test
    m, n = x.shape
    device = x.device
    n1 = int(y_train.sum())
    const = x.amax(dim=1) == x.amin(dim=1)

    b0 = torch.full((m,), _intercept_only_optimum(n1, n, alpha), dtype=torch.float64, device=device)
    b1 = torch.zeros(m, dtype=torch.float64, device=device)
    se = torch.full((m,), math.nan, dtype=torch.float64, device=device)
    conv = torch.ones(m, dtype=torch.bool, device=device)

    fit_rows = (~const).nonzero().squeeze(1)
    iterations = 0
    if fit_rows.numel() > 0:
        x_fit = x if fit_rows.numel() == m else x[fit_rows]  # no copy in the usual case
        res = _prox_newton(x_fit, y_train, alpha, max_iter, kkt_tol)
        iterations = res.iterations
        b0[fit_rows], b1[fit_rows], conv[fit_rows] = res.b0, res.b1, res.converged
        # H = X'WX at the solution; det H = h00*spread, so [H^-1]_11 = 1/spread.
        var_both = 1.0 / res.spread  # both coefficients in the model
        var_slope_only = 1.0 / (res.spread + res.h00 * res.xbar**2)  # 1/H11: intercept is 0
        var = torch.where(res.b0 != 0, var_both, var_slope_only)
        se_fit = torch.where(res.b1 != 0, torch.sqrt(var), math.nan)
        se[fit_rows] = se_fit

    pred_train = torch.addcmul(b0[:, None], b1[:, None], x) > 0
    train_acc = 100.0 * (pred_train == (y_train > 0.5)).double().mean(dim=1)
    if xt.shape[1] > 0:
        pred_test = torch.addcmul(b0[:, None], b1[:, None], xt) > 0
        test_acc = 100.0 * (pred_test == (y_test > 0.5)).double().mean(dim=1)
    else:
        test_acc = torch.full((m,), math.nan, dtype=torch.float64, device=device)

    logger.debug(
        "layer %s neurons %d..%d: %d constant, %d iterations, %d not converged",
        chunk.layer,
        chunk.start,
        chunk.stop - 1,
        int(const.sum()),
        iterations,
        int((~conv).sum()),
    )
    return {
        "beta": b1.cpu().numpy(),
        "intercept": b0.cpu().numpy(),
        "beta_se": se.cpu().numpy(),
        "train_acc": train_acc.cpu().numpy(),
        "test_acc": test_acc.cpu().numpy(),
        "converged": conv.cpu().numpy(),
        "constant": const.cpu().numpy(),
    }


# ----------------------------------------------------------------------------------------------
# statsmodels engine: the notebook's call, neuron by neuron
# ----------------------------------------------------------------------------------------------


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
            counters["singular"] += 1
            model = sm.Logit(yf, exog)
            model.cov_params_func_l1 = _nan_safe_cov_l1
            result = model.fit_regularized(maxiter=3000, disp=0, method="l1", alpha=alpha)
    seen: set[str] = set()
    for item in caught:
        if issubclass(item.category, ModelWarning):
            name = (
                "ConvergenceWarning"
                if issubclass(item.category, ConvergenceWarning)
                else item.category.__name__
            )
            seen.add(name)
        else:
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
    for name in seen:
        counters[name] = counters.get(name, 0) + 1
    return result


def _fit_chunk_statsmodels(
    chunk: _Chunk,
    y_train: np.ndarray,
    y_test: np.ndarray,
    alpha: float,
    counters: dict[str, int],
) -> dict[str, np.ndarray]:
    """Run ``sm.Logit(...).fit_regularized(method='l1')`` for every neuron of one chunk."""
    import statsmodels.api as sm

    x_train = chunk.x_train.cpu().numpy()
    x_test = chunk.x_test.cpu().numpy()
    m, n = x_train.shape
    n1 = int(y_train.sum())
    yf = y_train.astype(np.float64)
    out = {
        "beta": np.zeros(m),
        "intercept": np.zeros(m),
        "beta_se": np.full(m, np.nan),
        "train_acc": np.zeros(m),
        "test_acc": np.full(m, np.nan),
        "converged": np.ones(m, dtype=bool),
        "constant": np.zeros(m, dtype=bool),
    }
    for j in range(m):
        xtr, xte = x_train[j], x_test[j]
        if xtr.max() == xtr.min():
            b0, b1 = _intercept_only_optimum(n1, n, alpha), 0.0
            out["constant"][j] = True
            pred_tr = np.full(n, b0 > 0)
            pred_te = np.full(xte.shape[0], b0 > 0)
        else:
            # The notebook's add_constant(x) on the full x; x is not constant, so this adds it.
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
    return out


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def _default_chunk_size(n_contexts: int, memory_bytes: float) -> int:
    """Neurons per chunk so that the solver's float64 work arrays fit in ``memory_bytes``."""
    per_neuron = 8.0 * _WORK_ARRAYS * max(n_contexts, 1)
    return max(1, int(memory_bytes // per_neuron))


def fit_neuron_logits(
    activations: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    *,
    alpha: float = 0.1,
    test_size: float = 0.2,
    seed: int = 0,
    train_mask: np.ndarray | None = None,
    engine: str = "fast",
    chunk_size: int | None = None,
    max_iter: int = 200,
    kkt_tol: float = 1e-9,
) -> NeuronFits:
    """Fit one L1-penalised logistic regression ``labels ~ 1 + x`` per neuron.

    Minimises ``-loglik(b0, b1) + alpha*(|b0| + |b1|)`` on the training contexts, the objective
    of the notebook's ``sm.Logit(y, add_constant(x)).fit_regularized(method="l1", alpha=alpha)``.

    Parameters
    ----------
    activations : np.ndarray or torch.Tensor
        Real ``[contexts, neurons]`` or ``[layers, contexts, neurons]``; any float dtype; a
        read-only ``np.memmap`` is fine (read chunk by chunk); a torch tensor is processed on its
        own device.
    labels : np.ndarray or torch.Tensor
        bool or 0/1 ``[contexts]``, True = positive class.
    alpha : float, default 0.1
        L1 weight on the summed negative log-likelihood (statsmodels' ``alpha``).
    test_size : float, default 0.2
        Held-out fraction for :func:`stratified_train_mask` (ignored if ``train_mask`` given).
    seed : int, default 0
        Seed of :func:`stratified_train_mask` (ignored if ``train_mask`` given).
    train_mask : np.ndarray, optional
        bool ``[contexts]`` (True = train): the split shared by all neurons.
    engine : {"fast", "statsmodels"}, default "fast"
        ``"fast"``: exact vectorised proximal Newton solver in torch float64 (true optimum;
        zeros exactly where the optimum is zero).  ``"statsmodels"``: the notebook's
        statsmodels call per neuron on the same split (slow, ~ms per neuron; SLSQP may stop
        early and trim slopes that are non-zero at the optimum).
    chunk_size : int, optional
        Neurons solved at once (fast engine).  Default: as many as keep the solver's work
        arrays near 256 MB.
    max_iter : int, default 200
        Proximal Newton iteration cap (fast engine); neurons hitting it get
        ``converged=False`` and a warning is logged.
    kkt_tol : float, default 1e-9
        KKT tolerance relative to ``alpha`` (fast engine): the optimality residual of each
        coefficient's gradient must be below ``kkt_tol*alpha`` plus a floor at its rounding
        error, ``64*eps*sum_i |summand_i|``.

    Returns
    -------
    NeuronFits
        Arrays shaped ``[neurons]`` or ``[layers, neurons]``.

    Raises
    ------
    FitInputError
        (a ``ValueError``) on mismatched shapes, non-binary labels, a class absent from the training split,
        non-finite activations, or an unknown engine.
    """
    if engine not in ("fast", "statsmodels"):
        raise FitInputError(f"engine must be 'fast' or 'statsmodels', got {engine!r}.")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise FitInputError(f"alpha must be a positive finite number, got {alpha!r}.")
    if max_iter < 1:
        raise FitInputError(f"max_iter must be >= 1, got {max_iter}.")
    alpha = float(alpha)

    n_contexts, neurons, layers = _check_activations(activations)
    y = _labels_to_bool(labels)
    if y.shape[0] != n_contexts:
        raise FitInputError(
            f"labels have {y.shape[0]} entries but activations have {n_contexts} contexts "
            f"(activations shape {tuple(activations.shape)}; contexts are axis "
            f"{0 if layers is None else 1}); pass one label per context."
        )
    if train_mask is None:
        mask = stratified_train_mask(y, test_size=test_size, seed=seed)
    else:
        mask = _check_train_mask(train_mask, y)
    y_tr, y_te = y[mask], y[~mask]
    if y_tr.all() or not y_tr.any():
        absent = "negative (False)" if y_tr.all() else "positive (True)"
        raise FitInputError(
            f"the training split has no {absent} labels ({y_tr.size} training contexts); "
            "both classes must be present: use a stratified train_mask or more contexts."
        )
    train_idx = np.flatnonzero(mask)
    test_idx = np.flatnonzero(~mask)
    if chunk_size is None:
        chunk_size = _default_chunk_size(train_idx.size, 256e6)
    if chunk_size < 1:
        raise FitInputError(f"chunk_size must be >= 1, got {chunk_size}.")

    device = activations.device if isinstance(activations, torch.Tensor) else torch.device("cpu")
    y_train_t = torch.as_tensor(y_tr, dtype=torch.float64, device=device)
    y_test_t = torch.as_tensor(y_te, dtype=torch.float64, device=device)

    out_shape = (neurons,) if layers is None else (layers, neurons)
    names = ("beta", "intercept", "beta_se", "train_acc", "test_acc", "converged", "constant")
    results: dict[str, np.ndarray] = {
        name: np.zeros(out_shape, dtype=bool if name in ("converged", "constant") else np.float64)
        for name in names
    }
    counters = {"singular": 0}
    chunks = _iter_chunks(activations, layers, neurons, train_idx, test_idx, chunk_size)
    with torch.no_grad():
        for chunk in chunks:
            if engine == "fast":
                part = _fit_chunk_fast(chunk, y_train_t, y_test_t, alpha, max_iter, kkt_tol)
            else:
                part = _fit_chunk_statsmodels(chunk, y_tr, y_te, alpha, counters)
            for name in names:
                target = results[name] if chunk.layer is None else results[name][chunk.layer]
                target[chunk.start : chunk.stop] = part[name]

    total = int(np.prod(out_shape))
    n_bad = int((~results["converged"]).sum())
    if n_bad:
        what = f"max_iter={max_iter} iterations" if engine == "fast" else "statsmodels"
        logger.warning(
            "%d of %d neurons did not converge (%s); see NeuronFits.converged", n_bad, total, what
        )
    if engine == "statsmodels":
        singular = counters.pop("singular")
        if singular:
            logger.warning(
                "statsmodels' Hessian was singular for %d of %d neurons: their beta_se and "
                "pvalue are NaN",
                singular,
                total,
            )
        if counters:
            logger.info(
                "statsmodels warnings suppressed (neurons affected of %d): %s",
                total,
                ", ".join(f"{name} {count}" for name, count in sorted(counters.items())),
            )
    logger.info(
        "fitted %d neurons (%s engine): %d constant, %d with non-zero slope",
        total,
        engine,
        int(results["constant"].sum()),
        int((results["beta"] != 0).sum()),
    )
    return NeuronFits(
        beta=results["beta"],
        intercept=results["intercept"],
        beta_se=results["beta_se"],
        pvalue=_wald(results["beta"], results["beta_se"]),
        train_acc=results["train_acc"],
        test_acc=results["test_acc"],
        converged=results["converged"],
        constant=results["constant"],
        train_mask=mask,
        alpha=alpha,
    )
