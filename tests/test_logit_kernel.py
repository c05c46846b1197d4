"""The compiled CPU kernel, ``logit_kernel.fit_layer``, against numpy, scipy, sklearn, statsmodels.

Every per-neuron output of :func:`fit_layer` has an independent definition (the Hessian factors,
the maximised unpenalised log-likelihood, the Mann-Whitney AUC, the correct-prediction counts,
the separation flag); each is recomputed here from that definition.  The kernel works neuron
by neuron, so its results must not depend on the neighbours, the memory layout or the dtype
of exactly representable values.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import optimize
from scipy.special import expit
from sklearn.metrics import roc_auc_score

from neuronprobe.logit_kernel import LAYER_OUTPUTS, fit_layer, intercept_only_optimum

ALPHA = 0.1


def make_layer(seed: int = 0, n: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Unbalanced labels; graded effects over scales 1e-3..1e2, ties, separating, constant."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.35
    labels[:2] = [True, False]
    centred = labels - labels.mean()
    columns = [
        (rng.normal(size=n) + effect * centred + offset) * scale
        for scale in (1e-3, 1e-1, 1.0, 1e2)
        for effect in (0.0, 0.2, 1.0, 3.0)
        for offset in (0.0, 5.0)
    ]
    columns.append(np.round(rng.normal(size=n) + 0.5 * centred))  # few values, many ties
    columns.append(np.maximum(0.0, rng.normal(size=n) - 0.3 + centred))  # ReLU-like
    magnitude = 1.0 + rng.random(n)
    columns.append(np.where(labels, magnitude, -magnitude))  # separating, positive up
    columns.append(np.where(labels, -magnitude, magnitude) * 30.0)  # separating, positive down
    columns.append(np.full(n, -2.0))  # constant
    return np.stack(columns, axis=1), labels


def split(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded 80/20 split as index arrays (deliberately unsorted)."""
    order = np.random.default_rng(seed).permutation(labels.size)
    cut = int(0.8 * labels.size)
    return order[:cut], order[cut:]


@pytest.fixture(scope="module")
def layer() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, labels = make_layer()
    train_idx, test_idx = split(labels)
    return x, labels, train_idx, test_idx


@pytest.fixture(scope="module")
def out(layer) -> dict[str, np.ndarray]:
    x, labels, train_idx, test_idx = layer
    return fit_layer(x, labels, train_idx, test_idx, alpha=ALPHA)


def assert_outputs_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    for name in LAYER_OUTPUTS:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_output_names_shapes_and_dtypes(layer, out):
    x = layer[0]
    assert list(out) == list(LAYER_OUTPUTS)
    for name, dtype in LAYER_OUTPUTS.items():
        assert out[name].dtype == dtype and out[name].shape == (x.shape[1],), name
    assert out["finite"].all() and out["converged"].all()
    assert (out["iterations"] <= 200).all()


def test_solution_satisfies_kkt_and_hessian_factors_are_exact(layer, out):
    x, labels, train_idx, _ = layer
    xt, y = x[train_idx], labels[train_idx].astype(np.float64)
    for j in np.flatnonzero(~out["constant"]):
        b0, b1 = out["intercept"][j], out["beta"][j]
        eta = b0 + b1 * xt[:, j]
        p = expit(eta)
        g = np.array([(p - y).sum(), ((p - y) * xt[:, j]).sum()])
        for g_k, b_k, scale in ((g[0], b0, y.size), (g[1], b1, np.abs(xt[:, j]).sum())):
            tol = 1e-9 * ALPHA + 1e-13 * scale
            if b_k != 0:
                assert abs(g_k + ALPHA * np.sign(b_k)) <= tol, j
            else:
                assert abs(g_k) <= ALPHA + tol, j
        # Hessian of -loglik at the solution, factored: h00 = sum w, xbar = sum w x / h00,
        # spread = sum w (x - xbar)^2.
        w = expit(eta) * expit(-eta)  # p (1 - p) without cancellation
        h00 = w.sum()
        xbar = (w * xt[:, j]).sum() / h00
        spread = (w * (xt[:, j] - xbar) ** 2).sum()
        assert out["h00"][j] == pytest.approx(h00, rel=1e-10, abs=0), j
        assert out["xbar"][j] == pytest.approx(xbar, rel=1e-9, abs=1e-12 * np.abs(xt[:, j]).max())
        assert out["spread"][j] == pytest.approx(spread, rel=1e-8, abs=0), j


def test_constant_neuron(layer, out):
    x, labels, train_idx, _ = layer
    j = x.shape[1] - 1
    assert out["constant"].tolist() == [False] * j + [True]
    n1, n = int(labels[train_idx].sum()), train_idx.size
    assert out["beta"][j] == 0.0 and out["intercept"][j] == intercept_only_optimum(n1, n, ALPHA)
    assert out["h00"][j] == 0.0 and out["spread"][j] == 0.0 and out["xbar"][j] == -2.0
    assert out["loglik"][j] == pytest.approx(
        n1 * np.log(n1 / n) + (n - n1) * np.log1p(-n1 / n), rel=1e-13
    )
    assert out["iterations"][j] == 0 and not out["separated"][j]


def test_counts_and_auc_follow_their_definitions(layer, out):
    x, labels, train_idx, test_idx = layer
    positive = out["intercept"] + out["beta"] * x > 0
    np.testing.assert_array_equal(
        out["train_correct"], (positive[train_idx] == labels[train_idx, None]).sum(axis=0)
    )
    np.testing.assert_array_equal(
        out["test_correct"], (positive[test_idx] == labels[test_idx, None]).sum(axis=0)
    )
    # The activation's own held-out AUC (ties count one half), whatever the slope's sign.
    expected = [roc_auc_score(labels[test_idx], x[test_idx, j]) for j in range(x.shape[1])]
    np.testing.assert_allclose(out["test_auc_raw"], expected, rtol=0, atol=1e-12)
    assert out["test_auc_raw"][-3] == 1.0 and out["test_auc_raw"][-2] == 0.0


def test_auc_with_many_held_out_contexts_uses_the_sorted_path():
    # n_pos * n_neg > 65536 switches from pairwise counting to binary search.
    rng = np.random.default_rng(4)
    n = 1200
    labels = np.arange(n) % 2 == 0
    x = np.round(rng.normal(size=(n, 3)) + np.array([0.0, 0.3, 1.0]) * labels[:, None], 1)
    train_idx, test_idx = np.arange(200), np.arange(200, n)  # 500 x 500 held-out pairs
    out = fit_layer(x, labels, train_idx, test_idx, alpha=ALPHA)
    expected = [roc_auc_score(labels[test_idx], x[test_idx, j]) for j in range(3)]
    np.testing.assert_allclose(out["test_auc_raw"], expected, rtol=0, atol=1e-12)


def test_loglik_is_the_unpenalised_maximum(layer, out):
    import statsmodels.api as sm

    x, labels, train_idx, _ = layer
    y = labels[train_idx].astype(np.float64)
    compared = 0
    for j in np.flatnonzero(~out["constant"] & ~out["separated"]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = sm.Logit(y, sm.add_constant(x[train_idx, j], has_constant="add")).fit(
                disp=0, tol=1e-12, maxiter=200
            )
        if not result.mle_retvals["converged"]:
            continue
        assert out["lr_converged"][j], j
        # statsmodels' llf at its own (converged) MLE; ours can only be higher, by rounding.
        assert out["loglik"][j] == pytest.approx(result.llf, rel=1e-11), j
        compared += 1
    assert compared >= 30
    assert (out["loglik"][out["separated"]] == 0.0).all()  # the supremum
    assert (out["loglik"] <= 0.0).all()


def test_separated_flag(layer, out):
    x, labels, train_idx, _ = layer
    xt, y = x[train_idx], labels[train_idx]
    expected = (xt[y].min(0) > xt[~y].max(0)) | (xt[~y].min(0) > xt[y].max(0))
    np.testing.assert_array_equal(out["separated"], expected)
    assert out["separated"].tolist()[-3:] == [True, True, False]
    # A separating neuron's L1 optimum is finite and classifies every training context.
    assert (out["train_correct"][out["separated"]] == train_idx.size).all()
    assert out["beta"][-3] > 0 > out["beta"][-2]


def test_results_do_not_depend_on_neighbours_layout_or_dtype(layer, out, tmp_path: Path):
    x, labels, train_idx, test_idx = layer

    def fit(values: np.ndarray) -> dict[str, np.ndarray]:
        return fit_layer(values, labels, train_idx, test_idx, alpha=ALPHA)

    perm = np.random.default_rng(1).permutation(x.shape[1])
    permuted = fit(x[:, perm])
    assert_outputs_equal(permuted, {name: value[perm] for name, value in out.items()})
    assert_outputs_equal(fit(np.asfortranarray(x)), out)
    wide = np.repeat(x, 2, axis=1)  # a strided view picks every other column
    assert_outputs_equal(fit(wide[:, ::2]), out)
    some = fit(x[:, 5:21])
    assert_outputs_equal(some, {name: value[5:21] for name, value in out.items()})
    # float32 values are gathered as float64: same results as their float64 copy.
    x32 = x.astype(np.float32)
    out32 = fit(x32)
    assert_outputs_equal(out32, fit(x32.astype(np.float64)))
    path = tmp_path / "layer.f32"
    x32.tofile(path)
    assert_outputs_equal(fit(np.memmap(path, dtype=np.float32, mode="r", shape=x.shape)), out32)
    # Other dtypes are converted to float32.
    assert_outputs_equal(
        fit(x32.astype(np.float16)), fit(x32.astype(np.float16).astype(np.float32))
    )


def test_non_finite_neuron_is_flagged_and_others_are_unaffected(layer, out):
    x, labels, train_idx, test_idx = layer
    bad = x.copy()
    bad[train_idx[3], 4] = np.nan
    bad[test_idx[0], 9] = np.inf
    result = fit_layer(bad, labels, train_idx, test_idx, alpha=ALPHA)
    assert np.flatnonzero(~result["finite"]).tolist() == [4, 9]
    keep = np.ones(x.shape[1], dtype=bool)
    keep[[4, 9]] = False
    assert_outputs_equal(
        {name: value[keep] for name, value in result.items()},
        {name: value[keep] for name, value in out.items()},
    )


def test_with_lr_false_skips_only_the_unpenalised_fit(layer, out):
    x, labels, train_idx, test_idx = layer
    result = fit_layer(x, labels, train_idx, test_idx, alpha=ALPHA, with_lr=False)
    fitted = ~out["constant"]
    assert np.isnan(result["loglik"][fitted]).all() and not result["lr_converged"][fitted].any()
    for name in LAYER_OUTPUTS:
        if name not in ("loglik", "lr_converged"):
            np.testing.assert_array_equal(result[name], out[name], err_msg=name)


def test_iteration_cap_reports_non_convergence(layer, out):
    x, labels, train_idx, test_idx = layer
    capped = fit_layer(x, labels, train_idx, test_idx, alpha=ALPHA, max_iter=1)
    assert (capped["iterations"] <= 1).all()
    assert not capped["converged"].all()
    slow = out["iterations"] > 1
    assert slow.any() and not capped["converged"][slow].any()
    done = out["iterations"] == 0  # already optimal at the start: the same answer
    np.testing.assert_array_equal(capped["beta"][done], out["beta"][done])


def test_empty_held_out_side_gives_nan_auc(layer):
    x, labels, train_idx, _ = layer
    result = fit_layer(x, labels, train_idx, np.array([], dtype=np.int64), alpha=ALPHA)
    assert np.isnan(result["test_auc_raw"]).all() and (result["test_correct"] == 0).all()


@pytest.mark.parametrize("alpha", [0.01, 0.1, 1.0, 7.5])
def test_intercept_only_optimum(alpha):
    for n, n1 in ((100, 50), (100, 51), (100, 70), (37, 3), (37, 34), (1000, 999), (10, 1)):
        b0 = intercept_only_optimum(n1, n, alpha)

        def objective(b: float, n1: int = n1, n: int = n) -> float:
            return n * np.logaddexp(0.0, b) - n1 * b + alpha * abs(b)

        best = optimize.minimize_scalar(objective, bounds=(-30, 30), method="bounded")
        assert objective(b0) <= objective(best.x) + 1e-12 * n, (n, n1)
        if abs(n1 - n / 2) <= alpha:
            assert b0 == 0.0
        else:  # KKT: n*sigmoid(b0) - n1 + alpha*sign(b0) = 0
            assert n * expit(b0) - n1 + alpha * np.sign(b0) == pytest.approx(0.0, abs=1e-9)
            assert np.sign(b0) == np.sign(n1 - n / 2)


def test_a_kernel_compiled_afresh_gives_the_bits_of_the_cached_one(tmp_path: Path) -> None:
    """The first run on a machine compiles the kernel (numba's cache is cold), later runs load
    it from the cache: both must give the same bits, or a rerun does not reproduce a run.
    (With fast-math reassociation the two differed in the last bits of some sums.)"""
    import os
    import subprocess
    import sys

    script = (
        "import sys; import numpy as np\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_logit_kernel import ALPHA, make_layer, split\n"
        "from neuronprobe.logit_kernel import fit_layer\n"
        "x, labels = make_layer(); train_idx, test_idx = split(labels)\n"
        "np.savez(sys.argv[1], **fit_layer(x.astype(np.float32), labels, train_idx, test_idx,"
        " alpha=ALPHA))\n"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}
    for name in ("compiled", "cached"):
        done = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / f"{name}.npz")],
            env=env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
    assert any((tmp_path / "numba-cache").rglob("*.nbc"))  # the second run loaded the cache
    compiled, cached = np.load(tmp_path / "compiled.npz"), np.load(tmp_path / "cached.npz")
    assert_outputs_equal(dict(compiled), dict(cached))
