"""Statistics-stage benchmark: the fast engine against statsmodels on gpt2-medium's shape.

98,304 neurons (24 layers x 4,096, gpt2-medium's MLP) x 1,000 contexts of synthetic activations
(float32, 393 MB, seeded): per neuron a random scale (log-uniform 0.01..10) and offset, a label
effect of varied strength (most neurons null or weak, some moderate or strong, a few perfectly
separating), heavy tails for some, ReLU-like neurons with many exact zeros, a few constant ones;
500 + 500 balanced labels.

Measured in the same run, on the same machine:

* the statsmodels engine, ``fit_neuron_logits(x, labels, engine="statsmodels")``, which is the
  notebook's per-neuron call ``sm.Logit(y, add_constant(x)).fit_regularized(method="l1",
  alpha=.1, maxiter=3000)``, on ``--neurons-statsmodels`` random neurons in one process
  (``n_jobs=1``) and in two (``n_jobs=2``), scaled to all neurons (the two-process figure adds
  the workers' start-up, measured apart, once);
* the notebook's part 3 loop literally (a fresh ``train_test_split`` per neuron, then the same
  statsmodels call, p-value, beta and both accuracies) on ``--neurons-notebook`` neurons,
  scaled;
* the torch engine on the CPU on ``--torch-layers`` layers, scaled;
* the fast engine (compiled kernel) on all neurons, warm, best of ``--repeats``: the full
  default table (``fit_neuron_logits(acts, labels)``: L1 betas and intercepts, Wald and
  likelihood-ratio p-values, accuracies, AUC) and the notebook's quantities alone (the same
  split and kernel with the likelihood-ratio fit skipped, then the Wald p-values), plus the
  first call's compile-or-load time;
* the full table's peak extra memory, in a fresh subprocess: the activations are loaded from a
  temporary .npy, the process's high-water mark (VmHWM) is reset to its current RSS through
  /proc/self/clear_refs, and the peak after the fit minus that RSS is reported;
* the full table on a GPU (torch solver on a CUDA tensor), only if one is visible.

    python benchmarks/bench_probe.py            # all of it (~2 min here)
    python benchmarks/bench_probe.py --quick    # 4 x 4,096 neurons, smoke test (~1 min)

Prints one table: each figure, its target (time targets scale with the neuron count under
--quick), its speed-up over the statsmodels loop (one process), and pass/fail; then the sanity
check that the fast engine's optimum is at least as good as statsmodels' on the sampled neurons
(exit status 1 if not). The fast engine runs numba's threads (NUMBA_NUM_THREADS, default: all
cores). Other processes on the two cores slow every figure down; the load averages before and
after and the cores kept busy (CPU s / wall s) say how much: compare runs where the fast
engine's "cores busy" is near the thread count.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

MB = 1e6  # decimal megabytes
ALPHA = 0.1  # the notebook's L1 weight
FULL_SHAPE = (24, 1000, 4096)  # gpt2-medium: layers, contexts, MLP neurons per layer
QUICK_LAYERS = 4
#: Targets on the 2-core CPU for the full 98,304 neurons (seconds; scaled under --quick).
TARGET_NOTEBOOK_S = 1.0
TARGET_FULL_S = 2.0
TARGET_SPEEDUP = 200.0
TARGET_MEMORY_RATIO = 2.0  # peak extra memory < this x the activations' bytes
#: Kinds of synthetic neurons and their share of all neurons (the rest are null).
KIND_SHARES = {
    "weak": 0.35,
    "moderate": 0.10,
    "strong": 0.04,
    "separating": 0.003,
    "constant": 0.001,
}
KINDS = ("null", *KIND_SHARES)
RELU_SHARE = 0.20  # of the non-constant, non-separating neurons: ReLU-like, many exact zeros
HEAVY_SHARE = 0.10  # of the others: Student-t(4) noise instead of Gaussian
HEADER = ("figure", "measured", "target", "vs statsmodels", "pass")
_STARTUP_SLEEP_S = 0.2  # each start-up worker waits this long after its imports


# ----------------------------------------------------------------------------------------------
# Synthetic activations
# ----------------------------------------------------------------------------------------------


def make_activations(
    n_layers: int, n_contexts: int, n_neurons: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded realistic activations ``[layers, contexts, neurons]`` float32 and their labels.

    Returns ``(activations, labels, kind, relu)``: labels bool ``[contexts]`` (the notebook's
    ``hstack(zeros(n/2), ones(n/2))``), ``kind`` int8 ``[layers, neurons]`` indexing
    :data:`KINDS`, ``relu`` bool ``[layers, neurons]``.
    """
    rng = np.random.default_rng(seed)
    half = n_contexts // 2
    labels = np.hstack((np.zeros(half, bool), np.ones(n_contexts - half, bool)))
    sign_y = np.where(labels, 0.5, -0.5).astype(np.float32)[:, None]  # centred label effect
    acts = np.empty((n_layers, n_contexts, n_neurons), dtype=np.float32)
    kinds = np.zeros((n_layers, n_neurons), dtype=np.int8)
    relus = np.zeros((n_layers, n_neurons), dtype=bool)
    shares = [1.0 - sum(KIND_SHARES.values()), *KIND_SHARES.values()]
    bounds = np.cumsum(shares)[:-1]  # kind i covers [bounds[i-1], bounds[i]) of [0, 1)
    for layer in range(n_layers):
        kind = np.searchsorted(bounds, rng.random(n_neurons), side="right").astype(np.int8)
        sign = rng.choice([-1.0, 1.0], n_neurons)
        effect = np.zeros(n_neurons)  # in noise standard deviations
        weak, moderate, strong = (kind == KINDS.index(k) for k in ("weak", "moderate", "strong"))
        effect[weak] = rng.normal(0.0, 0.15, weak.sum())
        effect[moderate] = sign[moderate] * rng.uniform(0.3, 1.0, moderate.sum())
        effect[strong] = sign[strong] * rng.uniform(1.0, 3.0, strong.sum())
        separating = kind == KINDS.index("separating")
        constant = kind == KINDS.index("constant")
        free = ~(separating | constant)
        relu = free & (rng.random(n_neurons) < RELU_SHARE)
        heavy = free & ~relu & (rng.random(n_neurons) < HEAVY_SHARE)
        scale = (10.0 ** rng.uniform(-2.0, 1.0, n_neurons)).astype(np.float32)
        offset = (scale * rng.normal(0.0, 2.0, n_neurons)).astype(np.float32)
        offset[relu] = 0.0

        x = rng.standard_normal((n_contexts, n_neurons), dtype=np.float32)
        if heavy.any():
            t = rng.standard_t(4.0, (n_contexts, int(heavy.sum()))) / math.sqrt(2.0)
            x[:, heavy] = t.astype(np.float32)
        x += sign_y * effect.astype(np.float32)
        if relu.any():  # max(x - shift, 0): 70-98 % exact zeros
            shift = rng.uniform(0.5, 2.0, int(relu.sum())).astype(np.float32)
            x[:, relu] = np.maximum(x[:, relu] - shift, 0.0)
        if separating.any():  # positives above a gap, negatives below it (or the reverse)
            gap = rng.uniform(0.05, 1.0, int(separating.sum())).astype(np.float32)
            side = (sign_y * 2.0) * sign[separating].astype(np.float32)
            x[:, separating] = side * (gap + np.abs(x[:, separating]))
        x *= scale
        x += offset
        x[:, constant] = offset[constant]
        acts[layer] = x
        kinds[layer] = kind
        relus[layer] = relu
    return acts, labels, kinds, relus


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------


def cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads) so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def best_of(repeats: int, call: Callable[[], Any]) -> tuple[float, float, Any]:
    """Run ``call`` ``repeats`` times; fastest wall seconds, its cores busy, last result."""
    best, busy, result = math.inf, float("nan"), None
    for _ in range(repeats):
        cpu = cpu_seconds()
        start = time.perf_counter()
        result = call()
        seconds = time.perf_counter() - start
        if seconds < best:
            best, busy = seconds, (cpu_seconds() - cpu) / seconds
    return best, busy, result


def statsmodels_startup(n_jobs: int) -> float:
    """Seconds to start ``n_jobs`` spawned workers that import what the statsmodels engine needs."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=n_jobs, mp_context=context) as pool:
        list(pool.map(_import_statsmodels, range(n_jobs)))
    return time.perf_counter() - start - _STARTUP_SLEEP_S


def _import_statsmodels(_: int) -> None:
    import statsmodels.api  # noqa: F401

    import neuronprobe.logit_reference  # noqa: F401

    time.sleep(_STARTUP_SLEEP_S)  # keep this worker busy: the other one takes the other task


def notebook_loop(x: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """The notebook's part 3 loop on the columns of ``x [contexts, neurons]``; seconds, raised.

    Verbatim but for the source of each neuron's values; ``raised`` counts neurons on which the
    notebook's code raises (a singular Hessian at SLSQP's stopping point, e.g. under separation).
    """
    import statsmodels.api as sm
    from sklearn.model_selection import train_test_split

    category_labels = labels
    test_prop = 0.2
    nneurons = x.shape[1]
    classifierResults = np.full((nneurons, 4), np.nan)
    raised = 0
    # The notebook's splits draw from numpy's global state; seeded here for repeatability.
    np.random.seed(0)  # noqa: NPY002
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for neuroni in range(nneurons):
            X = sm.add_constant(x[:, neuroni])
            X_train, X_test, y_train, y_test = train_test_split(
                X, category_labels, test_size=test_prop, stratify=category_labels
            )
            try:
                result = sm.Logit(y_train, X_train).fit_regularized(
                    maxiter=3000, disp=0, method="l1", alpha=0.1
                )
                classifierResults[neuroni, 0] = result.pvalues[1]
                classifierResults[neuroni, 1] = result.params[1]
                classifierResults[neuroni, 2] = (
                    100 * ((result.predict(X_train) > 0.5) == y_train).mean()
                )
                classifierResults[neuroni, 3] = (
                    100 * ((result.predict(X_test) > 0.5) == y_test).mean()
                )
            except (np.linalg.LinAlgError, IndexError):
                raised += 1
    return time.perf_counter() - start, raised


def skip_lr_option() -> str | None:
    """Name of a ``fit_neuron_logits`` option that skips the likelihood-ratio fit, if any."""
    from neuronprobe.statistics import fit_neuron_logits

    names = inspect.signature(fit_neuron_logits).parameters
    return next((n for n in ("with_lr", "likelihood_ratio", "lr") if n in names), None)


def notebook_quantities(acts: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Betas, intercepts, Wald p-values and accuracies as ``fit_neuron_logits`` computes them.

    Uses the statistics module's option to skip the likelihood-ratio fit if it has one; else
    the same steps as ``fit_neuron_logits``: its split, ``logit_kernel.fit_layer`` per layer
    with ``with_lr=False``, statsmodels' slope standard error and the Wald p-value.
    """
    from scipy import stats

    from neuronprobe.logit_kernel import fit_layer
    from neuronprobe.statistics import fit_neuron_logits, stratified_train_mask

    option = skip_lr_option()
    if option is not None:
        fits = fit_neuron_logits(acts, labels, **{option: False})
        return {
            name: getattr(fits, name)
            for name in ("beta", "intercept", "pvalue", "train_acc", "test_acc")
        }
    mask = stratified_train_mask(labels, test_size=0.2, seed=0)
    train_idx, test_idx = np.flatnonzero(mask), np.flatnonzero(~mask)
    parts = [
        fit_layer(acts[layer], labels, train_idx, test_idx, alpha=ALPHA, with_lr=False)
        for layer in range(acts.shape[0])
    ]
    part = {name: np.stack([p[name] for p in parts]) for name in parts[0]}
    beta, b0 = part["beta"], part["intercept"]
    with np.errstate(divide="ignore", invalid="ignore"):
        var = np.where(
            b0 != 0, 1.0 / part["spread"], 1.0 / (part["spread"] + part["h00"] * part["xbar"] ** 2)
        )
        se = np.sqrt(var)
        se = np.where((beta != 0) & np.isfinite(se), se, np.nan)
        pvalue = 2.0 * stats.norm.sf(np.abs(beta / se))
    return {
        "beta": beta,
        "intercept": b0,
        "pvalue": pvalue,
        "train_acc": 100.0 * part["train_correct"] / train_idx.size,
        "test_acc": 100.0 * part["test_correct"] / test_idx.size,
    }


def objective(x: np.ndarray, y: np.ndarray, b0: np.ndarray, b1: np.ndarray) -> np.ndarray:
    """The L1 objective ``-loglik + alpha*(|b0| + |b1|)`` per column of ``x [contexts, k]``."""
    z = b0[None, :] + b1[None, :] * x.astype(np.float64)
    loss = np.logaddexp(0.0, z) - y[:, None] * z
    return loss.sum(axis=0) + ALPHA * (np.abs(b0) + np.abs(b1))


def read_status(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_worker(path: Path, result_path: Path) -> None:
    """In a fresh process: load the activations, then the full table's peak extra memory."""
    from neuronprobe.statistics import fit_neuron_logits

    data = np.load(path)
    acts, labels = data["acts"], data["labels"]  # read (and so touched) in full
    fit_neuron_logits(np.ascontiguousarray(acts[:1, :, :64]), labels)  # load the kernel
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    baseline = read_status("VmRSS") if reset else read_status("VmHWM")
    start = time.perf_counter()
    fit_neuron_logits(acts, labels)
    seconds = time.perf_counter() - start
    peak = read_status("VmHWM")
    result = {
        "baseline": baseline,
        "peak": peak,
        "reset": reset,
        "seconds": seconds,
        "nbytes": acts.nbytes,
    }
    result_path.write_text(json.dumps(result))


def measure_memory(acts: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Run :func:`memory_worker` in a subprocess over a temporary copy of the activations."""
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        path, result_path = folder / "acts.npz", folder / "memory.json"
        np.savez(path, acts=acts, labels=labels)
        command = [sys.executable, __file__, "--memory-worker", str(path)]
        subprocess.run([*command, "--result", str(result_path)], check=True)
        return json.loads(result_path.read_text())


def gpu_full_table(acts: np.ndarray, labels: np.ndarray, repeats: int) -> dict[str, Any] | None:
    """The full table with the torch solver on a CUDA tensor, if a GPU is visible."""
    import torch

    from neuronprobe.statistics import fit_neuron_logits

    if not torch.cuda.is_available():
        return None
    start = time.perf_counter()
    tensor = torch.from_numpy(acts).cuda()
    torch.cuda.synchronize()
    upload = time.perf_counter() - start
    fit_neuron_logits(tensor[:1, :, :256], labels)  # warm-up

    def call() -> Any:
        fits = fit_neuron_logits(tensor, labels)
        torch.cuda.synchronize()
        return fits

    seconds, _, fits = best_of(repeats, call)
    return {
        "seconds": seconds,
        "upload": upload,
        "device": torch.cuda.get_device_name(),
        "fits": fits,
    }


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def times(ratio: float) -> str:
    """A speed ratio, ``"1.6x"`` or ``"215x"``."""
    return f"{ratio:.1f}x" if ratio < 10 else f"{ratio:,.0f}x"


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("pass" if ok else "FAIL")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_LAYERS} x 4096 neurons (smoke test)"
    )
    parser.add_argument(
        "--neurons-statsmodels",
        type=int,
        default=512,
        help="random neurons fitted by the statsmodels engine (default 512)",
    )
    parser.add_argument(
        "--neurons-notebook",
        type=int,
        default=100,
        help="neurons run through the notebook's own loop (default 100)",
    )
    parser.add_argument(
        "--torch-layers", type=int, default=2, help="layers fitted by the torch engine (default 2)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="fast-engine runs (best of)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the activations")
    parser.add_argument("--memory-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        memory_worker(args.memory_worker, args.result)
        return

    n_layers, n_contexts, per_layer = FULL_SHAPE
    if args.quick:
        n_layers = QUICK_LAYERS
        args.neurons_statsmodels = min(args.neurons_statsmodels, 256)
        args.neurons_notebook = min(args.neurons_notebook, 20)
        args.torch_layers = 1
        args.repeats = min(args.repeats, 2)
    n_total = n_layers * per_layer
    scale_targets = n_total / (FULL_SHAPE[0] * FULL_SHAPE[2])

    print(f"load average before the run: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    start = time.perf_counter()
    import numba
    import torch

    from neuronprobe.statistics import fit_neuron_logits

    import_s = time.perf_counter() - start
    print(
        f"numba threads: {numba.get_num_threads()}, torch threads: {torch.get_num_threads()}; "
        f"import neuronprobe.statistics: {import_s:.1f} s"
    )

    start = time.perf_counter()
    acts, labels, kinds, relus = make_activations(n_layers, n_contexts, per_layer, args.seed)
    made_s = time.perf_counter() - start
    counts = ", ".join(f"{k} {int((kinds == i).sum())}" for i, k in enumerate(KINDS))
    zeros = sum(int((acts[layer][:, relus[layer]] == 0).sum()) for layer in range(n_layers))
    print(
        f"activations {acts.shape} float32, {acts.nbytes / MB:.0f} MB, made in {made_s:.1f} s;"
        f" labels {int((~labels).sum())} + {int(labels.sum())}\n{n_total:,} neurons: {counts};"
        f" ReLU-like {int(relus.sum())} ({100 * zeros / max(relus.sum() * n_contexts, 1):.0f} %"
        " exact zeros)"
    )

    # (c) fast engine: first call (compile or load from numba's cache), then warm, full table.
    cache = Path(inspect.getfile(fit_neuron_logits)).parent / "__pycache__"
    cached = any(cache.glob("logit_kernel.*.nbi"))
    start = time.perf_counter()
    fit_neuron_logits(np.ascontiguousarray(acts[:1, :, :64]), labels)
    first_call_s = time.perf_counter() - start
    full_s, full_busy, fits = best_of(args.repeats, lambda: fit_neuron_logits(acts, labels))

    # (d) the notebook's quantities alone (no likelihood-ratio fit).
    notebook_quantities(acts[:1, :, :64], labels)
    nbq_s, nbq_busy, nbq = best_of(args.repeats, lambda: notebook_quantities(acts, labels))
    same = all(
        np.array_equal(nbq[name], getattr(fits, name), equal_nan=True)
        for name in ("beta", "intercept", "pvalue", "train_acc", "test_acc")
    )

    # (a) the statsmodels engine on a random sample of neurons, one and two processes.
    rng = np.random.default_rng(args.seed + 1)
    k = min(args.neurons_statsmodels, n_total)
    flat = np.sort(rng.choice(n_total, size=k, replace=False))
    layer_of, neuron_of = np.divmod(flat, per_layer)
    sample = np.ascontiguousarray(acts[layer_of, :, neuron_of].T)  # [contexts, k]
    fit_neuron_logits(sample[:, :4], labels, engine="statsmodels", n_jobs=1)  # imports
    cpu = cpu_seconds()
    start = time.perf_counter()
    sm_fits = fit_neuron_logits(sample, labels, engine="statsmodels", n_jobs=1)
    sm1_s = time.perf_counter() - start
    sm1_cpu = cpu_seconds() - cpu
    sm1_total = sm1_s / k * n_total
    startup_s = statsmodels_startup(2)
    start = time.perf_counter()
    fit_neuron_logits(sample, labels, engine="statsmodels", n_jobs=2)
    sm2_s = time.perf_counter() - start
    # Per neuron once the workers run, never below a perfect split of the 1-process time.
    sm2_floored = (sm2_s - startup_s) / k < sm1_s / k / 2
    sm2_per = max((sm2_s - startup_s) / k, sm1_s / k / 2)
    sm2_total = startup_s + sm2_per * n_total

    # (b) the notebook's own loop (a split per neuron) on non-constant sampled neurons.
    usable = np.flatnonzero(kinds[layer_of, neuron_of] != KINDS.index("constant"))
    m = min(args.neurons_notebook, usable.size)
    cpu = cpu_seconds()
    loop_s, loop_raised = notebook_loop(sample[:, usable[:m]], labels)
    loop_busy = (cpu_seconds() - cpu) / loop_s
    loop_total = loop_s / m * n_total

    # (e) the torch engine on the CPU, on a few layers.
    t_layers = min(args.torch_layers, n_layers)
    torch_s, torch_busy, _ = best_of(
        1, lambda: fit_neuron_logits(acts[:t_layers], labels, engine="torch")
    )
    torch_total = torch_s * n_layers / t_layers

    gpu = gpu_full_table(acts, labels, args.repeats)

    # (f) peak extra memory of the full table, in a fresh process.
    memory = measure_memory(acts, labels)
    extra = memory["peak"] - memory["baseline"]

    # Sanity: the fast engine's optimum is at least as good as statsmodels' on the sample.
    train = fits.train_mask
    y_train = labels[train].astype(np.float64)
    x_train = sample[train]
    fast_b0, fast_b1 = fits.intercept[layer_of, neuron_of], fits.beta[layer_of, neuron_of]
    f_fast = objective(x_train, y_train, fast_b0, fast_b1)
    f_sm = objective(x_train, y_train, sm_fits.intercept, sm_fits.beta)
    tol = 1e-9 * (1.0 + np.abs(f_sm))
    worse = f_fast > f_sm + tol
    better = f_fast < f_sm - tol
    trimmed = (sm_fits.beta == 0) & (fast_b1 != 0)
    extra_zero = (sm_fits.beta != 0) & (fast_b1 == 0)

    # The table.
    rows: list[tuple[str, str, str, str, str]] = []

    def speedup(seconds: float) -> str:
        return times(sm1_total / seconds) if seconds > 0 else "-"

    rows.append(
        (
            f"statsmodels engine, 1 process ({k} neurons, scaled)",
            f"{sm1_total:,.1f} s",
            "",
            "1x",
            "-",
        )
    )
    rows.append(
        (
            f"statsmodels engine, 2 processes ({k} neurons, scaled)",
            f"{sm2_total:,.1f} s",
            "",
            speedup(sm2_total),
            "-",
        )
    )
    rows.append(
        (
            f"notebook's loop, split per neuron ({m} neurons, scaled)",
            f"{loop_total:,.1f} s",
            "",
            speedup(loop_total),
            "-",
        )
    )
    rows.append(
        (
            f"torch engine, CPU ({t_layers} layer{'s' * (t_layers > 1)}, scaled)",
            f"{torch_total:,.1f} s",
            "",
            speedup(torch_total),
            "-",
        )
    )
    target_nb = TARGET_NOTEBOOK_S * scale_targets
    rows.append(
        (
            "fast: notebook's quantities (beta, b0, Wald p, acc)",
            f"{nbq_s:.2f} s",
            f"< {target_nb:.2f} s",
            speedup(nbq_s),
            verdict(nbq_s < target_nb),
        )
    )
    target_full = TARGET_FULL_S * scale_targets
    rows.append(
        (
            "fast: full default table (+ LR p, AUC)",
            f"{full_s:.2f} s",
            f"< {target_full:.2f} s",
            speedup(full_s),
            verdict(full_s < target_full),
        )
    )
    rows.append(
        (
            "fast full table: speed-up over statsmodels, 1 process",
            times(sm1_total / full_s),
            f">= {TARGET_SPEEDUP:.0f}x",
            "",
            verdict(sm1_total / full_s >= TARGET_SPEEDUP),
        )
    )
    rows.append(
        (
            "fast full table: speed-up over the notebook's loop",
            times(loop_total / full_s),
            "",
            "",
            "-",
        )
    )
    rows.append(
        (
            "fast full table: speed-up over statsmodels, 2 processes",
            times(sm2_total / full_s),
            "",
            "",
            "-",
        )
    )
    rows.append(
        (
            "fast full table: peak extra memory",
            f"{extra / MB:,.0f} MB = {extra / memory['nbytes']:.2f}x acts",
            f"< {TARGET_MEMORY_RATIO * memory['nbytes'] / MB:,.0f} MB",
            "",
            verdict(extra < TARGET_MEMORY_RATIO * memory["nbytes"]),
        )
    )
    rows.append(
        (
            f"fast: first call, compile or load (numba cache {'present' if cached else 'absent'})",
            f"{first_call_s:.1f} s",
            "",
            "",
            "-",
        )
    )
    if gpu is not None:
        rows.append(
            (
                f"full table on {gpu['device']} (torch solver)",
                f"{gpu['seconds']:.2f} s",
                "",
                speedup(gpu["seconds"]),
                "-",
            )
        )

    widths = [max(len(row[i]) for row in [*rows, HEADER]) for i in range(5)]
    print()
    for row in [HEADER, *rows]:
        print(
            f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}  "
            f"{row[3]:>{widths[3]}}  {row[4]:>{widths[4]}}"
        )
    print()
    print(
        f"{n_total:,} neurons x {n_contexts:,} contexts, {memory['nbytes'] / MB:.0f} MB of "
        f"activations{'; time targets scaled to the neuron count (--quick)' if args.quick else ''}"
    )
    print(
        f"(cores busy, CPU s / wall s: fast full table {full_busy:.2f}, notebook quantities "
        f"{nbq_busy:.2f}, torch {torch_busy:.2f}, statsmodels 1 process {sm1_cpu / sm1_s:.2f}, "
        f"notebook's loop {loop_busy:.2f})"
    )
    # CPU seconds are far less sensitive than wall seconds to other processes on the cores.
    print(
        f"(CPU seconds, less sensitive to machine load: statsmodels 1 process "
        f"{sm1_cpu / k * n_total:,.0f} s scaled, fast full table {full_busy * full_s:.2f} s, "
        f"ratio {times(sm1_cpu / k * n_total / (full_busy * full_s))})"
    )
    print(
        f"(statsmodels engine per neuron: {1e3 * sm1_s / k:.1f} ms in 1 process, "
        f"{1e3 * sm2_per:.1f} ms in 2"
        f"{' (floored at half of 1 process)' if sm2_floored else ''} after {startup_s:.1f} s of "
        "worker start-up;"
        f" notebook's loop {1e3 * loop_s / m:.1f} ms per neuron, {loop_raised} of {m} raised)"
    )
    print(
        "(notebook's quantities: "
        + (
            f"fit_neuron_logits(..., {skip_lr_option()}=False)"
            if skip_lr_option()
            else "split + logit_kernel.fit_layer(with_lr=False) per layer + Wald p-values"
        )
        + f"; identical to the full table's: {'yes' if same else 'NO'})"
    )
    print(
        f"(peak memory: subprocess RSS {memory['baseline'] / MB:,.0f} MB with the activations "
        f"loaded, high-water mark {memory['peak'] / MB:,.0f} MB during the fit "
        f"({memory['seconds']:.2f} s); "
        + ("VmHWM reset before the fit)" if memory["reset"] else "VmHWM could not be reset)")
    )
    if gpu is None:
        print("(no GPU visible: no GPU figure)")
    else:
        print(f"(GPU: upload of the activations {gpu['upload']:.2f} s, not included)")
    print(
        f"\nsanity on the {k} sampled neurons (L1 objective on the training contexts, fast vs "
        f"statsmodels): fast better {int(better.sum())}, equal within 1e-9 relative "
        f"{int(k - better.sum() - worse.sum())}, worse {int(worse.sum())} "
        f"(largest excess {float(np.max(f_fast - f_sm)):.1e})"
    )
    print(
        f"statsmodels trimmed to 0 a slope that is non-zero at the optimum: {int(trimmed.sum())}"
        f" of {k}; zero at the optimum but non-zero in statsmodels: {int(extra_zero.sum())}; "
        f"statsmodels not converged: {int((~sm_fits.converged).sum())}"
    )
    print(f"load average after the run: {os.getloadavg()[0]:.2f}")
    if worse.any() or not same:
        print("SANITY CHECK FAILED")
        sys.exit(1)


if __name__ == "__main__":
    main()
