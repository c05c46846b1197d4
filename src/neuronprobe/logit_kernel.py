"""Compiled CPU kernel of the per-neuron logistic regressions (the statistics stage's engine).

:func:`fit_layer` fits every neuron (column) of one layer's activations ``[contexts, neurons]``
in one call: the L1-penalised logit of the notebook (the true optimum of
``-loglik(b0, b1) + alpha*(|b0| + |b1|)``), the unpenalised logit for the likelihood-ratio test,
the training and held-out accuracies and the held-out ROC AUC of the activation.

Why a compiled kernel: each neuron is a tiny problem (a few hundred contexts, two coefficients)
that a Newton method solves in ~5 passes over its data.  Batched array code pays for every
pass with memory traffic over all neurons; here each neuron's training values are gathered once
into a contiguous buffer that stays in the L1 cache for all its passes, and neurons run in
parallel over the cores (``numba.prange``).

Three details keep the passes fast, exact to float64 rounding and reproducible:

* ``exp`` and ``log1p`` are evaluated with polynomial code the compiler vectorises (numba's
  ``math.exp`` is a scalar library call, ~4x slower here): ``exp(-a)`` by Cody-Waite range
  reduction and a degree-13 Taylor polynomial (|r| <= ln2/2, error < 2e-16 relative), the
  power of two built from its bits; ``log1p(e)`` for ``e`` in [0, 1] as ``2*atanh(e/(2+e))``
  (17 series terms, error < 1e-16 relative).
* Every sum is taken in a fixed order (four interleaved partial sums, no fast-math
  reassociation), so a kernel compiled afresh and the same kernel loaded from numba's cache
  give the same bits.
* The Hessian is kept in the factored form ``h00 = sum w``, ``xbar = sum w x / h00``,
  ``spread = sum w (x - xbar)^2`` computed from values centred at their mean, so that
  ``det H = h00*spread`` has no cancellation even for neurons with a large offset.

The optimiser is a proximal Newton method on the two coefficients: at each step the quadratic
model plus the L1 term is minimised exactly (:func:`_lasso2`, a closed form over the possible
supports), followed by an Armijo backtracking line search on the true objective.  A neuron stops
when its KKT conditions hold: ``|g_j + alpha*sign(b_j)| <= tol_j`` for ``b_j != 0`` and
``|g_j| <= alpha + tol_j`` for ``b_j == 0``, with ``tol_j = kkt_tol*alpha`` plus a floor at the
gradient's rounding error (``64*eps*sum_i |summand_i|``).  Coefficients are exactly zero where
the optimum is zero.

References: J. D. Lee, Y. Sun, M. A. Saunders, "Proximal Newton-type methods for minimizing
composite functions", SIAM J. Optim. 24 (2014); W. J. Cody, W. Waite, "Software Manual for the
Elementary Functions" (1980).
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np

__all__ = ["LAYER_OUTPUTS", "fit_layer"]

_EPS = float(np.finfo(np.float64).eps)
_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_TWO52 = 4503599627370496.0  # 2**52: (2**52 + k) has the integer k in its low mantissa bits
_EXP_BIAS_BITS = 0x4330000000000000  # bit pattern of the double 2**52
_ARMIJO = 1e-4
_MAX_HALVINGS = 60
_NEURONS_PER_BLOCK = 16  # 16 float32 = one 64-byte cache line per context row when gathering
#: Gradient tolerance of the unpenalised fit: its log-likelihood is then exact to ~1e-12.
_MLE_TOL = 1e-7
#: Newton decrement below which the next unpenalised pass also computes the log-likelihood.
_LAST_STEP_DECREMENT = 1e-6

# Fast-math flags without 'reassoc' (or 'arcp'): Cody-Waite's two-part subtraction would lose
# its accuracy, and a reduction the compiler may reassociate is summed in an order that depends
# on how the code around it was compiled: a function compiled afresh (a cold numba cache) and
# the same function loaded from the cache gave results that differ in the last bits, so the
# first run on a machine did not reproduce the next. Sums are written with four interleaved
# partial sums instead (:func:`_sum`): a fixed order, and still four independent chains.
_ELEMENTWISE = {"nnan", "ninf", "nsz", "contract"}
_JIT: dict[str, Any] = {"error_model": "numpy", "cache": True, "nogil": True}

#: Names and dtypes of the per-neuron arrays returned by :func:`fit_layer`.
LAYER_OUTPUTS: dict[str, type] = {
    "beta": np.float64,
    "intercept": np.float64,
    "h00": np.float64,  # Hessian of -loglik at the L1 optimum, factored (see module docs)
    "xbar": np.float64,
    "spread": np.float64,
    "converged": np.bool_,
    "constant": np.bool_,
    "iterations": np.int32,
    "train_correct": np.int32,
    "test_correct": np.int32,
    "loglik": np.float64,  # maximised unpenalised log-likelihood (supremum under separation)
    "separated": np.bool_,  # the training classes are perfectly separated by the neuron
    "lr_converged": np.bool_,
    "test_auc_raw": np.float64,  # held-out AUC of the activation itself (higher -> positive)
    "finite": np.bool_,  # all the neuron's values are finite (else nothing else is filled in)
}


# ----------------------------------------------------------------------------------------------
# Vectorised passes over one neuron's values
# ----------------------------------------------------------------------------------------------


@numba.njit(fastmath=_ELEMENTWISE, **_JIT)
def _exp_neg_abs(x: np.ndarray, b0: float, b1: float, e: np.ndarray, scale: np.ndarray) -> None:
    """``exp(-|b0 + b1*x_i|) = e_i * scale_i`` (``scale`` holds 2**-k as int bits, see below)."""
    for i in range(x.shape[0]):
        a = abs(b0 + b1 * x[i])
        a = a if a < 700.0 else 700.0
        k = np.floor(a * _LOG2E + 0.5)
        r = -((a - k * _LN2_HI) - k * _LN2_LO)  # |r| <= ln2/2
        p = 1.0 / 6227020800.0
        p = p * r + 1.0 / 479001600.0
        p = p * r + 1.0 / 39916800.0
        p = p * r + 1.0 / 3628800.0
        p = p * r + 1.0 / 362880.0
        p = p * r + 1.0 / 40320.0
        p = p * r + 1.0 / 5040.0
        p = p * r + 1.0 / 720.0
        p = p * r + 1.0 / 120.0
        p = p * r + 1.0 / 24.0
        p = p * r + 1.0 / 6.0
        p = p * r + 0.5
        p = p * r + 1.0
        p = p * r + 1.0
        e[i] = p
        scale[i] = (1023.0 - k) + _TWO52  # integer 1023-k in the low bits of the mantissa


@numba.njit(**_JIT)
def _power_of_two(scale: np.ndarray) -> None:
    """Turn ``2**52 + (1023-k)`` into the double ``2**-k``, in place, by moving the bits."""
    bits = scale.view(np.int64)
    for i in range(bits.shape[0]):
        bits[i] = (bits[i] - _EXP_BIAS_BITS) << 52


@numba.njit(fastmath=_ELEMENTWISE, **_JIT)
def _loss_terms(
    x: np.ndarray, y: np.ndarray, b0: float, b1: float, e: np.ndarray, scale: np.ndarray
) -> None:
    """``scale_i <- ee_i = exp(-|eta_i|) = e_i * scale_i`` and ``e_i <- softplus(eta_i) -
    y_i eta_i``, the context's share of ``-loglik``."""
    for i in range(x.shape[0]):
        eta = b0 + b1 * x[i]
        yi = y[i]
        ee = e[i] * scale[i]
        scale[i] = ee
        # log1p(ee) = 2*atanh(t), t = ee/(2 + ee) in [0, 1/3]
        t = ee / (2.0 + ee)
        z = t * t
        c = 1.0 / 35.0
        c = c * z + 1.0 / 33.0
        c = c * z + 1.0 / 31.0
        c = c * z + 1.0 / 29.0
        c = c * z + 1.0 / 27.0
        c = c * z + 1.0 / 25.0
        c = c * z + 1.0 / 23.0
        c = c * z + 1.0 / 21.0
        c = c * z + 1.0 / 19.0
        c = c * z + 1.0 / 17.0
        c = c * z + 1.0 / 15.0
        c = c * z + 1.0 / 13.0
        c = c * z + 1.0 / 11.0
        c = c * z + 1.0 / 9.0
        c = c * z + 1.0 / 7.0
        c = c * z + 1.0 / 5.0
        c = c * z + 1.0 / 3.0
        c = c * z + 1.0
        # softplus(eta) - y*eta = max(eta, 0) - y*eta + log1p(exp(-|eta|)), both parts >= 0
        linear = (1.0 - yi) * eta if eta >= 0.0 else -yi * eta
        e[i] = linear + 2.0 * t * c


@numba.njit(fastmath=_ELEMENTWISE, **_JIT)
def _residuals_and_weights(
    x: np.ndarray, y: np.ndarray, b0: float, b1: float, ee: np.ndarray, r: np.ndarray
) -> None:
    """From ``ee_i = exp(-|eta_i|)``: ``r_i = p_i - y_i`` (``p = sigmoid(eta)``, without
    cancellation) and, in place of ``ee_i``, ``w_i = p_i (1 - p_i) = ee_i / (1 + ee_i)^2``."""
    for i in range(x.shape[0]):
        inv = 1.0 / (1.0 + ee[i])
        pos = b0 + b1 * x[i] >= 0.0
        p = (1.0 if pos else ee[i]) * inv  # sigmoid(eta)
        q = (ee[i] if pos else 1.0) * inv  # 1 - sigmoid(eta)
        r[i] = q * -1.0 if y[i] > 0.5 else p
        ee[i] = ee[i] * inv * inv


@numba.njit(fastmath=_ELEMENTWISE, **_JIT)
def _exp_products(e: np.ndarray, scale: np.ndarray) -> None:
    """``scale_i <- exp(-|eta_i|) = e_i * scale_i``, in place."""
    for i in range(e.shape[0]):
        scale[i] = e[i] * scale[i]


@numba.njit(fastmath=_ELEMENTWISE, **_JIT)
def _sum(v: np.ndarray) -> float:
    """``sum v`` in a fixed order (four interleaved partial sums): the same bits however the
    code around it is compiled (see ``_ELEMENTWISE``)."""
    n = v.shape[0]
    m = n - n % 4
    a0 = 0.0
    a1 = 0.0
    a2 = 0.0
    a3 = 0.0
    for i in range(0, m, 4):
        a0 += v[i]
        a1 += v[i + 1]
        a2 += v[i + 2]
        a3 += v[i + 3]
    for i in range(m, n):
        a0 += v[i]
    return (a0 + a1) + (a2 + a3)


@numba.njit(fastmath=_ELEMENTWISE, **_JIT)
def _moments(v: np.ndarray, x: np.ndarray, absolute: bool) -> tuple[float, float, float]:
    """``(sum v, sum v x, sum |v x|)`` (``absolute``) or ``(sum v, sum v x, sum v x^2)``, each
    in the fixed order of :func:`_sum`."""
    if absolute:
        return _lane_moments(v, x, True)
    return _lane_moments(v, x, False)


@numba.njit(fastmath=_ELEMENTWISE, **_JIT)
def _lane_moments(v: np.ndarray, x: np.ndarray, absolute: bool) -> tuple[float, float, float]:
    n = v.shape[0]
    m = n - n % 4
    a0 = a1 = a2 = a3 = 0.0
    b0 = b1 = b2 = b3 = 0.0
    c0 = c1 = c2 = c3 = 0.0
    for i in range(0, m, 4):
        v0 = v[i]
        v1 = v[i + 1]
        v2 = v[i + 2]
        v3 = v[i + 3]
        x0 = v0 * x[i]
        x1 = v1 * x[i + 1]
        x2 = v2 * x[i + 2]
        x3 = v3 * x[i + 3]
        a0 += v0
        a1 += v1
        a2 += v2
        a3 += v3
        b0 += x0
        b1 += x1
        b2 += x2
        b3 += x3
        c0 += abs(x0) if absolute else x0 * x[i]
        c1 += abs(x1) if absolute else x1 * x[i + 1]
        c2 += abs(x2) if absolute else x2 * x[i + 2]
        c3 += abs(x3) if absolute else x3 * x[i + 3]
    for i in range(m, n):
        xi = v[i] * x[i]
        a0 += v[i]
        b0 += xi
        c0 += abs(xi) if absolute else xi * x[i]
    return (a0 + a1) + (a2 + a3), (b0 + b1) + (b2 + b3), (c0 + c1) + (c2 + c3)


@numba.njit(**_JIT)
def _sums(
    x: np.ndarray, y: np.ndarray, b0: float, b1: float, e: np.ndarray, scale: np.ndarray
) -> tuple[float, float, float, float, float, float, float]:
    """One pass at ``(b0, b1)``: loss, gradient and Hessian sums of ``-loglik``.

    ``x`` is centred (the caller's ``b0`` is the intercept *for centred x*); ``e`` and
    ``scale`` hold :func:`_exp_neg_abs`'s factors and are overwritten.  Returns
    ``(loss, g0, g1, s0, s1, s2, abs_g1)``: ``loss = -loglik``, ``g = sum (p - y) [1, x]``,
    ``s_k = sum w x^k`` with ``w = p (1 - p)``, and ``abs_g1 = sum |(p - y) x|``.
    """
    _loss_terms(x, y, b0, b1, e, scale)  # scale: exp(-|eta|); e: the loss terms
    loss = _sum(e)
    g0, g1, s0, s1, s2, abs_g1 = _grad_sums_of(x, y, b0, b1, scale, e)
    return loss, g0, g1, s0, s1, s2, abs_g1


@numba.njit(**_JIT)
def _grad_sums(
    x: np.ndarray, y: np.ndarray, b0: float, b1: float, e: np.ndarray, scale: np.ndarray
) -> tuple[float, float, float, float, float, float, float]:
    """:func:`_sums` without the loss (the log-likelihood's ``log1p``): ``loss`` is NaN."""
    _exp_products(e, scale)
    g0, g1, s0, s1, s2, abs_g1 = _grad_sums_of(x, y, b0, b1, scale, e)
    return math.nan, g0, g1, s0, s1, s2, abs_g1


@numba.njit(**_JIT)
def _grad_sums_of(
    x: np.ndarray, y: np.ndarray, b0: float, b1: float, ee: np.ndarray, work: np.ndarray
) -> tuple[float, float, float, float, float, float]:
    """``(g0, g1, s0, s1, s2, abs_g1)`` from ``ee = exp(-|eta|)`` (overwritten, as ``work``).

    Element-wise passes, then sums in a fixed order: a reduction the compiler may reassociate
    gives other bits when the same code is compiled again (a cold numba cache) than when it is
    loaded from the cache, and the run's results must not depend on that.
    """
    _residuals_and_weights(x, y, b0, b1, ee, work)
    g0, g1, abs_g1 = _moments(work, x, True)
    s0, s1, s2 = _moments(ee, x, False)
    return g0, g1, s0, s1, s2, abs_g1


@numba.njit(**_JIT)
def _evaluate(
    x: np.ndarray,
    y: np.ndarray,
    b0: float,
    b1: float,
    e: np.ndarray,
    scale: np.ndarray,
    with_loss: bool,
) -> tuple[float, float, float, float, float, float, float]:
    """:func:`_sums` (``with_loss``) or :func:`_grad_sums` at ``(b0, b1)``, centred ``x``."""
    _exp_neg_abs(x, b0, b1, e, scale)
    _power_of_two(scale)
    if with_loss:
        return _sums(x, y, b0, b1, e, scale)
    return _grad_sums(x, y, b0, b1, e, scale)


# ----------------------------------------------------------------------------------------------
# Scalar pieces of the solvers
# ----------------------------------------------------------------------------------------------


@numba.njit(**_JIT)
def _abs_change(b: float, d: float) -> float:
    """``|b + d| - |b|`` without cancellation when ``b + d`` keeps the sign of ``b``."""
    z = b + d
    if b * z > 0.0:
        return d if b > 0.0 else -d
    return abs(z) - abs(b)


@numba.njit(**_JIT)
def _soft(v: float, alpha: float) -> float:
    if v > alpha:
        return v - alpha
    if v < -alpha:
        return v + alpha
    return 0.0


@numba.njit(**_JIT)
def _lasso2(
    g0: float,
    g1: float,
    h00: float,
    xbar: float,
    spread: float,
    b0: float,
    b1: float,
    alpha: float,
) -> tuple[float, float, float]:
    """Exact minimiser ``d`` of ``q(d) = g.d + d'Hd/2 + alpha*|b + d|_1`` (original coordinates).

    ``H = [[h00, h00*xbar], [h00*xbar, spread + h00*xbar^2]]``, so ``d'Hd = h00*(d0 +
    xbar*d1)^2 + spread*d1^2``.  The minimiser ``z = b + d`` lies on one of four supports and
    on each is one of these candidates: ``z = 0``; ``(0, z1)`` and ``(z0, 0)`` by soft
    thresholding; ``b - H^-1 (g + alpha*s)`` for the four sign patterns ``s``; two
    coordinate-descent points as safe fallbacks.  All candidates are points of R^2, so the
    smallest ``q`` among them is the global minimum; zero-containing candidates come first and
    win ties, so zeros come out exactly.

    Returns ``(d0, d1, delta)`` with ``delta = g.d + alpha*(|b+d|_1 - |b|_1) <= 0``.
    """
    h01 = h00 * xbar
    h11 = spread + h01 * xbar
    c0 = g0 - (h00 * b0 + h01 * b1)
    c1 = g1 - (h01 * b0 + h11 * b1)
    best_q = math.inf
    best_d0 = 0.0
    best_d1 = 0.0
    best_lin = 0.0
    for cand in range(9):
        if cand == 0:
            d0, d1 = -b0, -b1
        elif cand == 1:
            d0, d1 = -b0, -_soft(c1, alpha) / h11 - b1
        elif cand == 2:
            d0, d1 = -_soft(c0, alpha) / h00 - b0, -b1
        elif cand == 3:
            d0, d1 = 0.0, -_soft(c1 + h01 * b0, alpha) / h11 - b1
        elif cand == 4:
            d0, d1 = -_soft(c0 + h01 * b1, alpha) / h00 - b0, 0.0
        else:
            sign0 = 1.0 if cand < 7 else -1.0  # 5: (+, +), 6: (+, -), 7: (-, +), 8: (-, -)
            sign1 = 1.0 if cand % 2 == 1 else -1.0
            r0 = g0 + alpha * sign0
            r1 = g1 + alpha * sign1
            d1 = -(r1 - xbar * r0) / spread
            d0 = -r0 / h00 - xbar * d1
        lin = g0 * d0 + g1 * d1 + alpha * (_abs_change(b0, d0) + _abs_change(b1, d1))
        u = d0 + xbar * d1
        q = lin + 0.5 * (h00 * u * u + spread * d1 * d1)
        if math.isfinite(q) and q < best_q:
            best_q, best_d0, best_d1, best_lin = q, d0, d1, lin
    if not (math.isfinite(best_d0) and math.isfinite(best_d1) and math.isfinite(best_lin)):
        return 0.0, 0.0, 0.0
    return best_d0, best_d1, min(best_lin, 0.0)


@numba.njit(**_JIT)
def intercept_only_optimum(n1: int, n: int, alpha: float) -> float:
    """Minimiser of ``-loglik(b0) + alpha*|b0|`` for ``n1`` positives among ``n`` contexts.

    KKT: ``n*sigmoid(b0) - n1 + alpha*sign(b0) = 0``, so ``b0 = 0`` iff ``|n1 - n/2| <= alpha``,
    else ``sigmoid(b0) = (n1 - alpha*s) / n`` with ``s = sign(n1 - n/2)``.
    """
    if abs(n1 - n / 2.0) <= alpha:
        return 0.0
    s = 1.0 if n1 > n / 2.0 else -1.0
    q = (n1 - alpha * s) / n
    if q <= 0.0 or q >= 1.0:
        return math.inf * s
    return math.log(q) - math.log1p(-q)


@numba.njit(**_JIT)
def _factor(s0: float, s1: float, s2: float, centre: float) -> tuple[float, float, float]:
    """``(h00, xbar, spread)`` in original coordinates from sums over centred values."""
    if s0 <= 0.0:
        return 0.0, centre, 0.0
    mean_c = s1 / s0
    spread = s2 - s1 * mean_c
    if spread < 0.0:
        spread = 0.0
    return s0, mean_c + centre, spread


@numba.njit(**_JIT)
def _kkt_residuals(g0: float, g1: float, b0: float, b1: float, alpha: float) -> tuple[float, float]:
    """Optimality residuals: ``|g_j + alpha*sign(b_j)|`` if ``b_j != 0`` else ``|g_j| - alpha``."""
    r0 = abs(g0 + (alpha if b0 > 0 else -alpha)) if b0 != 0.0 else abs(g0) - alpha
    r1 = abs(g1 + (alpha if b1 > 0 else -alpha)) if b1 != 0.0 else abs(g1) - alpha
    return r0, r1


@numba.njit(**_JIT)
def _solve_l1(
    xc: np.ndarray,
    y: np.ndarray,
    centre: float,
    n1: int,
    alpha: float,
    max_iter: int,
    kkt_tol: float,
    sum_abs_x: float,
    x_rms: float,
    start: tuple[float, float, float, float, float, float],
    e: np.ndarray,
    scale: np.ndarray,
) -> tuple[float, float, float, float, float, float, float, float, bool, int]:
    """Proximal Newton for ``min -loglik + alpha*(|b0| + |b1|)`` of one neuron.

    ``xc = x - centre``; coefficients are in original coordinates (``eta = b0 + b1*x``) and the
    passes evaluate ``eta = (b0 + b1*centre) + b1*xc``.  ``start`` holds the sums of
    :func:`_grad_sums` at the starting point ``(intercept-only optimum, 0)``.

    Step acceptance: a full step is taken without evaluating the objective when it halves the
    smallest KKT residual seen so far (the residual then tends to 0, so the iterates converge
    to the optimum); otherwise an Armijo backtracking search on the true objective decides.
    The Armijo path alone is the classical globally convergent proximal Newton method (Lee,
    Sun and Saunders 2014); the shortcut only saves the objective's ``log1p`` on steps that are
    already making fast progress.

    Returns ``(b0, b1, g0, gc, s0, s1, s2, abs_gc, converged, iterations)``: the solution and
    the sums of :func:`_grad_sums` there (centred coordinates).
    """
    n = xc.shape[0]
    tol0 = kkt_tol * alpha + 64.0 * _EPS * n
    b0 = intercept_only_optimum(n1, n, alpha)
    b1 = 0.0
    g0, gc, s0, s1, s2, abs_gc = start
    fval = math.nan  # objective at (b0, b1), evaluated only when a line search needs it
    best_residual = math.inf
    iterations = 0
    converged = False
    while True:
        g1 = gc + centre * g0  # gradient for the original x = xc + centre
        tol1 = kkt_tol * alpha + 64.0 * _EPS * max(sum_abs_x, abs_gc + abs(centre) * n)
        r0, r1 = _kkt_residuals(g0, g1, b0, b1, alpha)
        if r0 <= tol0 and r1 <= tol1:
            converged = True
            break
        residual = max(r0, r1 / x_rms)
        if iterations >= max_iter:
            break
        iterations += 1
        h00, xbar, spread = _factor(s0, s1, s2, centre)
        d0, d1, delta = _lasso2(g0, g1, h00, xbar, spread, b0, b1, alpha)
        if d0 == 0.0 and d1 == 0.0:
            break  # no model step: stuck at rounding level
        t0 = b0 + d0
        t1 = b1 + d1
        loss_t, g0_t, gc_t, s0_t, s1_t, s2_t, abs_t = _evaluate(
            xc, y, t0 + t1 * centre, t1, e, scale, False
        )
        r0_t, r1_t = _kkt_residuals(g0_t, gc_t + centre * g0_t, t0, t1, alpha)
        residual_t = max(max(r0_t, r1_t / x_rms), 0.0)
        best_residual = min(best_residual, max(residual, 0.0))
        if residual_t <= 0.5 * best_residual:
            b0, b1, fval = t0, t1, math.nan
            g0, gc, s0, s1, s2, abs_gc = g0_t, gc_t, s0_t, s1_t, s2_t, abs_t
            best_residual = residual_t
            continue
        # Armijo backtracking on the objective.
        if math.isnan(fval):
            fval = _evaluate(xc, y, b0 + b1 * centre, b1, e, scale, True)[0]
            fval += alpha * (abs(b0) + abs(b1))
        # Objective differences below this are rounding noise (a sum of n non-negative terms).
        slack = 1e-13 * (1.0 + fval)
        step = 1.0
        accepted = False
        for _ in range(_MAX_HALVINGS):
            t0 = b0 + step * d0
            t1 = b1 + step * d1
            loss_t, g0_t, gc_t, s0_t, s1_t, s2_t, abs_t = _evaluate(
                xc, y, t0 + t1 * centre, t1, e, scale, True
            )
            f_t = loss_t + alpha * (abs(t0) + abs(t1))
            if f_t <= fval + _ARMIJO * step * delta + slack:
                b0, b1, fval = t0, t1, f_t
                g0, gc, s0, s1, s2, abs_gc = g0_t, gc_t, s0_t, s1_t, s2_t, abs_t
                accepted = True
                break
            step *= 0.5
        if not accepted:
            break
    return b0, b1, g0, gc, s0, s1, s2, abs_gc, converged, iterations


@numba.njit(**_JIT)
def _solve_mle(
    xc: np.ndarray,
    y: np.ndarray,
    a0: float,
    b1: float,
    start: tuple[float, float, float, float, float, float],
    tol: float,
    x_rms: float,
    max_iter: int,
    e: np.ndarray,
    scale: np.ndarray,
) -> tuple[float, bool]:
    """Maximise the unpenalised log-likelihood of ``y ~ 1 + xc`` by damped Newton from ``(a0, b1)``.

    ``start`` holds the sums of :func:`_grad_sums` at the starting point (the L1 optimum, in
    centred coordinates).  Steps are accepted as in :func:`_solve_l1` (halved gradient norm, or
    Armijo on the log-likelihood).  Returns ``(loglik, converged)``.  Without a finite maximum
    (quasi-complete separation) the log-likelihood still increases monotonically towards its
    supremum; the value reached after ``max_iter`` steps is returned with ``converged=False``
    (a slightly conservative test).
    """
    n = xc.shape[0]
    g0, g1, s0, s1, s2, abs_g1 = start
    loss = math.nan
    best_residual = math.inf
    converged = False
    for _ in range(max_iter + 1):
        # The slope's gradient is in units of x: its tolerance scales with the values' RMS,
        # so that the test does not depend on the activations' scale.
        floor1 = 64.0 * _EPS * abs_g1
        if abs(g0) <= tol + 64.0 * _EPS * n and abs(g1) <= tol * x_rms + floor1:
            converged = True
            break
        if s0 <= 0.0:
            break
        mean = s1 / s0
        spread = s2 - s1 * mean
        if not spread > 0.0:
            break
        # Newton step in centred coordinates: H = [[s0, s1], [s1, s2]].
        d1 = -(g1 - mean * g0) / spread
        d0 = -g0 / s0 - mean * d1
        slope = g0 * d0 + g1 * d1
        if not slope < 0.0:
            break
        scale1 = math.sqrt(s2 / s0) if s2 > 0.0 else 1.0
        best_residual = min(best_residual, max(abs(g0), abs(g1) / scale1))
        # A small Newton decrement (-slope) means this step will very likely be the last:
        # evaluate the log-likelihood in the same pass rather than in an extra one.
        last = -slope < _LAST_STEP_DECREMENT
        loss_t, g0_t, g1_t, s0_t, s1_t, s2_t, abs_t = _evaluate(
            xc, y, a0 + d0, b1 + d1, e, scale, last
        )
        if max(abs(g0_t), abs(g1_t) / scale1) <= 0.5 * best_residual:
            a0, b1, loss = a0 + d0, b1 + d1, loss_t
            g0, g1, s0, s1, s2, abs_g1 = g0_t, g1_t, s0_t, s1_t, s2_t, abs_t
            continue
        if math.isnan(loss):
            loss = _evaluate(xc, y, a0, b1, e, scale, True)[0]
        slack = 1e-13 * (1.0 + loss)
        step = 1.0
        accepted = False
        for _ in range(_MAX_HALVINGS):
            ta0 = a0 + step * d0
            tb1 = b1 + step * d1
            loss_t, g0_t, g1_t, s0_t, s1_t, s2_t, abs_t = _evaluate(xc, y, ta0, tb1, e, scale, True)
            if loss_t <= loss + _ARMIJO * step * slope + slack:
                a0, b1, loss = ta0, tb1, loss_t
                g0, g1, s0, s1, s2, abs_g1 = g0_t, g1_t, s0_t, s1_t, s2_t, abs_t
                accepted = True
                break
            step *= 0.5
        if not accepted:
            break
    if math.isnan(loss):
        loss = _evaluate(xc, y, a0, b1, e, scale, True)[0]
    return -loss, converged


@numba.njit(fastmath=_ELEMENTWISE, **_JIT)
def _raw_auc(values_pos: np.ndarray, values_neg: np.ndarray) -> float:
    """``P(x_pos > x_neg) + P(x_pos == x_neg)/2`` over all pairs (Mann-Whitney AUC)."""
    n_pos = values_pos.shape[0]
    n_neg = values_neg.shape[0]
    if n_pos == 0 or n_neg == 0:
        return math.nan
    total = 0.0
    if n_pos * n_neg <= 65536:  # pairwise counts: vectorised, faster than sorting here
        for i in range(n_pos):
            v = values_pos[i]
            below = 0
            ties = 0
            for j in range(n_neg):
                w = values_neg[j]
                below += 1 if w < v else 0
                ties += 1 if w == v else 0
            total += below + 0.5 * ties
    else:
        ordered = np.sort(values_neg)
        for i in range(n_pos):
            lo = np.searchsorted(ordered, values_pos[i], side="left")
            hi = np.searchsorted(ordered, values_pos[i], side="right")
            total += lo + 0.5 * (hi - lo)
    return total / (n_pos * n_neg)


@numba.njit(**_JIT)
def _all_finite(values: np.ndarray) -> bool:
    """No NaN or infinity among ``values`` (strict IEEE arithmetic: no fast-math here)."""
    for i in range(values.shape[0]):
        v = values[i]
        if v - v != 0.0:  # NaN - NaN and inf - inf are NaN
            return False
    return True


@numba.njit(fastmath=_ELEMENTWISE, **_JIT)
def _range_stats(values: np.ndarray) -> tuple[float, float, float]:
    """``(sum, min, max)`` of a non-empty vector."""
    total = 0.0
    lo = values[0]
    hi = values[0]
    for i in range(values.shape[0]):
        v = values[i]
        total += v
        lo = min(lo, v)
        hi = max(hi, v)
    return total, lo, hi


@numba.njit(fastmath=_ELEMENTWISE, **_JIT)
def _centred_stats(
    values: np.ndarray, centre: float, xc: np.ndarray
) -> tuple[float, float, float, float]:
    """Write ``values - centre`` into ``xc``; return ``(sum |x|, sum xc, sum |xc|, sum xc^2)``."""
    sum_abs = 0.0
    sum_c = 0.0
    abs_c = 0.0
    sum_sq = 0.0
    for i in range(values.shape[0]):
        v = values[i]
        c = v - centre
        xc[i] = c
        sum_abs += abs(v)
        sum_c += c
        abs_c += abs(c)
        sum_sq += c * c
    return sum_abs, sum_c, abs_c, sum_sq


@numba.njit(fastmath=_ELEMENTWISE, **_JIT)
def _count_positive(values: np.ndarray, b0: float, b1: float) -> int:
    """How many ``b0 + b1*x > 0`` (the notebook's ``predict(X) > .5``)."""
    count = 0
    for i in range(values.shape[0]):
        count += 1 if b0 + b1 * values[i] > 0.0 else 0
    return count


# ----------------------------------------------------------------------------------------------
# Layer driver
# ----------------------------------------------------------------------------------------------


@numba.njit(parallel=True, **_JIT)
def _fit_layer(
    x: np.ndarray,  # [contexts, neurons], float32 or float64
    order: np.ndarray,  # [n_train + n_test] int64: train positives, train negatives, test ...
    n_train: int,
    n1: int,  # positives among the training contexts (they come first)
    n_test_pos: int,  # positives among the held-out contexts (they come first)
    alpha: float,
    max_iter: int,
    kkt_tol: float,
    with_lr: bool,
    lr_max_iter: int,
    n_workers: int,
    beta: np.ndarray,
    intercept: np.ndarray,
    h00: np.ndarray,
    xbar: np.ndarray,
    spread: np.ndarray,
    converged: np.ndarray,
    constant: np.ndarray,
    iterations: np.ndarray,
    train_correct: np.ndarray,
    test_correct: np.ndarray,
    loglik: np.ndarray,
    separated: np.ndarray,
    lr_converged: np.ndarray,
    test_auc_raw: np.ndarray,
    finite: np.ndarray,
) -> None:
    n_neurons = x.shape[1]
    n_all = order.shape[0]
    y_train = np.zeros(n_train)
    y_train[:n1] = 1.0
    block = _NEURONS_PER_BLOCK
    n_blocks = (n_neurons + block - 1) // block
    n_workers = max(1, min(n_workers, n_blocks))
    # One set of buffers per worker (allocating them per block costs page faults), blocks
    # dealt round-robin; every neuron's result is independent of which worker fits it.
    for worker in numba.prange(n_workers):
        buf = np.empty((block, n_all))
        xc = np.empty(n_train)
        e = np.empty(n_train)
        scale = np.empty(n_train)
        for blk in range(worker, n_blocks, n_workers):
            _fit_block(
                x,
                order,
                blk * block,
                min(blk * block + block, n_neurons),
                n_train,
                n1,
                n_test_pos,
                y_train,
                alpha,
                max_iter,
                kkt_tol,
                with_lr,
                lr_max_iter,
                buf,
                xc,
                e,
                scale,
                beta,
                intercept,
                h00,
                xbar,
                spread,
                converged,
                constant,
                iterations,
                train_correct,
                test_correct,
                loglik,
                separated,
                lr_converged,
                test_auc_raw,
                finite,
            )


@numba.njit(**_JIT)
def _fit_block(
    x: np.ndarray,
    order: np.ndarray,
    start: int,
    stop: int,
    n_train: int,
    n1: int,
    n_test_pos: int,
    y_train: np.ndarray,
    alpha: float,
    max_iter: int,
    kkt_tol: float,
    with_lr: bool,
    lr_max_iter: int,
    buf: np.ndarray,
    xc: np.ndarray,
    e: np.ndarray,
    scale: np.ndarray,
    beta: np.ndarray,
    intercept: np.ndarray,
    h00: np.ndarray,
    xbar: np.ndarray,
    spread: np.ndarray,
    converged: np.ndarray,
    constant: np.ndarray,
    iterations: np.ndarray,
    train_correct: np.ndarray,
    test_correct: np.ndarray,
    loglik: np.ndarray,
    separated: np.ndarray,
    lr_converged: np.ndarray,
    test_auc_raw: np.ndarray,
    finite: np.ndarray,
) -> None:
    """Fit neurons ``start..stop-1`` (at most one block) into the output arrays."""
    n_all = order.shape[0]
    n_test = n_all - n_train
    n0 = n_train - n1
    width = stop - start
    # Gather: one cache line per context row for the whole block, neurons-major after.
    for i in range(n_all):
        row = order[i]
        for k in range(width):
            buf[k, i] = x[row, start + k]
    for k in range(width):
        j = start + k
        finite[j] = _all_finite(buf[k])
        if not finite[j]:
            continue
        values = buf[k, :n_train]
        sum_pos, pos_lo, pos_hi = _range_stats(values[:n1])
        sum_neg, neg_lo, neg_hi = _range_stats(values[n1:])
        if min(pos_lo, neg_lo) == max(pos_hi, neg_hi):
            b0 = intercept_only_optimum(n1, n_train, alpha)
            b1 = 0.0
            constant[j] = True
            converged[j] = True
            iterations[j] = 0
            h00[j] = 0.0
            xbar[j] = pos_lo
            spread[j] = 0.0
            # The unpenalised intercept-only MLE is the null model itself.
            p1 = n1 / n_train
            loglik[j] = n1 * math.log(p1) + n0 * math.log1p(-p1)
            separated[j] = False
            lr_converged[j] = True
        else:
            centre = (sum_pos + sum_neg) / n_train
            abs_x_pos, sum_c_pos, abs_c_pos, sq_pos = _centred_stats(values[:n1], centre, xc[:n1])
            abs_x_neg, sum_c_neg, abs_c_neg, sq_neg = _centred_stats(values[n1:], centre, xc[n1:])
            # The first pass, at (intercept-only optimum, slope 0), in closed form: every
            # context has the same probability there.
            b_start = intercept_only_optimum(n1, n_train, alpha)
            p0 = 1.0 / (1.0 + math.exp(-b_start))
            q0 = 1.0 / (1.0 + math.exp(b_start))
            w0 = p0 * q0
            first_pass = (
                n0 * p0 - n1 * q0,
                p0 * sum_c_neg - q0 * sum_c_pos,
                n_train * w0,
                w0 * (sum_c_pos + sum_c_neg),
                w0 * (sq_pos + sq_neg),
                p0 * abs_c_neg + q0 * abs_c_pos,
            )
            x_rms = math.sqrt((sq_pos + sq_neg) / n_train)
            b0, b1, g0, gc, s0, s1, s2, abs_gc, ok, its = _solve_l1(
                xc,
                y_train,
                centre,
                n1,
                alpha,
                max_iter,
                kkt_tol,
                abs_x_pos + abs_x_neg,
                x_rms,
                first_pass,
                e,
                scale,
            )
            f_h00, f_xbar, f_spread = _factor(s0, s1, s2, centre)
            constant[j] = False
            converged[j] = ok
            iterations[j] = its
            h00[j] = f_h00
            xbar[j] = f_xbar
            spread[j] = f_spread
            split = pos_lo > neg_hi or neg_lo > pos_hi
            separated[j] = split
            if not with_lr:
                loglik[j] = math.nan
                lr_converged[j] = False
            elif split:
                loglik[j] = 0.0  # the supremum, approached as |b1| -> inf
                lr_converged[j] = True
            else:
                ll, lr_ok = _solve_mle(
                    xc,
                    y_train,
                    b0 + b1 * centre,
                    b1,
                    (g0, gc, s0, s1, s2, abs_gc),
                    _MLE_TOL,
                    x_rms,
                    lr_max_iter,
                    e,
                    scale,
                )
                loglik[j] = ll
                lr_converged[j] = lr_ok
        beta[j] = b1
        intercept[j] = b0
        train_correct[j] = _count_positive(values[:n1], b0, b1) + (
            n0 - _count_positive(values[n1:], b0, b1)
        )
        test_pos = buf[k, n_train : n_train + n_test_pos]
        test_neg = buf[k, n_train + n_test_pos :]
        test_correct[j] = _count_positive(test_pos, b0, b1) + (
            n_test - n_test_pos - _count_positive(test_neg, b0, b1)
        )
        test_auc_raw[j] = _raw_auc(test_pos, test_neg)


def fit_layer(
    x: np.ndarray,
    labels: np.ndarray,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    *,
    alpha: float,
    max_iter: int = 200,
    kkt_tol: float = 1e-9,
    with_lr: bool = True,
    lr_max_iter: int = 100,
) -> dict[str, np.ndarray]:
    """Fit every neuron of one layer.

    Parameters
    ----------
    x : np.ndarray
        ``[contexts, neurons]`` finite activations, float32 or float64 (any strides; a memmap
        view is read once, one cache line per context row and block of 16 neurons).
    labels : np.ndarray
        ``[contexts]`` bool, True = positive class.
    train_idx, test_idx : np.ndarray
        int64 indices of the training and held-out contexts (the training split must hold
        both classes).
    alpha, max_iter, kkt_tol
        L1 weight, iteration cap and KKT tolerance (see ``statistics.fit_neuron_logits``).
    with_lr : bool, default True
        Also maximise the unpenalised log-likelihood (for the likelihood-ratio test).
    lr_max_iter : int, default 100
        Newton iteration cap of the unpenalised fit.

    Returns
    -------
    dict[str, np.ndarray]
        The arrays of :data:`LAYER_OUTPUTS`, each ``[neurons]``.
    """
    if x.dtype not in (np.float32, np.float64):
        x = np.asarray(x, dtype=np.float32)
    labels = np.asarray(labels, dtype=bool)
    train_idx = np.asarray(train_idx, dtype=np.int64)
    test_idx = np.asarray(test_idx, dtype=np.int64)
    train_pos = train_idx[labels[train_idx]]
    test_pos = test_idx[labels[test_idx]]
    # Positives first on each side: class sums then need no per-context branch.
    order = np.concatenate(
        [train_pos, train_idx[~labels[train_idx]], test_pos, test_idx[~labels[test_idx]]]
    )
    n_neurons = x.shape[1]
    out: dict[str, np.ndarray] = {
        name: np.zeros(n_neurons, dtype=dtype) for name, dtype in LAYER_OUTPUTS.items()
    }
    _fit_layer(
        np.asarray(x),
        order,
        train_idx.size,
        train_pos.size,
        test_pos.size,
        float(alpha),
        int(max_iter),
        float(kkt_tol),
        bool(with_lr),
        int(lr_max_iter),
        numba.get_num_threads(),
        *out.values(),
    )
    return out
