"""Torch engine of the per-neuron logistic regressions, for activations on a GPU.

The same optimisation as :mod:`neuronprobe.logit_kernel` (the true optimum of
``-loglik(b0, b1) + alpha*(|b0| + |b1|)``, the unpenalised fit for the likelihood-ratio test,
accuracies and the held-out AUC), written as batched float64 tensor code over a block of
neurons at once, so that it runs wherever the activations already are.
``statistics.fit_neuron_logits`` uses it for CUDA tensors (and for any input with
``engine="torch"``); :func:`fit_chunk` returns the arrays of ``logit_kernel.LAYER_OUTPUTS``.

Reference: J. D. Lee, Y. Sun, M. A. Saunders, "Proximal Newton-type methods for minimizing
composite functions", SIAM J. Optim. 24 (2014).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from neuronprobe.logit_kernel import LAYER_OUTPUTS, intercept_only_optimum

__all__ = ["fit_chunk"]

_EPS = float(np.finfo(np.float64).eps)
#: Armijo sufficient-decrease constant of the line search.
_ARMIJO = 1e-4
#: Maximum number of step halvings in one line search.
_MAX_HALVINGS = 60
#: Values above this are returned unchanged by softplus (error < exp(-40) ~ 4e-18).
_SOFTPLUS_THRESHOLD = 40.0
#: Gradient tolerance of the unpenalised fit (as in logit_kernel).
_MLE_TOL = 1e-7


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
    tol: float,
    slope_scale: torch.Tensor | None = None,
) -> _SolveResult:
    """Solve ``min F(b)`` for every row of ``x`` (``[m, n]`` float64, non-constant rows).

    Proximal Newton with the exact 2-D lasso model (:func:`_lasso2`) and a per-neuron
    backtracking Armijo line search on the true objective.  A neuron is frozen once its KKT
    conditions hold:

    * ``b_j != 0``: ``|g_j + alpha*sign(b_j)| <= tol_j``;
    * ``b_j == 0``: ``|g_j| <= alpha + tol_j``;

    with ``g`` the gradient of ``-loglik`` and ``tol_j = tol + 64*eps*S_j`` where
    ``S_0 = n`` and ``S_1 = sum_i |x_i|`` bound the summands of ``g_0`` and ``g_1`` (so the
    second term is a floor at the gradient's rounding error).

    Parameters
    ----------
    x : torch.Tensor
        ``[m, n]`` float64 training activations, neurons-major.
    y : torch.Tensor
        ``[n]`` float64 0/1 labels.
    alpha, max_iter
        See ``statistics.fit_neuron_logits``; ``alpha = 0`` gives damped Newton for the
        unpenalised maximum likelihood.
    tol : float
        Absolute KKT tolerance (``kkt_tol*alpha`` for the L1 fit).
    """
    m, n = x.shape
    device = x.device
    s = 1.0 - 2.0 * y  # +1 for negatives, -1 for positives
    xs_all = x * s
    tol0 = tol + 64.0 * _EPS * n
    # slope_scale: the slope's gradient is in units of x, so its tolerance may scale with x.
    tol1_all = tol * (1.0 if slope_scale is None else slope_scale) + 64.0 * _EPS * x.abs().sum(
        dim=1
    )

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


def _raw_auc(test_pos: torch.Tensor, test_neg: torch.Tensor) -> torch.Tensor:
    """Mann-Whitney AUC of each row's values, ``[m, n_pos]`` against ``[m, n_neg]``."""
    m = test_pos.shape[0]
    if test_pos.shape[1] == 0 or test_neg.shape[1] == 0:
        return torch.full((m,), math.nan, dtype=torch.float64, device=test_pos.device)
    ordered = torch.sort(test_neg, dim=1).values
    below = torch.searchsorted(ordered, test_pos.contiguous(), right=False)
    upto = torch.searchsorted(ordered, test_pos.contiguous(), right=True)
    counts = below.double() + 0.5 * (upto - below).double()
    return counts.sum(dim=1) / (test_pos.shape[1] * test_neg.shape[1])


def fit_chunk(
    x: torch.Tensor,
    x_test: torch.Tensor,
    y: torch.Tensor,
    y_test: torch.Tensor,
    *,
    alpha: float,
    max_iter: int,
    kkt_tol: float,
    with_lr: bool,
    lr_max_iter: int,
) -> dict[str, np.ndarray]:
    """Fit every neuron (row) of a block.

    Parameters
    ----------
    x, x_test : torch.Tensor
        ``[m, n_train]`` and ``[m, n_test]`` float64 finite activations, neurons-major.
    y, y_test : torch.Tensor
        ``[n_train]`` and ``[n_test]`` float64 0/1 labels (both classes in ``y``).
    alpha, max_iter, kkt_tol, with_lr, lr_max_iter
        As in ``logit_kernel.fit_layer``.

    Returns
    -------
    dict[str, np.ndarray]
        The arrays of ``logit_kernel.LAYER_OUTPUTS``, each ``[m]``.
    """
    m, n = x.shape
    device = x.device
    n1 = int(y.sum())
    positive = y > 0.5
    const = x.amax(dim=1) == x.amin(dim=1)
    b0 = torch.full((m,), intercept_only_optimum(n1, n, alpha), dtype=torch.float64, device=device)
    b1 = torch.zeros(m, dtype=torch.float64, device=device)
    h00 = torch.zeros_like(b1)
    xbar = x[:, 0].clone()
    spread = torch.zeros_like(b1)
    conv = torch.ones(m, dtype=torch.bool, device=device)
    iterations = torch.zeros(m, dtype=torch.int32, device=device)
    p1 = n1 / n
    loglik = torch.full_like(b1, n1 * math.log(p1) + (n - n1) * math.log1p(-p1))
    lr_conv = torch.ones(m, dtype=torch.bool, device=device)
    pos_lo = x[:, positive].amin(dim=1)
    pos_hi = x[:, positive].amax(dim=1)
    neg_lo = x[:, ~positive].amin(dim=1)
    neg_hi = x[:, ~positive].amax(dim=1)
    separated = ((pos_lo > neg_hi) | (neg_lo > pos_hi)) & ~const

    fit_rows = (~const).nonzero().squeeze(1)
    if fit_rows.numel() > 0:
        x_fit = x if fit_rows.numel() == m else x[fit_rows]
        res = _prox_newton(x_fit, y, alpha, max_iter, kkt_tol * alpha)
        b0[fit_rows], b1[fit_rows], conv[fit_rows] = res.b0, res.b1, res.converged
        h00[fit_rows], xbar[fit_rows], spread[fit_rows] = res.h00, res.xbar, res.spread
        iterations[fit_rows] = res.iterations
        if with_lr:
            mle_rows = fit_rows[~separated[fit_rows]]
            if mle_rows.numel() > 0:
                x_mle = x[mle_rows]
                rms = (x_mle - x_mle.mean(dim=1, keepdim=True)).pow(2).mean(dim=1).sqrt()
                mle = _prox_newton(x_mle, y, 0.0, lr_max_iter, _MLE_TOL, slope_scale=rms)
                s = 1.0 - 2.0 * y
                u = _margins(mle.b0, mle.b1, s, x[mle_rows] * s)
                loglik[mle_rows] = -F.softplus(u, threshold=_SOFTPLUS_THRESHOLD).sum(dim=1)
                lr_conv[mle_rows] = mle.converged
            loglik[fit_rows[separated[fit_rows]]] = 0.0  # the supremum
        else:
            loglik[fit_rows] = math.nan
            lr_conv[fit_rows] = False

    train_correct = ((torch.addcmul(b0[:, None], b1[:, None], x) > 0) == positive).sum(dim=1)
    test_positive = y_test > 0.5
    test_correct = ((torch.addcmul(b0[:, None], b1[:, None], x_test) > 0) == test_positive).sum(
        dim=1
    )
    auc = _raw_auc(x_test[:, test_positive], x_test[:, ~test_positive])
    out = {
        "beta": b1,
        "intercept": b0,
        "h00": h00,
        "xbar": xbar,
        "spread": spread,
        "converged": conv,
        "constant": const,
        "iterations": iterations,
        "train_correct": train_correct,
        "test_correct": test_correct,
        "loglik": loglik,
        "separated": separated,
        "lr_converged": lr_conv,
        "test_auc_raw": auc,
        "finite": torch.ones(m, dtype=torch.bool, device=device),
    }
    return {
        name: out[name].cpu().numpy().astype(dtype, copy=False)
        for name, dtype in LAYER_OUTPUTS.items()
    }
