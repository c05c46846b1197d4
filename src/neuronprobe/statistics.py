"""Stage 4, statistics: one logistic regression per neuron, and the multiple-comparison decision.

For every neuron (a column of an activation matrix) the notebook fits::

    X = sm.add_constant(x)
    X_train, X_test, y_train, y_test = train_test_split(X, labels, test_size=.2, stratify=labels)
    result = sm.Logit(y_train, X_train).fit_regularized(maxiter=3000, disp=0, method="l1", alpha=.1)

i.e. it minimises, over the intercept ``b0`` and the slope ``b1``,

.. math::

    F(b) = -\\ell(b) + \\alpha (|b_0| + |b_1|), \\qquad
    -\\ell(b) = \\sum_i \\operatorname{softplus}(b_0 + b_1 x_i) - y_i (b_0 + b_1 x_i)

on the training contexts (the intercept is penalised too).  :func:`fit_neuron_logits` computes
the *true* optimum of that objective for all neurons, on one seeded split shared by all of them,
with three interchangeable engines:

* ``"fast"``: the compiled CPU kernel of :mod:`neuronprobe.logit_kernel` (numpy input or CPU
  tensors), or the batched torch solver of :mod:`neuronprobe.logit_torch` for CUDA tensors;
* ``"torch"``: the torch solver on the tensor's device, whatever it is;
* ``"statsmodels"``: the notebook's own call, neuron by neuron, in parallel processes
  (:mod:`neuronprobe.logit_reference`), for parity checks.

Beside the notebook's quantities (slope, intercept, Wald p-value, accuracies) every neuron gets
a likelihood-ratio p-value (the unpenalised one-neuron logit against the intercept-only model,
valid under separation where the Wald test is not), the held-out ROC AUC of its probe, a
``separated`` flag, optionally k-fold cross-validated accuracy and a shuffled-label control.
:func:`adjust_pvalues` applies the multiple-comparison corrections.

Standard errors follow statsmodels: the unscaled Logit Hessian ``X' W X`` (``W = p (1 - p)``) at
the solution, restricted to the non-zero coefficients and inverted; the slope's Wald p-value is
``2 * Phi(-|b1 / se|)``, NaN where the slope is zero.

References: Wilks, "The large-sample distribution of the likelihood ratio for testing
composite hypotheses", Ann. Math. Statist. 9 (1938); Benjamini and Hochberg, "Controlling the
false discovery rate", JRSS B 57 (1995); Hewitt and Liang, "Designing and interpreting probes
with control tasks", EMNLP 2019 (the shuffled-label control).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats

from neuronprobe.config import CORRECTIONS, TESTS
from neuronprobe.config import FIT_ENGINES as ENGINES
from neuronprobe.errors import NeuronprobeError

__all__ = [
    "CORRECTIONS",
    "ENGINES",
    "TESTS",
    "FitInputError",
    "NeuronFits",
    "adjust_pvalues",
    "cv_folds",
    "fit_neuron_logits",
    "neuron_statistic",
    "stratified_train_mask",
]

logger = logging.getLogger(__name__)


class FitInputError(NeuronprobeError, ValueError):
    """Unusable input to :func:`fit_neuron_logits` (a ``ValueError`` and a ``NeuronprobeError``)."""


@dataclass(frozen=True)
class NeuronFits:
    """Per-neuron results of the one-feature logistic regressions.

    Every per-neuron array is shaped like the activations without the contexts axis:
    ``[neurons]`` for 2-D activations ``[contexts, neurons]`` or ``[layers, neurons]`` for
    3-D activations ``[layers, contexts, neurons]``.

    Attributes
    ----------
    beta : np.ndarray
        float64 slope ``b1`` of the L1 fit; exactly 0.0 where the optimum's slope is 0.
    intercept : np.ndarray
        float64 intercept ``b0`` (penalised, like statsmodels' ``add_constant`` column).
    beta_se : np.ndarray
        float64 standard error of the slope (statsmodels' formula), NaN where ``beta == 0``.
    pvalue : np.ndarray
        float64 two-sided Wald p-value of the slope, NaN where ``beta == 0`` (the notebook's).
    pvalue_lr : np.ndarray
        float64 likelihood-ratio p-value: ``chi2(1).sf(2*(loglik_1 - loglik_0))`` for the
        *unpenalised* logit ``y ~ 1 + x`` against ``y ~ 1`` on the training contexts.  Valid
        under separation (the maximised log-likelihood is then its supremum, 0), where the
        Wald p-value of a penalised fit is not; 1.0 for constant neurons.
    auc : np.ndarray
        float64 ROC AUC of the fitted probe ``b0 + b1*x`` on the held-out contexts (ties count
        one half): the activation's AUC where ``beta > 0``, one minus it where ``beta < 0``,
        0.5 where ``beta == 0``; NaN without held-out contexts.
    train_acc, test_acc : np.ndarray
        float64 percent of training / held-out contexts classified correctly, predicting
        positive where ``b0 + b1*x > 0`` (the notebook's ``predict(X) > .5``); test NaN without
        held-out contexts.
    cv_acc : np.ndarray
        float64 k-fold cross-validated accuracy in percent (all contexts, stratified folds,
        grouped when groups are given; pooled over folds), NaN unless ``cv`` was asked for.
    separated : np.ndarray
        bool, the neuron separates the training classes perfectly (some threshold puts every
        positive context on one side): the unpenalised slope is infinite, the Wald test is
        unreliable, the likelihood-ratio test is not.
    converged : np.ndarray
        bool, optimality (KKT) conditions met (fast and torch engines) or statsmodels'
        ``mle_retvals["converged"]`` (statsmodels engine).
    constant : np.ndarray
        bool, the neuron is constant on the training contexts; its slope is not fitted
        (``beta = 0``) and its intercept is the intercept-only L1 optimum.
    pvalue_shuffled, pvalue_lr_shuffled : np.ndarray
        float64 Wald and likelihood-ratio p-values of the same fit on randomly permuted
        training labels (the shuffled-label control: how many neurons pass by chance), NaN
        unless ``shuffled_control`` was asked for.
    train_mask : np.ndarray
        bool ``[contexts]``, the one train/test split shared by all neurons (True = train).
    alpha : float
        L1 penalty weight on the summed (not averaged) negative log-likelihood.
    engine : str
        The engine that fitted the L1 regressions.
    cv : int
        Number of cross-validation folds (0: none).
    shuffled_control : bool
        Whether the shuffled-label control was fitted.
    """

    beta: np.ndarray
    intercept: np.ndarray
    beta_se: np.ndarray
    pvalue: np.ndarray
    pvalue_lr: np.ndarray
    auc: np.ndarray
    train_acc: np.ndarray
    test_acc: np.ndarray
    cv_acc: np.ndarray
    separated: np.ndarray
    converged: np.ndarray
    constant: np.ndarray
    pvalue_shuffled: np.ndarray
    pvalue_lr_shuffled: np.ndarray
    train_mask: np.ndarray
    alpha: float
    engine: str = "fast"
    cv: int = 0
    shuffled_control: bool = False

    def to_frame(self) -> pd.DataFrame:
        """Return the results as a tidy table, one row per (layer, neuron).

        Returns
        -------
        pd.DataFrame
            Rows in C order (layer-major).  Columns ``layer`` (only for 2-D results
            ``[layers, neurons]``), ``neuron``, then every per-neuron attribute in the order
            of the class (``cv_acc`` only with cross-validation, the shuffled p-values only
            with the control).
        """
        shape = self.beta.shape
        columns: dict[str, np.ndarray] = {}
        if len(shape) == 2:
            layer, neuron = np.indices(shape)
            columns["layer"] = layer.ravel()
            columns["neuron"] = neuron.ravel()
        else:
            columns["neuron"] = np.arange(self.beta.size)
        for field in fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, np.ndarray) or field.name == "train_mask":
                continue
            if field.name == "cv_acc" and not self.cv:
                continue
            if field.name.endswith("_shuffled") and not self.shuffled_control:
                continue
            columns[field.name] = value.ravel()
        return pd.DataFrame(columns)


# ----------------------------------------------------------------------------------------------
# Input handling and splits
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


def grouped_train_mask(
    labels: np.ndarray, groups: np.ndarray, test_size: float = 0.2, seed: int = 0
) -> np.ndarray:
    """Draw one seeded, stratified train/test split in which no group lands on both sides.

    Uses ``sklearn.model_selection.StratifiedGroupKFold(n_splits=round(1/test_size),
    shuffle=True, random_state=seed)`` and holds out its first fold, so the held-out fraction
    is close to ``test_size`` (whole groups move together) and the class balance is kept as
    well as the groups allow.

    Parameters
    ----------
    labels : np.ndarray
        bool ``[contexts]``.
    groups : np.ndarray
        ``[contexts]`` group of each context (e.g. the document it came from).
    test_size : float, default 0.2
        Fraction held out, in (0, 0.5].
    seed : int, default 0
        ``random_state`` of the folds.

    Returns
    -------
    np.ndarray
        bool ``[contexts]``, True = training context.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    y = _labels_to_bool(labels)
    groups = _check_groups(groups, y)
    if not (isinstance(test_size, float) and 0.0 < test_size <= 0.5):
        raise FitInputError(
            f"with groups, test_size must be a fraction in (0, 0.5], got {test_size!r}."
        )
    n_splits = max(2, round(1.0 / test_size))
    if np.unique(groups).size < n_splits:
        raise FitInputError(
            f"cannot hold out whole groups: {np.unique(groups).size} groups for "
            f"{n_splits} folds; pass fewer groups per fold (larger test_size) or no groups."
        )
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, test_idx = next(iter(folds.split(np.zeros(y.size), y, groups)))
    mask = np.ones(y.size, dtype=bool)
    mask[test_idx] = False
    return mask


def cv_folds(
    labels: np.ndarray, k: int, seed: int = 0, groups: np.ndarray | None = None
) -> list[np.ndarray]:
    """Seeded stratified k-fold split of all contexts (grouped when ``groups`` are given).

    Returns
    -------
    list of np.ndarray
        ``k`` int64 index arrays of held-out contexts, together a partition of the contexts.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    y = _labels_to_bool(labels)
    if not (isinstance(k, int) and k >= 2):
        raise FitInputError(f"cv must be an integer >= 2 (folds), got {k!r}.")
    smallest = int(min(y.sum(), (~y).sum()))
    if smallest < k:
        raise FitInputError(
            f"cv={k} folds need at least {k} contexts of each class, the smaller class has "
            f"{smallest}; use fewer folds."
        )
    if groups is None:
        splitter: Any = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(y.size), y)
    else:
        groups = _check_groups(groups, y)
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(y.size), y, groups)
    return [np.sort(test).astype(np.int64) for _, test in splits]


def _check_groups(groups: Any, y: np.ndarray) -> np.ndarray:
    """Validate ``groups`` ``[contexts]``."""
    if isinstance(groups, torch.Tensor):
        groups = groups.detach().cpu().numpy()
    arr = np.asarray(groups)
    if arr.shape != y.shape:
        raise FitInputError(
            f"groups has shape {arr.shape} but labels have shape {y.shape}; pass one group "
            "(e.g. document id) per context."
        )
    return arr


# ----------------------------------------------------------------------------------------------
# Engines
# ----------------------------------------------------------------------------------------------


def _layer_view(activations: np.ndarray | torch.Tensor, layer: int | None) -> Any:
    return activations if layer is None else activations[layer]


def _fit_split(
    activations: np.ndarray | torch.Tensor,
    n_layers: int | None,
    labels: np.ndarray,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    *,
    backend: str,
    alpha: float,
    max_iter: int,
    kkt_tol: float,
    with_lr: bool,
    chunk_size: int | None,
) -> dict[str, np.ndarray]:
    """Fit every neuron on one split; return ``logit_kernel.LAYER_OUTPUTS`` arrays, per-neuron shape.

    ``backend`` is ``"kernel"`` (compiled CPU kernel, layer by layer) or ``"torch"`` (batched
    torch solver on the activations' device, block by block).
    """
    from neuronprobe.logit_kernel import LAYER_OUTPUTS, fit_layer

    layer_ids: list[int | None] = list(range(n_layers)) if n_layers is not None else [None]
    parts: list[dict[str, np.ndarray]] = []
    for layer in layer_ids:
        x = _layer_view(activations, layer)  # [contexts, neurons]
        if backend == "kernel":
            if isinstance(x, torch.Tensor):
                x = x.detach()
                x = (x if x.dtype in (torch.float32, torch.float64) else x.float()).numpy()
            part = fit_layer(
                x, labels, train_idx, test_idx, alpha=alpha, max_iter=max_iter,
                kkt_tol=kkt_tol, with_lr=with_lr,
            )  # fmt: skip
        else:
            part = _fit_layer_torch(x, labels, train_idx, test_idx, alpha, max_iter, kkt_tol,
                                    with_lr, chunk_size)  # fmt: skip
        bad = np.flatnonzero(~part["finite"])
        if bad.size:
            where = f"layer {layer}, " if layer is not None else ""
            raise FitInputError(
                f"activations contain NaN or inf ({where}neuron {int(bad[0])}"
                f"{f' and {bad.size - 1} more' if bad.size > 1 else ''}); clean or drop those "
                "neurons before fitting."
            )
        parts.append(part)
    if n_layers is None:
        return parts[0]
    return {name: np.stack([part[name] for part in parts]) for name in LAYER_OUTPUTS}


def _fit_layer_torch(
    x: np.ndarray | torch.Tensor,
    labels: np.ndarray,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    alpha: float,
    max_iter: int,
    kkt_tol: float,
    with_lr: bool,
    chunk_size: int | None,
) -> dict[str, np.ndarray]:
    """The torch engine over one layer ``[contexts, neurons]``, in blocks of neurons."""
    from neuronprobe.logit_kernel import LAYER_OUTPUTS
    from neuronprobe.logit_torch import fit_chunk

    xt = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    device = xt.device
    n_contexts, n_neurons = xt.shape
    if chunk_size is None:  # keep the solver's ~10 float64 work arrays near 256 MB
        chunk_size = max(1, int(256e6 // (8 * 10 * max(n_contexts, 1))))
    tr = torch.as_tensor(train_idx, device=device)
    te = torch.as_tensor(test_idx, device=device)
    y = torch.as_tensor(labels[train_idx], dtype=torch.float64, device=device)
    y_test = torch.as_tensor(labels[test_idx], dtype=torch.float64, device=device)
    out: dict[str, np.ndarray] = {
        name: np.zeros(n_neurons, dtype=dtype) for name, dtype in LAYER_OUTPUTS.items()
    }
    with torch.no_grad():
        for start in range(0, n_neurons, chunk_size):
            stop = min(start + chunk_size, n_neurons)
            block = xt[:, start:stop].detach().to(torch.float64)
            finite = torch.isfinite(block).all(dim=0).cpu().numpy()
            if not finite.all():
                out["finite"][start:stop] = finite
                continue
            part = fit_chunk(
                block.index_select(0, tr).T.contiguous(),
                block.index_select(0, te).T.contiguous(),
                y,
                y_test,
                alpha=alpha,
                max_iter=max_iter,
                kkt_tol=kkt_tol,
                with_lr=with_lr,
                lr_max_iter=100,
            )
            for name in LAYER_OUTPUTS:
                out[name][start:stop] = part[name]
    return out


def _wald(beta: np.ndarray, se: np.ndarray) -> np.ndarray:
    """statsmodels' two-sided normal Wald p-value ``2 * Phi(-|beta / se|)`` (NaN-propagating)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.abs(beta / se)
    return np.asarray(stats.norm.sf(z) * 2.0, dtype=np.float64)


def _standard_errors(part: dict[str, np.ndarray]) -> np.ndarray:
    """Slope standard errors from the Hessian factors at the solution (statsmodels' formula).

    ``H = [[h00, h00*xbar], [h00*xbar, spread + h00*xbar^2]]``: with both coefficients in the
    model ``[H^-1]_11 = 1/spread``; with the intercept trimmed to 0, ``1/H_11``.
    """
    beta, b0 = part["beta"], part["intercept"]
    with np.errstate(divide="ignore", invalid="ignore"):
        var = np.where(
            b0 != 0,
            1.0 / part["spread"],
            1.0 / (part["spread"] + part["h00"] * part["xbar"] ** 2),
        )
        se = np.sqrt(var)
    return np.where((beta != 0) & np.isfinite(se), se, np.nan)


def _lr_statistic(part: dict[str, np.ndarray], n1: int, n: int) -> np.ndarray:
    """``2 * (loglik_1 - loglik_0)`` from the maximised log-likelihoods of one split."""
    p1 = n1 / n
    null = n1 * math.log(p1) + (n - n1) * math.log1p(-p1)
    return np.asarray(np.maximum(2.0 * (part["loglik"] - null), 0.0), dtype=np.float64)


def _lr_pvalues(part: dict[str, np.ndarray], n1: int, n: int) -> np.ndarray:
    """Likelihood-ratio p-values from the maximised log-likelihoods of one split."""
    return np.asarray(stats.chi2.sf(_lr_statistic(part, n1, n), df=1), dtype=np.float64)


def _probe_auc(raw: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """The probe's held-out AUC from the activation's own AUC and the slope's sign."""
    return np.where(beta > 0, raw, np.where(beta < 0, 1.0 - raw, np.where(np.isnan(raw), raw, 0.5)))


def neuron_statistic(
    x: np.ndarray,
    labels: np.ndarray,
    train_idx: np.ndarray,
    *,
    test: str = "wald",
    alpha: float = 0.1,
) -> np.ndarray:
    """The deciding statistic of every neuron's fit on some contexts: larger is stronger.

    The same one-neuron fit as :func:`fit_neuron_logits`, on ``train_idx`` only, summarised by
    the statistic its test turns into a p-value (so ordering by it is ordering by the p-value,
    without the p-values' underflow to 0 for strong neurons).

    Parameters
    ----------
    x : np.ndarray
        ``[contexts, neurons]`` finite activations, float32 or float64.
    labels : np.ndarray
        bool ``[contexts]``, True = positive class.
    train_idx : np.ndarray
        int64 indices of the contexts to fit on (both classes present).
    test : {"wald", "lr"}, default "wald"
        ``"wald"``: ``|beta / se|`` of the L1 fit (0 where the slope is 0); ``"lr"``: the
        likelihood-ratio statistic ``2 * (loglik_1 - loglik_0)`` of the unpenalised fit.
    alpha : float, default 0.1
        L1 weight of the penalised fit (statsmodels' ``alpha``).

    Returns
    -------
    np.ndarray
        float64 ``[neurons]``, non-negative.
    """
    from neuronprobe.logit_kernel import fit_layer

    if test not in TESTS:
        raise FitInputError(f"test must be one of {', '.join(TESTS)}; got {test!r}.")
    y = np.asarray(labels, dtype=bool)
    train_idx = np.asarray(train_idx, dtype=np.int64)
    part = fit_layer(
        x, y, train_idx, np.empty(0, dtype=np.int64), alpha=alpha, with_lr=test == "lr"
    )
    bad = np.flatnonzero(~part["finite"])
    if bad.size:
        raise FitInputError(
            f"activations contain NaN or inf (neuron {int(bad[0])}"
            f"{f' and {bad.size - 1} more' if bad.size > 1 else ''}); clean or drop those "
            "neurons before fitting."
        )
    if test == "lr":
        return _lr_statistic(part, int(y[train_idx].sum()), int(train_idx.size))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.abs(part["beta"] / _standard_errors(part))
    return np.where(np.isfinite(z), z, 0.0)


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def fit_neuron_logits(
    activations: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    *,
    alpha: float = 0.1,
    test_size: float = 0.2,
    seed: int = 0,
    train_mask: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    engine: str = "fast",
    cv: int | None = None,
    shuffled_control: bool = False,
    n_jobs: int | None = None,
    chunk_size: int | None = None,
    max_iter: int = 200,
    kkt_tol: float = 1e-9,
    progress: bool = False,
) -> NeuronFits:
    """Fit one L1-penalised logistic regression ``labels ~ 1 + x`` per neuron.

    Minimises ``-loglik(b0, b1) + alpha*(|b0| + |b1|)`` on the training contexts, the objective
    of the notebook's ``sm.Logit(y, add_constant(x)).fit_regularized(method="l1", alpha=alpha)``,
    to its true optimum, for every neuron on one shared split.

    Parameters
    ----------
    activations : np.ndarray or torch.Tensor
        Real ``[contexts, neurons]`` or ``[layers, contexts, neurons]``; float32 or float64
        (others are converted layer by layer); a read-only ``np.memmap`` is read layer by
        layer; a torch tensor on a GPU is fitted there.
    labels : np.ndarray or torch.Tensor
        bool or 0/1 ``[contexts]``, True = positive class ("can't" in the notebook).
    alpha : float, default 0.1
        L1 weight on the summed negative log-likelihood (statsmodels' ``alpha``).
    test_size : float, default 0.2
        Held-out fraction (ignored if ``train_mask`` is given).
    seed : int, default 0
        Seed of the split, of the cross-validation folds and of the label permutation.
    train_mask : np.ndarray, optional
        bool ``[contexts]`` (True = train): the split shared by all neurons.
    groups : np.ndarray, optional
        ``[contexts]`` group of each context (document ids): the split and the folds then keep
        every group on one side (:func:`grouped_train_mask`), so that contexts of one document
        cannot leak from training to testing.
    engine : {"fast", "torch", "statsmodels"}, default "fast"
        ``"fast"``: compiled CPU kernel for numpy arrays and CPU tensors, torch solver for CUDA
        tensors.  ``"torch"``: the batched torch solver on the tensor's device.
        ``"statsmodels"``: the notebook's statsmodels call per neuron (slow, ~3 ms per neuron
        and core; SLSQP may stop early and trim slopes that are non-zero at the optimum), in
        ``n_jobs`` processes; its likelihood-ratio p-values and the AUC's direction data come
        from the fast kernel (statsmodels has no L1-compatible counterpart).
    cv : int, optional
        Also compute ``cv``-fold cross-validated accuracy (``cv_acc``), refitting on each fold
        with the fast kernel (or torch).
    shuffled_control : bool, default False
        Also fit every neuron on randomly permuted training labels (seeded) and report its
        p-values (``pvalue_shuffled``, ``pvalue_lr_shuffled``): how many neurons would pass
        the threshold by chance.
    n_jobs : int, optional
        Processes of the statsmodels engine (default: all cores).  The fast kernel uses numba's
        threads (``NUMBA_NUM_THREADS``).
    chunk_size : int, optional
        Neurons per block of the torch solver (default: ~256 MB of work arrays).
    max_iter : int, default 200
        Proximal Newton iteration cap; neurons hitting it get ``converged=False``.
    kkt_tol : float, default 1e-9
        KKT tolerance relative to ``alpha``: each coefficient's optimality residual must be
        below ``kkt_tol*alpha`` plus a floor at its rounding error, ``64*eps*sum_i |summand_i|``.
    progress : bool, default False
        Progress bar for the statsmodels engine (the others take seconds).

    Returns
    -------
    NeuronFits
        Arrays shaped ``[neurons]`` or ``[layers, neurons]``.

    Raises
    ------
    FitInputError
        (a ``ValueError``) on mismatched shapes, non-binary labels, a class absent from the
        training split, non-finite activations (naming layer and neuron), or a bad option.
    """
    if engine not in ENGINES:
        raise FitInputError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}.")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise FitInputError(f"alpha must be a positive finite number, got {alpha!r}.")
    if max_iter < 1:
        raise FitInputError(f"max_iter must be >= 1, got {max_iter}.")
    if chunk_size is not None and chunk_size < 1:
        raise FitInputError(f"chunk_size must be >= 1, got {chunk_size}.")
    alpha = float(alpha)

    n_contexts, _, n_layers = _check_activations(activations)
    y = _labels_to_bool(labels)
    if y.shape[0] != n_contexts:
        raise FitInputError(
            f"labels have {y.shape[0]} entries but activations have {n_contexts} contexts "
            f"(activations shape {tuple(activations.shape)}; contexts are axis "
            f"{0 if n_layers is None else 1}); pass one label per context."
        )
    if train_mask is not None:
        mask = _check_train_mask(train_mask, y)
    elif groups is not None:
        mask = grouped_train_mask(y, groups, test_size=test_size, seed=seed)
    else:
        mask = stratified_train_mask(y, test_size=test_size, seed=seed)
    y_tr = y[mask]
    if y_tr.all() or not y_tr.any():
        absent = "negative (False)" if y_tr.all() else "positive (True)"
        raise FitInputError(
            f"the training split has no {absent} labels ({y_tr.size} training contexts); "
            "both classes must be present: use a stratified train_mask or more contexts."
        )
    folds = cv_folds(y, cv, seed=seed, groups=groups) if cv else []
    train_idx = np.flatnonzero(mask)
    test_idx = np.flatnonzero(~mask)
    on_gpu = isinstance(activations, torch.Tensor) and activations.device.type != "cpu"
    backend = "torch" if engine == "torch" or on_gpu else "kernel"
    options: dict[str, Any] = {
        "alpha": alpha,
        "max_iter": max_iter,
        "kkt_tol": kkt_tol,
        "chunk_size": chunk_size,
    }

    part = _fit_split(
        activations, n_layers, y, train_idx, test_idx, backend=backend, with_lr=True, **options
    )
    n1, n = int(y_tr.sum()), int(y_tr.size)
    beta, intercept = part["beta"], part["intercept"]
    beta_se = _standard_errors(part)
    train_acc = 100.0 * part["train_correct"] / n
    test_acc = (
        100.0 * part["test_correct"] / test_idx.size
        if test_idx.size
        else np.full(beta.shape, np.nan)
    )
    converged = part["converged"]
    if engine == "statsmodels":
        beta, intercept, beta_se, train_acc, test_acc, converged = _statsmodels_engine(
            activations, n_layers, y, train_idx, test_idx, alpha, n_jobs, part["constant"], progress
        )

    cv_acc = np.full(beta.shape, np.nan)
    if folds:
        correct = np.zeros(beta.shape)
        for held_out in folds:
            keep = np.ones(n_contexts, dtype=bool)
            keep[held_out] = False
            if y[keep].all() or not y[keep].any():
                absent = "negative (False)" if y[keep].all() else "positive (True)"
                raise FitInputError(
                    f"a cross-validation fold's training part has no {absent} labels "
                    f"({int(keep.sum())} contexts): the groups put a whole class in one fold; "
                    "use fewer folds, no groups, or more groups."
                )
            fold = _fit_split(
                activations, n_layers, y, np.flatnonzero(keep), held_out,
                backend=backend, with_lr=False, **options,
            )  # fmt: skip
            correct += fold["test_correct"]
        cv_acc = 100.0 * correct / n_contexts

    pvalue_shuffled = np.full(beta.shape, np.nan)
    pvalue_lr_shuffled = np.full(beta.shape, np.nan)
    if shuffled_control:
        rng = np.random.default_rng(seed)
        y_perm = y.copy()
        y_perm[train_idx] = rng.permutation(y[train_idx])
        control = _fit_split(
            activations, n_layers, y_perm, train_idx, test_idx,
            backend=backend, with_lr=True, **options,
        )  # fmt: skip
        pvalue_shuffled = _wald(control["beta"], _standard_errors(control))
        pvalue_lr_shuffled = _lr_pvalues(control, n1, n)

    total = beta.size
    _log_summary(part, converged, total, engine)
    return NeuronFits(
        beta=beta,
        intercept=intercept,
        beta_se=beta_se,
        pvalue=_wald(beta, beta_se),
        pvalue_lr=_lr_pvalues(part, n1, n),
        auc=_probe_auc(part["test_auc_raw"], beta),
        train_acc=train_acc,
        test_acc=test_acc,
        cv_acc=cv_acc,
        separated=part["separated"],
        converged=converged,
        constant=part["constant"],
        pvalue_shuffled=pvalue_shuffled,
        pvalue_lr_shuffled=pvalue_lr_shuffled,
        train_mask=mask,
        alpha=alpha,
        engine=engine,
        cv=int(cv or 0),
        shuffled_control=shuffled_control,
    )


def _statsmodels_engine(
    activations: np.ndarray | torch.Tensor,
    n_layers: int | None,
    y: np.ndarray,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    alpha: float,
    n_jobs: int | None,
    constant: np.ndarray,
    progress: bool,
) -> tuple[np.ndarray, ...]:
    """The notebook's statsmodels fits; returns beta, intercept, se, accuracies, converged."""
    from neuronprobe.logit_reference import fit_neurons_statsmodels

    def as_numpy(x: Any) -> np.ndarray:
        return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

    layer_ids: list[int | None] = list(range(n_layers)) if n_layers is not None else [None]
    layers = [as_numpy(_layer_view(activations, layer)) for layer in layer_ids]
    results, counters = fit_neurons_statsmodels(
        layers, y, train_idx, test_idx, alpha=alpha, n_jobs=n_jobs, progress=progress
    )
    total = int(constant.size)
    if counters.get("singular"):
        logger.warning(
            "statsmodels' Hessian was singular for %d of %d neurons: their beta_se and pvalue "
            "are NaN",
            counters["singular"],
            total,
        )
    others = {k: v for k, v in counters.items() if k != "singular"}
    if others:
        logger.info(
            "statsmodels warnings suppressed (neurons affected of %d): %s",
            total,
            ", ".join(f"{name} {count}" for name, count in sorted(others.items())),
        )
    names = ("beta", "intercept", "beta_se", "train_acc", "test_acc", "converged")
    if n_layers is None:
        return tuple(results[0][name] for name in names)
    return tuple(np.stack([result[name] for result in results]) for name in names)


def _log_summary(part: dict[str, np.ndarray], converged: np.ndarray, total: int, engine: str):
    n_bad = int((~converged).sum())
    if n_bad:
        logger.warning(
            "%d of %d neurons did not converge (%s engine); see NeuronFits.converged",
            n_bad,
            total,
            engine,
        )
    lr_bad = int((~part["lr_converged"]).sum())
    if lr_bad:
        logger.info(
            "%d of %d unpenalised fits stopped before converging (quasi-separation): their "
            "likelihood-ratio p-values are slightly conservative",
            lr_bad,
            total,
        )
    logger.info(
        "fitted %d neurons (%s engine): %d constant, %d separating, %d with non-zero slope",
        total,
        engine,
        int(part["constant"].sum()),
        int(part["separated"].sum()),
        int((part["beta"] != 0).sum()),
    )


# ----------------------------------------------------------------------------------------------
# Multiple comparisons
# ----------------------------------------------------------------------------------------------


def adjust_pvalues(
    pvalues: np.ndarray, correction: str = "bonferroni-layer", significance: float = 0.05
) -> tuple[np.ndarray, np.ndarray]:
    """Adjusted p-values and the per-layer threshold of a multiple-comparison correction.

    Every neuron counts as one test, whether or not its slope is zero (a NaN p-value, from a
    zero slope, is treated as 1).

    Parameters
    ----------
    pvalues : np.ndarray
        ``[layers, neurons]`` (or ``[neurons]``, one layer).
    correction : {"bonferroni-layer", "bonferroni", "fdr-bh"}
        ``"bonferroni-layer"``: the notebook's ``significance / neurons per layer``, a
        family-wise error rate per layer.  ``"bonferroni"``: ``significance / all neurons``,
        family-wise over the whole model.  ``"fdr-bh"``: Benjamini-Hochberg false discovery
        rate ``significance`` over the whole model.
    significance : float, default 0.05
        The family-wise error rate or the false discovery rate.

    Returns
    -------
    adjusted : np.ndarray
        Adjusted p-values, same shape (capped at 1); a neuron is significant iff
        ``adjusted <= significance``.
    threshold : np.ndarray
        ``[layers]`` largest raw p-value that is significant in each layer's test family
        (Bonferroni: ``significance / m``; BH: its step-up cut-off, 0 where nothing passes).
    """
    if correction not in CORRECTIONS:
        raise FitInputError(
            f"correction must be one of {', '.join(CORRECTIONS)}; got {correction!r}."
        )
    if not 0.0 < significance < 1.0:
        raise FitInputError(f"significance must be in (0, 1), got {significance!r}.")
    p = np.asarray(pvalues, dtype=np.float64)
    squeeze = p.ndim == 1
    p = np.atleast_2d(p)
    p = np.where(np.isnan(p), 1.0, p)
    n_layers, per_layer = p.shape
    if correction == "bonferroni-layer":
        adjusted = np.minimum(p * per_layer, 1.0)
        threshold = np.full(n_layers, significance / per_layer)
    elif correction == "bonferroni":
        adjusted = np.minimum(p * p.size, 1.0)
        threshold = np.full(n_layers, significance / p.size)
    else:
        flat = p.ravel()
        m = flat.size
        order = np.argsort(flat, kind="stable")
        ranked = flat[order] * m / np.arange(1, m + 1)
        # Step-up: q_(i) = min over j >= i of p_(j) * m / j.
        q = np.minimum.accumulate(ranked[::-1])[::-1]
        adjusted_flat = np.empty(m)
        adjusted_flat[order] = np.minimum(q, 1.0)
        adjusted = adjusted_flat.reshape(p.shape)
        passing = flat[adjusted_flat <= significance]
        cutoff = float(passing.max()) if passing.size else 0.0
        threshold = np.full(n_layers, cutoff)
    if squeeze:
        return adjusted[0], threshold
    return adjusted, threshold
