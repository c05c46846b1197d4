"""Interventions at the last token: the cached path equals a full forward pass, and both
equal what the weights say."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from neuronprobe.activations import SITES, site_width
from neuronprobe.errors import NeuronprobeError
from neuronprobe.interventions import (
    Intervention,
    logodds_after,
    logodds_full_forward,
    logodds_positive,
)
from neuronprobe.models import load_model

ATOL = 1e-4

SENTENCES = [
    "I have been trying to find out whether the new phone is something I can",
    "After all the years of practice, she finally believes that she really can",
    "The movie is so long and so slow that I do not think anybody can",
    "If you want to see a good film this year, this is the one you can",
    "He said the car was broken again and that there was nothing he can",
    "We looked at every single option on the menu and chose the only dish we can",
]


def contexts(tokenizer: Any, length: int | None = 11) -> list[list[int]]:
    """Real sentences ending in " can": their last ``length`` tokens, or all (ragged)."""
    rows = [tokenizer.encode(text, add_special_tokens=False) for text in SENTENCES]
    can = tokenizer.encode(" can", add_special_tokens=False)
    assert all(row[-len(can) :] == can for row in rows)
    if length is None:  # unequal lengths, one very short context
        return [row[-(4 + 3 * i) :] for i, row in enumerate(rows[:5])] + [rows[5][-1:]]
    return [row[-length:] for row in rows]


def positive(tokenizer: Any) -> list[int]:
    return [tokenizer.encode("'t", add_special_tokens=False)[0]]


@pytest.fixture(scope="module")
def tiny_gpt2(tiny_gpt2_dir: Path) -> Any:
    return load_model(str(tiny_gpt2_dir), device="cpu")


@pytest.fixture(params=["tiny_gpt2", "smollm2"])
def loaded(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(request.param)


def sweep(model: Any, site: str, n_contexts: int, seed: int = 0) -> list[Intervention]:
    """Constant, per-context, zero and empty interventions at several layers."""
    rng = np.random.default_rng(seed)
    width = site_width(model, site)
    n_layers = model.config.num_hidden_layers
    first, middle, last = 0, n_layers // 2, n_layers - 1

    def some(k: int) -> np.ndarray:
        return np.sort(rng.choice(width, k, replace=False)).astype(np.int64)

    return [
        Intervention(middle, some(8), rng.normal(0, 3, 8).astype(np.float32)),  # constant
        Intervention(first, some(5), rng.normal(0, 3, (n_contexts, 5)).astype(np.float32)),
        Intervention(last, some(20), np.zeros(20, np.float32)),  # zero ablation
        Intervention(middle, some(3), np.full(3, 10.0, np.float32)),
        Intervention(first, np.array([], np.int64), np.array([], np.float32)),  # k = 0
        Intervention(last, some(1), np.array([-5.0], np.float32)),
    ]


def full_forward_rows(
    model: Any, tokens: Any, interventions: list[Intervention], ids: list[int], site: str
) -> np.ndarray:
    rows = [logodds_full_forward(model, tokens, None, positive_ids=ids, site=site)]
    rows += [
        logodds_full_forward(model, tokens, i, positive_ids=ids, site=site, batch_size=4)
        for i in interventions
    ]
    return np.stack(rows)


@pytest.mark.parametrize("site", SITES)
def test_cached_path_equals_a_full_forward_pass_with_the_same_hook(loaded: Any, site: str) -> None:
    model, tokenizer = loaded.model, loaded.tokenizer
    tokens = np.array(contexts(tokenizer), dtype=np.int64)
    interventions = sweep(model, site, len(tokens))
    ids = positive(tokenizer)
    got = logodds_after(model, tokens, interventions, positive_ids=ids, site=site, batch_size=4)
    assert got.shape == (len(interventions) + 1, len(tokens)) and got.dtype == np.float64
    expected = full_forward_rows(model, tokens, interventions, ids, site)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    changed = np.abs(got[1:] - got[0]).max(axis=1)
    assert (changed[[0, 1, 2, 3, 5]] > ATOL).all()  # the interventions change more than that


def test_ragged_contexts_and_small_passes_equal_the_full_forward_pass(loaded: Any) -> None:
    model, tokenizer = loaded.model, loaded.tokenizer
    rows = contexts(tokenizer, length=None)
    assert len({len(row) for row in rows}) == len(rows)
    interventions = sweep(model, "mlp.pre", len(rows), seed=1)
    ids = positive(tokenizer)
    got = logodds_after(model, rows, interventions, positive_ids=ids, batch_size=4, max_rows=5)
    expected = full_forward_rows(model, rows, interventions, ids, "mlp.pre")
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    # Each context alone (no padding) gives the same numbers as in the padded batch.
    alone = [
        logodds_after(model, [row], [interventions[0]], positive_ids=ids)[:, 0] for row in rows
    ]
    np.testing.assert_allclose(got[:2], np.array(alone).T, rtol=0, atol=ATOL)
    # Passes of one intervention (the cache reused and rewound many times) change nothing.
    again = logodds_after(model, rows, interventions, positive_ids=ids, batch_size=6, max_rows=1)
    np.testing.assert_allclose(again, got, rtol=0, atol=1e-5)


def test_empty_intervention_equals_the_baseline(tiny_gpt2: Any) -> None:
    model, tokenizer = tiny_gpt2.model, tiny_gpt2.tokenizer
    tokens = contexts(tokenizer)
    empty = [
        Intervention(layer, np.zeros(0, np.int64), np.zeros(0, np.float32)) for layer in [0, 3]
    ]
    per_context = Intervention(2, np.zeros(0, np.int64), np.zeros((len(tokens), 0), np.float32))
    got = logodds_after(model, tokens, [*empty, per_context], positive_ids=positive(tokenizer))
    np.testing.assert_array_equal(got[1:], np.broadcast_to(got[0], (3, len(tokens))))


def test_baseline_equals_a_plain_forward_pass_without_hooks(loaded: Any) -> None:
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = positive(tokenizer)
    for rows in (contexts(tokenizer), contexts(tokenizer, length=None)):
        got = logodds_after(model, rows, [], positive_ids=ids, batch_size=4)
        assert got.shape == (1, len(rows))
        expected = []
        for row in rows:  # each context alone: no padding, no cache, no hook
            with torch.inference_mode():
                logits = model(torch.tensor([row])).logits[0, -1].double().numpy()
            rest = np.delete(logits, ids)
            expected.append(logsumexp(logits[ids]) - logsumexp(rest))
        np.testing.assert_allclose(got[0], expected, rtol=0, atol=ATOL)


def test_logodds_positive_is_exact_where_p_is_near_0_or_1() -> None:
    logits = np.array([[0.0, -30.0, -30.0], [-30.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    logprob, logodds = logodds_positive(logits, [0])
    np.testing.assert_allclose(
        logodds, [30 - np.log(2), -30 - np.log(2), 1 - np.log(np.e**2 + np.e**3)]
    )
    np.testing.assert_allclose(logprob, logits[:, 0] - logsumexp(logits, axis=1), atol=1e-12)
    as_torch = logodds_positive(torch.tensor(logits, dtype=torch.float32), [0])[1]
    np.testing.assert_allclose(as_torch.numpy(), logodds, rtol=1e-6)
    _, both = logodds_positive(logits, [0, 2])
    np.testing.assert_allclose(both[2], np.log(np.e + np.e**3) - 2.0)


# --- a GPT-2 wired by hand: the expected change computed from the weights ------------------


def wired_gpt2(vocab: int, target: int) -> Any:
    """Two blocks, attention off (zero weights), ReLU MLPs; neuron 5 of layer 1 is always on
    (pre-activation 2) and writes along the target token's embedding (made 30 times longer, so
    that the target's logit can move)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    config = GPT2Config(
        n_layer=2,
        n_embd=16,
        n_head=2,
        n_inner=32,
        n_positions=32,
        vocab_size=vocab,
        activation_function="relu",
    )
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            for linear in (block.attn.c_attn, block.attn.c_proj):
                linear.weight.zero_()
                linear.bias.zero_()
        mlp = model.transformer.h[1].mlp
        mlp.c_fc.weight[:, 5] = 0.0  # Conv1D: [d_model, d_mlp]
        mlp.c_fc.bias[5] = 2.0
        model.transformer.wte.weight[target] *= 30.0  # tied to the head: a big logit to move
        direction = model.transformer.wte.weight[target]
        mlp.c_proj.weight[5] = 4.0 * direction / direction.norm()  # [d_mlp, d_model]
    return model


def numpy_logodds(model: Any, row: list[int], target: int, edit: dict[str, float]) -> float:
    """The wired model's log odds of ``target`` in float64 numpy, from its weights: attention
    is off, so the last position's residual is its embeddings plus the MLPs' outputs."""
    weights = {name: p.detach().double().numpy() for name, p in model.named_parameters()}
    eps = model.config.layer_norm_epsilon

    def norm(x: np.ndarray, prefix: str) -> np.ndarray:
        x = (x - x.mean()) / np.sqrt(x.var() + eps)
        return x * weights[f"{prefix}.weight"] + weights[f"{prefix}.bias"]

    x = weights["transformer.wte.weight"][row[-1]] + weights["transformer.wpe.weight"][len(row) - 1]
    for layer in range(model.config.n_layer):
        p = f"transformer.h.{layer}"
        pre = norm(x, f"{p}.ln_2") @ weights[f"{p}.mlp.c_fc.weight"] + weights[f"{p}.mlp.c_fc.bias"]
        if layer == 1 and "mlp.pre" in edit:
            pre[5] = edit["mlp.pre"]
        post = np.maximum(pre, 0.0)
        if layer == 1 and "mlp.post" in edit:
            post[5] = edit["mlp.post"]
        x = x + post @ weights[f"{p}.mlp.c_proj.weight"] + weights[f"{p}.mlp.c_proj.bias"]
    logits = weights["transformer.wte.weight"] @ norm(x, "transformer.ln_f")
    return float(logits[target] - logsumexp(np.delete(logits, target)))


def test_a_hand_wired_neuron_changes_the_logodds_by_what_the_weights_say(gpt2_tok: Any) -> None:
    target = positive(gpt2_tok)[0]
    assert target == 470  # "'t"
    model = wired_gpt2(len(gpt2_tok), target)
    rows = contexts(gpt2_tok, length=None)
    neuron = np.array([5])
    cases = [  # (site, value written, the same in the numpy model)
        ("mlp.post", 0.0, {"mlp.post": 0.0}),  # ablation
        ("mlp.pre", 0.0, {"mlp.pre": 0.0}),  # ReLU(0) = 0: ablation too
        ("mlp.pre", -3.0, {"mlp.pre": -3.0}),
        ("mlp.pre", 6.0, {"mlp.pre": 6.0}),
        ("mlp.post", 4.0, {"mlp.post": 4.0}),
    ]
    for site, value, edit in cases:
        intervention = Intervention(1, neuron, np.array([value], np.float32))
        got = logodds_after(model, rows, [intervention], positive_ids=[target], site=site)
        before = np.array([numpy_logodds(model, row, target, {}) for row in rows])
        after = np.array([numpy_logodds(model, row, target, edit) for row in rows])
        np.testing.assert_allclose(got[0], before, rtol=0, atol=ATOL)
        np.testing.assert_allclose(got[1] - got[0], after - before, rtol=0, atol=ATOL)
    # The neuron matters: ablating it lowers the log odds of "'t" by a good margin.
    ablated = logodds_after(
        model, rows, [Intervention(1, neuron, np.zeros(1, np.float32))], positive_ids=[target]
    )
    assert (ablated[1] - ablated[0] < -0.5).all()


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("intervention", "positive_ids", "named"),
    [
        (Intervention(4, np.array([1]), np.array([0.0])), [470], "layer 4 is out of range"),
        (Intervention(-1, np.array([1]), np.array([0.0])), [470], "layer -1 is out of range"),
        (Intervention(0, np.array([-1]), np.array([0.0])), [470], "neuron indices [-1]"),
        (Intervention(0, np.array([256]), np.array([0.0])), [470], "neuron indices [256]"),
        (Intervention(0, np.array([1, 1]), np.array([0.0, 0.0])), [470], "repeated"),
        (Intervention(0, np.array([1, 2]), np.array([0.0])), [470], "values has shape (1,)"),
        (Intervention(0, np.array([1]), np.zeros((5, 1))), [470], "values has shape (5, 1)"),
        (Intervention(0, np.array([1]), np.array([np.nan])), [470], "values holds NaN"),
        (Intervention(0, np.array([1]), np.array([0.0])), [], "positive_ids is empty"),
        (Intervention(0, np.array([1]), np.array([0.0])), [10**6], "positive_ids [1000000]"),
    ],
)
def test_bad_input_is_a_one_line_error_naming_it(
    tiny_gpt2: Any, intervention: Intervention, positive_ids: list[int], named: str
) -> None:
    tokens = contexts(tiny_gpt2.tokenizer)
    for call in (
        lambda: logodds_after(tiny_gpt2.model, tokens, [intervention], positive_ids=positive_ids),
        lambda: logodds_full_forward(
            tiny_gpt2.model, tokens, intervention, positive_ids=positive_ids
        ),
    ):
        with pytest.raises(NeuronprobeError) as error:
            call()
        assert named in str(error.value) and "\n" not in str(error.value)


def test_bad_tokens_site_and_neuron_types_are_clear_errors(tiny_gpt2: Any) -> None:
    model = tiny_gpt2.model
    ok = [Intervention(0, np.array([1]), np.array([0.0]))]
    with pytest.raises(NeuronprobeError, match="tokens must be a non-empty"):
        logodds_after(model, [], ok, positive_ids=[470])
    with pytest.raises(NeuronprobeError, match="tokens must be a non-empty"):
        logodds_after(model, [[1, 2], []], ok, positive_ids=[470])
    with pytest.raises(NeuronprobeError, match="unknown neuron site"):
        logodds_after(model, [[1, 2]], ok, positive_ids=[470], site="mlp.middle")
    with pytest.raises(NeuronprobeError, match="neurons must be a 1-D integer array"):
        Intervention(0, np.array([0.5]), np.array([0.0]))


def test_the_model_is_left_as_it_was(tiny_gpt2: Any) -> None:
    model, tokenizer = tiny_gpt2.model, tiny_gpt2.tokenizer
    tokens = contexts(tokenizer)
    blocks = list(model.transformer.h)
    model.train()
    try:
        logodds_after(
            model, tokens, [Intervention(3, np.array([2]), np.array([1.0]))], positive_ids=[470]
        )
        assert model.training
    finally:
        model.eval()
    assert list(model.transformer.h) == blocks
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_one_token_contexts_have_no_cache_and_still_agree(tiny_gpt2: Any) -> None:
    model = tiny_gpt2.model
    tokens = np.array([[464], [1002], [460]])  # "The", " can"...: nothing before the target
    interventions = sweep(model, "mlp.post", len(tokens), seed=2)
    got = logodds_after(model, tokens, interventions, positive_ids=[470], site="mlp.post")
    expected = full_forward_rows(model, tokens, interventions, [470], "mlp.post")
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def test_sliding_window_cache_agrees_and_too_long_contexts_are_refused() -> None:
    """A small random Mistral whose every layer has a sliding window (6 tokens): its cache
    layers are ``DynamicSlidingWindowLayer``s, rewound like the others while the contexts are
    shorter than the window; longer contexts are refused (the layer drops its oldest keys)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=6,
        max_position_embeddings=64,
    )
    model = MistralForCausalLM(config).eval()
    tokens = np.random.default_rng(0).integers(0, 300, size=(4, 5))
    interventions = sweep(model, "mlp.pre", len(tokens), seed=3)
    got = logodds_after(model, tokens, interventions, positive_ids=[7], max_rows=4)
    expected = full_forward_rows(model, tokens, interventions, [7], "mlp.pre")
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    with pytest.raises(NeuronprobeError, match="sliding attention window"):
        logodds_after(model, np.zeros((2, 6), np.int64), interventions[:1], positive_ids=[7])


# ----------------------------------------------------------------------------------------------
# Changes at several layers at once (the whole model's), and the experiment of a real run
# ----------------------------------------------------------------------------------------------


def test_changes_at_several_layers_in_one_intervention_equal_a_full_forward(
    loaded: Any,
) -> None:
    model, tokenizer = loaded.model, loaded.tokenizer
    tokens = contexts(tokenizer)
    width = site_width(model, "mlp.pre")
    rng = np.random.default_rng(3)
    compound = [
        Intervention(layer, rng.choice(width, 4, replace=False), rng.normal(size=4))
        for layer in (0, 2, 3)
    ]
    single = Intervention(1, np.array([5, 6]), np.array([0.5, -0.5]))
    got = logodds_after(
        model, tokens, [compound, single, compound[1:]], positive_ids=positive(tokenizer)
    )
    for row, item in enumerate([compound, single, compound[1:]], start=1):
        expected = logodds_full_forward(model, tokens, item, positive_ids=positive(tokenizer))
        np.testing.assert_allclose(got[row], expected, atol=ATOL)
    with pytest.raises(NeuronprobeError, match="changes layer 0 twice"):
        logodds_after(model, tokens, [[compound[0], compound[0]]], positive_ids=[470])


def test_ablation_values_are_the_training_means() -> None:
    from neuronprobe.interventions import ablation_values

    rng = np.random.default_rng(0)
    values = rng.normal(size=(10, 3)).astype(np.float32)
    labels = np.array([True, False] * 5)
    train = np.array([True] * 7 + [False] * 3)
    held_out = labels[~train]
    mean = ablation_values(values, labels, train, held_out, "mean")
    np.testing.assert_allclose(mean, np.tile(values[train].mean(axis=0), (3, 1)), rtol=1e-5)
    assert not ablation_values(values, labels, train, held_out, "zero").any()
    patch = ablation_values(values, labels, train, held_out, "patch")
    for row, label in enumerate(held_out):  # each context gets the other class's mean
        other = values[train & (labels != label)].mean(axis=0)
        np.testing.assert_allclose(patch[row], other, rtol=1e-5)
    with pytest.raises(NeuronprobeError, match="--ablation"):
        ablation_values(values, labels, train, held_out, "half")


@pytest.fixture(scope="module")
def smollm2_run(smollm2: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A real run with significant neurons: SmolLM2, three layers, interventions with k = 3
    and all, two random draws each."""
    from neuronprobe import RunConfig, run

    config = RunConfig(
        min_per_class=60,
        layers=[0, 3, 9],
        correction="fdr-bh",
        test="lr",
        ablate_k=["3", "all"],
        random_draws=2,
    )
    return run(config, tmp_path_factory.mktemp("runs") / "smollm2", progress=False)


def test_a_run_changes_its_strongest_neurons_against_random_ones(
    smollm2_run: Any, smollm2: Any
) -> None:
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from neuronprobe.interventions import ablation_values, random_neurons
    from neuronprobe.tables import top_neurons

    directory = smollm2_run.directory
    table = pd.read_parquet(directory / "interventions.parquet")
    neurons = pd.read_parquet(directory / "neurons.parquet")
    contexts_table = pd.read_parquet(directory / "contexts.parquet")
    train = pd.read_csv(directory / "split.csv")["split"].to_numpy() == "train"
    labels = contexts_table["label"].to_numpy()
    activations = np.load(directory / "activations.npy", mmap_mode="r")
    record = smollm2_run.record
    assert record["interventions"]["rows"] == len(table) > 0
    assert record["stages"]["interventions"] == "complete"
    assert (directory / "figures" / "interventions.png").is_file()
    # One top row and two random rows per layer with a significant neuron and per k; the
    # whole model's rows; no row for a layer without one.
    counts = neurons.groupby("layer")["significant"].sum()
    for layer in (0, 3, 9):
        rows = table[table["layer"] == layer]
        if counts[layer] == 0:
            assert rows.empty
            continue
        assert sorted(rows["k_label"].unique()) == ["3", "all"]
        assert (rows["selection"] == "top").sum() == 2 and (
            rows["selection"] == "random"
        ).sum() == 4
        ranked = top_neurons(neurons[neurons["layer"] == layer], 10**6, test="lr")["neuron"]
        top = rows[(rows["selection"] == "top") & (rows["k_label"] == "all")].iloc[0]
        assert top.k == counts[layer]
        assert top.neurons == " ".join(f"{layer}:{n}" for n in ranked)
        for draw in (1, 2):  # the control's neurons come back with the seed
            random = rows[(rows["draw"] == draw) & (rows["k_label"] == "3")].iloc[0]
            chosen = random_neurons(0, layer, int(random.k), draw, activations.shape[2])
            assert random.neurons == " ".join(f"{layer}:{n}" for n in chosen)
    whole = table[table["layer"] == -1]
    assert len(whole) == 2 * 3 and set(whole["k"]) == {
        int(
            table[(table["layer"] >= 0) & (table["k_label"] == label)]
            .groupby("layer")["k"]
            .first()
            .sum()
        )
        for label in ("3", "all")
    }
    # One intervention against an independent forward pass of every position.
    tokens = np.stack(contexts_table["tokens"].to_list())[~train]
    best_layer = int(counts.idxmax())
    row = table[(table["layer"] == best_layer) & (table["selection"] == "top")].iloc[-1]
    chosen = np.array([int(n.split(":")[1]) for n in row.neurons.split()])
    index = [0, 3, 9].index(best_layer)
    values = ablation_values(activations[index], labels, train, labels[~train], "mean")
    change = Intervention(best_layer, chosen, values[0, chosen])
    before = logodds_full_forward(
        smollm2.model, tokens, None, positive_ids=[record["behavior"]["positive_first_ids"][0]]
    )
    after = logodds_full_forward(
        smollm2.model, tokens, change, positive_ids=record["behavior"]["positive_first_ids"]
    )
    delta = after - before
    held_out = labels[~train]
    assert row.delta_logodds_positive == pytest.approx(delta[held_out].mean(), abs=1e-4)
    assert row.delta_logodds_negative == pytest.approx(delta[~held_out].mean(), abs=1e-4)
    assert row.auc_after == pytest.approx(roc_auc_score(held_out, after), abs=1e-9)
    # The baseline is the model's own answer stored with the activations.
    np.testing.assert_allclose(
        before, contexts_table["logodds_positive"].to_numpy()[~train], atol=1e-4
    )
    assert row.auc_before == pytest.approx(record["behavior"]["auc"], abs=1e-9)
    page = (directory / "report.html").read_text(encoding="utf-8")
    assert '<section id="interventions">' in page and "figure-interventions" in page


def test_a_layer_without_significant_neurons_gets_no_row_and_the_report_says_so(
    smollm2_run: Any,
) -> None:
    import pandas as pd

    neurons = pd.read_parquet(smollm2_run.directory / "neurons.parquet")
    counts = neurons.groupby("layer")["significant"].sum()
    empty = [int(layer) for layer, count in counts.items() if count == 0]
    page = (smollm2_run.directory / "report.html").read_text(encoding="utf-8")
    section = page.split('<section id="interventions">', 1)[1].split("</section>", 1)[0]
    if empty:
        assert "no significant neuron" in section
    assert "random" in section
