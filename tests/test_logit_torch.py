"""The torch solver (``engine="torch"``, and CUDA tensors) against the compiled CPU kernel.

Both engines compute the true optimum of the same objective, so their coefficients agree to
the KKT tolerance (~1e-9 relative here) with identical zero patterns, and everything that
follows from the data and the zero pattern alone (accuracies, AUC, flags) is identical.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuronprobe.logit_kernel import LAYER_OUTPUTS, fit_layer
from neuronprobe.logit_torch import fit_chunk
from neuronprobe.statistics import NeuronFits, fit_neuron_logits

ALPHA = 0.1


def make_layer(seed: int = 0, n: int = 400, positive: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Graded effects over scales 1e-3..1e2, ties, ReLU, separating, constant and zero neurons."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < positive
    labels[:2] = [True, False]
    centred = labels - labels.mean()
    columns = [
        (rng.normal(size=n) + effect * centred + offset) * scale
        for scale in (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
        for effect in (0.0, 0.2, 1.0, 3.0)
        for offset in (0.0, 4.0)
    ]
    columns.append(np.round(rng.normal(size=n) + 0.5 * centred))
    columns.append(np.maximum(0.0, rng.normal(size=n) - 0.3 + centred))
    magnitude = 1.0 + rng.random(n)
    columns.append(np.where(labels, magnitude, -magnitude) * 0.5)
    columns.append(np.where(labels, -magnitude, magnitude) * 50.0)
    columns.append(np.full(n, 1.5))
    columns.append(np.zeros(n))
    return np.stack(columns, axis=1), labels


def assert_coefficients_agree(a: np.ndarray, b: np.ndarray, name: str) -> None:
    np.testing.assert_array_equal(a == 0, b == 0, err_msg=f"{name}: zero pattern")
    np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-13, err_msg=name)


EXACT = ("auc", "train_acc", "test_acc", "cv_acc", "separated", "converged", "constant")


def assert_fits_agree(torched: NeuronFits, fast: NeuronFits) -> None:
    """Every output of ``fit_neuron_logits`` agrees between the torch and the fast engine."""
    np.testing.assert_array_equal(torched.train_mask, fast.train_mask)
    assert torched.beta.shape == fast.beta.shape
    assert_coefficients_agree(torched.beta, fast.beta, "beta")
    assert_coefficients_agree(torched.intercept, fast.intercept, "intercept")
    for name in ("beta_se", "pvalue_lr", "pvalue_lr_shuffled"):
        np.testing.assert_allclose(
            getattr(torched, name), getattr(fast, name), rtol=1e-8, err_msg=name
        )
    # A Wald p-value moves by ~z^2 times the relative change of z.
    for name in ("pvalue", "pvalue_shuffled"):
        np.testing.assert_allclose(
            getattr(torched, name), getattr(fast, name), rtol=1e-6, err_msg=name
        )
    for name in EXACT:
        np.testing.assert_array_equal(getattr(torched, name), getattr(fast, name), err_msg=name)
    assert torched.engine == "torch" and fast.engine == "fast"


@pytest.mark.parametrize("positive", [0.5, 0.2])
def test_fit_chunk_agrees_with_the_kernel(positive):
    x, labels = make_layer(positive=positive)
    order = np.random.default_rng(2).permutation(labels.size)
    train_idx, test_idx = order[:320], order[320:]
    kernel = fit_layer(x, labels, train_idx, test_idx, alpha=ALPHA)
    xt = torch.from_numpy(x)
    chunk = fit_chunk(
        xt[train_idx].T.contiguous(),
        xt[test_idx].T.contiguous(),
        torch.from_numpy(labels[train_idx].astype(np.float64)),
        torch.from_numpy(labels[test_idx].astype(np.float64)),
        alpha=ALPHA,
        max_iter=200,
        kkt_tol=1e-9,
        with_lr=True,
        lr_max_iter=100,
    )
    assert list(chunk) == list(LAYER_OUTPUTS)
    for name, dtype in LAYER_OUTPUTS.items():
        assert chunk[name].dtype == dtype and chunk[name].shape == (x.shape[1],), name
    assert_coefficients_agree(chunk["beta"], kernel["beta"], "beta")
    assert_coefficients_agree(chunk["intercept"], kernel["intercept"], "intercept")
    fitted = ~kernel["constant"]
    for name in ("h00", "spread"):
        np.testing.assert_allclose(
            chunk[name][fitted], kernel[name][fitted], rtol=1e-7, err_msg=name
        )
    np.testing.assert_allclose(chunk["xbar"], kernel["xbar"], rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(chunk["loglik"], kernel["loglik"], rtol=1e-11)
    for name in ("converged", "constant", "train_correct", "test_correct", "separated"):
        np.testing.assert_array_equal(chunk[name], kernel[name], err_msg=name)
    np.testing.assert_array_equal(chunk["test_auc_raw"], kernel["test_auc_raw"])
    assert chunk["finite"].all() and chunk["converged"].all()
    assert kernel["separated"].sum() == 2 and kernel["constant"].sum() == 2


@pytest.mark.parametrize("positive", [0.5, 0.25])
def test_torch_engine_agrees_with_fast_on_every_output(positive):
    x, labels = make_layer(seed=1, positive=positive)
    options = {"cv": 3, "shuffled_control": True, "seed": 4}
    fast = fit_neuron_logits(x, labels, **options)
    torched = fit_neuron_logits(torch.from_numpy(x), labels, engine="torch", **options)
    assert_fits_agree(torched, fast)
    # The numpy input goes through the torch solver too when asked for.
    assert_fits_agree(fit_neuron_logits(x, labels, engine="torch", **options), fast)


def test_torch_engine_on_layers_and_in_chunks():
    x, labels = make_layer(seed=3)
    stacked = np.stack([x, x[:, ::-1] * 3.0 - 1.0]).astype(np.float32)
    fast = fit_neuron_logits(stacked, labels)
    for chunk_size in (1, 7, None):
        torched = fit_neuron_logits(
            torch.from_numpy(stacked), labels, engine="torch", chunk_size=chunk_size
        )
        assert torched.beta.shape == (2, x.shape[1])
        assert_fits_agree(torched, fast)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_cpu_tensor_with_fast_engine_equals_numpy_input(dtype):
    x, labels = make_layer(seed=5)
    tensor = torch.from_numpy(x).to(dtype)
    # The values the kernel sees: float32/float64 as they are, other dtypes as float32.
    values = tensor.numpy() if dtype in (torch.float64, torch.float32) else tensor.float().numpy()
    from_tensor = fit_neuron_logits(tensor, torch.from_numpy(labels), cv=3, shuffled_control=True)
    from_numpy = fit_neuron_logits(values, labels, cv=3, shuffled_control=True)
    for name in from_numpy.__dataclass_fields__:
        a, b = getattr(from_tensor, name), getattr(from_numpy, name)
        if isinstance(b, np.ndarray):
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            assert a == b, name


def test_layer_subset_of_a_3d_tensor_and_a_non_contiguous_tensor():
    x, labels = make_layer(seed=6)
    stacked = torch.from_numpy(np.stack([x, -x]))
    whole = fit_neuron_logits(stacked, labels, engine="torch")
    transposed = stacked.transpose(1, 2).contiguous().transpose(1, 2)  # strides of a view
    assert not transposed.is_contiguous()
    again = fit_neuron_logits(transposed, labels, engine="torch")
    for name in ("beta", "intercept", "pvalue", "pvalue_lr", "auc", "test_acc"):
        np.testing.assert_array_equal(getattr(again, name), getattr(whole, name), err_msg=name)
    # Negating the activations negates the slope and leaves everything else as it was.
    assert_coefficients_agree(whole.beta[1], -whole.beta[0], "beta")
    assert_coefficients_agree(whole.intercept[1], whole.intercept[0], "intercept")
    np.testing.assert_allclose(whole.pvalue_lr[1], whole.pvalue_lr[0], rtol=1e-10)
    np.testing.assert_allclose(whole.auc[1], whole.auc[0], rtol=0, atol=1e-15)  # 1 - (1 - a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensor_agrees_with_cpu():
    x, labels = make_layer(seed=7)
    options = {"cv": 3, "shuffled_control": True}
    fast = fit_neuron_logits(x, labels, **options)
    on_gpu = fit_neuron_logits(torch.from_numpy(x).cuda(), labels, **options)
    assert on_gpu.engine == "fast"  # "fast" runs the torch solver on CUDA tensors
    for name in ("beta", "intercept"):
        assert_coefficients_agree(getattr(on_gpu, name), getattr(fast, name), name)
    for name in EXACT:
        np.testing.assert_array_equal(getattr(on_gpu, name), getattr(fast, name), err_msg=name)
    np.testing.assert_allclose(on_gpu.pvalue_lr, fast.pvalue_lr, rtol=1e-8)
