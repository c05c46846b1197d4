"""Stage 3: the stored activations equal an independent computation of the same site."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from neuronprobe.activations import SITES, extract_activations, hook_points, site_width
from neuronprobe.errors import NeuronprobeError
from neuronprobe.models import load_model


def random_contexts(vocab: int, n: int = 7, length: int = 11, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(n, length), dtype=np.int64)


def test_gpt2_mlp_pre_equals_c_fc_recomputed_from_the_hidden_states(tiny_gpt2_dir: Path) -> None:
    model = load_model(str(tiny_gpt2_dir), device="cpu").model
    tokens = random_contexts(model.config.vocab_size)
    got = extract_activations(model, tokens, batch_size=3, progress=False)
    assert got.shape == (4, 7, 256) and got.dtype == np.float32
    ids = torch.as_tensor(tokens)
    with torch.inference_mode():
        hidden = model(ids, output_hidden_states=True).hidden_states  # [layers + 1] x [b, pos, d]
        for layer, block in enumerate(model.transformer.h):
            h = hidden[layer]
            h = h + block.attn(block.ln_1(h))[0]
            x = block.ln_2(h)[:, -1, :]  # [batch, d_model]
            expected = x @ block.mlp.c_fc.weight + block.mlp.c_fc.bias  # Conv1D: [d_model, d_mlp]
            np.testing.assert_allclose(got[layer], expected.numpy(), rtol=1e-5, atol=1e-5)


def test_smollm2_mlp_pre_equals_gate_proj_of_the_mlp_input(smollm2: Any) -> None:
    model, tokenizer = smollm2.model, smollm2.tokenizer
    texts = ["I just know that you can", "nobody told me that they can", "Well, I really can"]
    rows = [tokenizer.encode(t, add_special_tokens=False)[-5:] for t in texts]
    tokens = np.array(rows, dtype=np.int64)
    layers = [0, 14, 29]
    got = extract_activations(model, tokens, layers=layers, batch_size=2, progress=False)
    assert got.shape == (3, 3, 1536)
    mlp_inputs: dict[int, torch.Tensor] = {}
    handles = [
        model.model.layers[i].mlp.register_forward_pre_hook(
            lambda _m, args, i=i: mlp_inputs.__setitem__(i, args[0][:, -1, :])
        )
        for i in layers
    ]
    try:
        with torch.inference_mode():
            model(torch.as_tensor(tokens))  # a full forward pass, logits and all
    finally:
        for handle in handles:
            handle.remove()
    for row, layer in enumerate(layers):
        weight = model.model.layers[layer].mlp.gate_proj.weight.detach()  # [d_mlp, d_model]
        expected = (mlp_inputs[layer] @ weight.T).numpy()
        np.testing.assert_allclose(got[row], expected, rtol=1e-4, atol=1e-4)


def test_batch_size_and_layer_subset_do_not_change_values(tiny_gpt2_dir: Path) -> None:
    model = load_model(str(tiny_gpt2_dir), device="cpu").model
    tokens = random_contexts(model.config.vocab_size, n=10, seed=3)
    whole = extract_activations(model, tokens, batch_size=10, progress=False)
    pieces = extract_activations(model, tokens, batch_size=3, progress=False)
    np.testing.assert_allclose(pieces, whole, rtol=1e-5, atol=1e-6)
    subset = extract_activations(model, tokens, layers=[-1, 1], batch_size=4, progress=False)
    np.testing.assert_allclose(subset, whole[[1, 3]], rtol=1e-5, atol=1e-6)


def test_forward_pass_stops_after_the_deepest_requested_layer(tiny_gpt2_dir: Path) -> None:
    model = load_model(str(tiny_gpt2_dir), device="cpu").model
    calls: list[str] = []
    handles = [
        model.transformer.h[2].register_forward_hook(lambda *_: calls.append("block2")),
        model.lm_head.register_forward_hook(lambda *_: calls.append("lm_head")),
    ]
    try:
        extract_activations(model, random_contexts(100), layers=[1], progress=False)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == []


@pytest.mark.parametrize(
    ("model_type", "width"),
    [("gpt_neox", 128), ("qwen2", 96), ("mistral", 96)],
)
def test_other_architectures_map_mlp_pre(model_type: str, width: int) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    common = {
        "vocab_size": 200,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    extra = {"intermediate_size": width}
    if model_type != "gpt_neox":
        extra["num_key_value_heads"] = 2
    config = AutoConfig.for_model(model_type, **common, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert site_width(model) == width
    tokens = random_contexts(200, n=2)
    got = extract_activations(model, tokens, progress=False)
    assert got.shape == (2, 2, width)
    assert np.isfinite(got).all()
    assert len(hook_points(model)) == 2


def test_unsupported_architecture_and_bad_layers_are_clear_errors(tiny_gpt2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, OPTConfig

    opt = AutoModelForCausalLM.from_config(
        OPTConfig(
            vocab_size=100,
            hidden_size=16,
            num_hidden_layers=1,
            ffn_dim=32,
            num_attention_heads=2,
            word_embed_proj_dim=16,
        )
    )
    with pytest.raises(NeuronprobeError, match=r"'opt' has no neuron-site mapping.*gpt2"):
        extract_activations(opt, random_contexts(100), progress=False)
    model = load_model(str(tiny_gpt2_dir), device="cpu").model
    with pytest.raises(NeuronprobeError, match=r"layer 4 is out of range.*4 layers"):
        extract_activations(model, random_contexts(100), layers=[4], progress=False)
    with pytest.raises(NeuronprobeError, match="unknown neuron site"):
        extract_activations(model, random_contexts(100), site="attn.out", progress=False)


def test_gpt2_every_site_equals_its_block_recomputed(tiny_gpt2_dir: Path) -> None:
    model = load_model(str(tiny_gpt2_dir), device="cpu").model
    tokens = random_contexts(model.config.vocab_size, seed=5)
    got = {
        site: extract_activations(model, tokens, site=site, batch_size=4, progress=False)
        for site in SITES
    }
    assert {site: got[site].shape[2] for site in SITES} == {
        "mlp.pre": 256,
        "mlp.post": 256,
        "resid.post": 64,
    }
    assert {site: site_width(model, site) for site in SITES} == {
        "mlp.pre": 256,
        "mlp.post": 256,
        "resid.post": 64,
    }
    ids = torch.as_tensor(tokens)
    with torch.inference_mode():
        hidden = model(ids, output_hidden_states=True).hidden_states
        blocks = model.transformer.h
        for layer, block in enumerate(blocks):
            h = hidden[layer]
            h = h + block.attn(block.ln_1(h))[0]
            pre = block.mlp.c_fc(block.ln_2(h))  # [batch, pos, d_mlp]
            post = block.mlp.act(pre)
            resid = h + block.mlp.c_proj(post)  # [batch, pos, d_model]
            for site, expected in (("mlp.pre", pre), ("mlp.post", post), ("resid.post", resid)):
                np.testing.assert_allclose(
                    got[site][layer], expected[:, -1].numpy(), rtol=1e-5, atol=1e-5
                )
            if layer < len(blocks) - 1:  # HF's last hidden state has ln_f applied
                np.testing.assert_allclose(
                    got["resid.post"][layer], hidden[layer + 1][:, -1].numpy(), rtol=1e-5, atol=1e-5
                )


def test_smollm2_mlp_post_and_resid_post(smollm2: Any) -> None:
    model, tokenizer = smollm2.model, smollm2.tokenizer
    texts = ["I just know that you can", "Well, I really can"]
    tokens = np.array([tokenizer.encode(t, add_special_tokens=False)[-5:] for t in texts])
    layers = [0, 14, 29]
    post = extract_activations(model, tokens, layers=layers, site="mlp.post", progress=False)
    resid = extract_activations(model, tokens, layers=layers, site="resid.post", progress=False)
    assert post.shape == (3, 2, 1536) and resid.shape == (3, 2, 576)
    mlp_inputs: dict[int, torch.Tensor] = {}
    handles = [
        model.model.layers[i].mlp.register_forward_pre_hook(
            lambda _m, args, i=i: mlp_inputs.__setitem__(i, args[0][:, -1, :].clone())
        )
        for i in layers
    ]
    try:
        with torch.inference_mode():
            hidden = model(torch.as_tensor(tokens), output_hidden_states=True).hidden_states
    finally:
        for handle in handles:
            handle.remove()
    with torch.inference_mode():
        for row, layer in enumerate(layers):
            mlp = model.model.layers[layer].mlp
            x = mlp_inputs[layer]
            expected = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)  # [batch, d_mlp]
            np.testing.assert_allclose(post[row], expected.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(resid[0], hidden[1][:, -1].numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(resid[1], hidden[15][:, -1].numpy(), rtol=1e-4, atol=1e-4)
        # The last hidden state HF returns is the final norm of the last block's output.
        normed = model.model.norm(torch.as_tensor(resid[2]))
        np.testing.assert_allclose(normed.numpy(), hidden[30][:, -1].numpy(), rtol=1e-4, atol=1e-4)


@contextlib.contextmanager
def hooked(module: Any, hook: Any) -> Iterator[None]:
    """``hook`` registered as a forward hook of ``module`` for the block's duration."""
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _Interrupt:
    """A forward hook that interrupts the pass after ``after`` calls, as Ctrl-C would."""

    def __init__(self, after: int) -> None:
        self.calls, self.after = 0, after

    def __call__(self, *_: Any) -> None:
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt


def test_interrupted_extraction_resumes_where_it_stopped(
    tiny_gpt2_dir: Path, tmp_path: Path
) -> None:
    from neuronprobe.activations import extract_to_file

    loaded = load_model(str(tiny_gpt2_dir), device="cpu")
    model = loaded.model
    tokens = random_contexts(model.config.vocab_size, n=23, seed=9)
    expected = extract_activations(model, tokens, batch_size=5, progress=False)
    path = tmp_path / "activations.npy"
    with hooked(model.transformer.h[0], _Interrupt(after=2)), pytest.raises(KeyboardInterrupt):
        extract_to_file(model, tokens, path, identity=loaded.identity, batch_size=5, progress=False)
    assert not path.exists()  # nothing finished-looking
    assert json.loads((tmp_path / "activations.npy.progress.json").read_text())["done"] == 10
    counter = _Interrupt(after=10**6)
    with hooked(model.transformer.h[0], counter):
        got = extract_to_file(
            model, tokens, path, identity=loaded.identity, batch_size=5, progress=False
        )
    assert counter.calls == 3  # contexts 10-22 only: batches of 5, 5, 3
    np.testing.assert_array_equal(np.asarray(got), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["activations.json", "activations.npy"]


def test_finished_activations_are_reused_only_for_the_same_key(
    tiny_gpt2_dir: Path, tmp_path: Path
) -> None:
    from neuronprobe.activations import extract_to_file

    loaded = load_model(str(tiny_gpt2_dir), device="cpu")
    model = loaded.model
    tokens = random_contexts(model.config.vocab_size, n=6, seed=2)
    path = tmp_path / "activations.npy"
    first = np.asarray(
        extract_to_file(model, tokens, path, identity=loaded.identity, progress=False)
    )
    counter = _Interrupt(after=10**6)
    with hooked(model.transformer.h[0], counter):
        again = extract_to_file(model, tokens, path, identity=loaded.identity, progress=False)
        assert counter.calls == 0
        np.testing.assert_array_equal(np.asarray(again), first)
        other = extract_to_file(
            model, tokens, path, identity=loaded.identity, site="resid.post", progress=False
        )
        assert counter.calls == 1 and other.shape == (4, 6, 64)
        changed = tokens.copy()
        changed[0, 0] += 1
        extract_to_file(
            model, changed, path, identity=loaded.identity, site="resid.post", progress=False
        )
        assert counter.calls == 2


def test_nan_activations_are_named_not_passed_on(tiny_gpt2_dir: Path) -> None:
    model = load_model(str(tiny_gpt2_dir), device="cpu").model
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.bias[7] = float("nan")
    with pytest.raises(NeuronprobeError, match=r"layer 1 gave .*NaN or infinite.*neuron 7"):
        extract_activations(model, random_contexts(model.config.vocab_size), progress=False)


@pytest.mark.parametrize("model_name", ["gpt2", "smollm2"])
def test_contexts_of_unequal_length_compute_what_they_compute_alone(
    model_name: str, tiny_gpt2_dir: Path, request: pytest.FixtureRequest
) -> None:
    if model_name == "gpt2":
        model = load_model(str(tiny_gpt2_dir), device="cpu").model
    else:
        model = request.getfixturevalue("smollm2").model
    rng = np.random.default_rng(4)
    rows = [rng.integers(0, 1000, size=n).tolist() for n in (11, 4, 7, 1, 9)]
    layers = [0, 1]
    for site in SITES:
        padded = extract_activations(
            model, rows, layers=layers, site=site, batch_size=5, progress=False
        )
        alone = np.stack(
            [
                extract_activations(model, [row], layers=layers, site=site, progress=False)[:, 0]
                for row in rows
            ],
            axis=1,
        )
        np.testing.assert_allclose(padded, alone, rtol=1e-4, atol=1e-4)


def test_position_picks_a_token_counted_from_the_end_or_the_start(tiny_gpt2_dir: Path) -> None:
    model = load_model(str(tiny_gpt2_dir), device="cpu").model
    rows = [[5, 6, 7, 8, 9], [10, 11, 12]]
    before_last = extract_activations(model, rows, position=-2, progress=False)
    truncated = extract_activations(model, [row[:-1] for row in rows], progress=False)
    np.testing.assert_allclose(
        before_last, truncated, rtol=1e-5, atol=1e-5
    )  # causal: later tokens do not matter
    first = extract_activations(model, rows, position=0, progress=False)
    alone = extract_activations(model, [row[:1] for row in rows], progress=False)
    np.testing.assert_allclose(first, alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(
        NeuronprobeError, match=r"position 3 is outside the shortest context \(3 tokens\)"
    ):
        extract_activations(model, rows, position=3, progress=False)


# ----------------------------------------------------------------------------------------------
# The model's own answer, from the same forward pass
# ----------------------------------------------------------------------------------------------


def _plain_logprob(model: Any, tokens: np.ndarray, ids: list[int]) -> np.ndarray:
    """log P(ids) and log(1 - P) at the last token, from a plain forward pass of all positions."""
    with torch.inference_mode():
        logits = model(torch.as_tensor(tokens)).logits[:, -1].double()
    logp = torch.log_softmax(logits, dim=-1)
    positive = torch.logsumexp(logp[:, ids], dim=-1)
    rest = torch.ones(logits.shape[-1], dtype=torch.bool)
    rest[ids] = False
    return torch.stack([positive, torch.logsumexp(logp[:, rest], dim=-1)], dim=-1).numpy()


@pytest.mark.parametrize("which", ["gpt2", "smollm2"])
def test_the_models_answer_equals_a_plain_forward_pass(
    which: str, tiny_gpt2_dir: Path, smollm2: Any
) -> None:
    from neuronprobe.activations import logodds

    model = (load_model(str(tiny_gpt2_dir), device="cpu") if which == "gpt2" else smollm2).model
    tokens = random_contexts(model.config.vocab_size, n=6, seed=4)
    ids = [470, 17, 1000]  # several first tokens: their probabilities add up
    answer = np.zeros((6, 2))
    shapes: list[tuple[int, ...]] = []
    head = model.get_output_embeddings()
    with hooked(head, lambda _m, args, _out: shapes.append(tuple(args[0].shape))):
        both = extract_activations(
            model, tokens, layers=[0], batch_size=4, progress=False, positive_ids=ids,
            logprob_out=answer,
        )  # fmt: skip
    # The LM head ran once per batch, at the last position only: [batch, 1, d_model].
    assert [shape[:2] for shape in shapes] == [(4, 1), (2, 1)]
    expected = _plain_logprob(model, tokens, ids)
    np.testing.assert_allclose(answer, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logodds(answer), expected[:, 0] - expected[:, 1], atol=1e-4)
    # P + (1 - P) = 1: the two columns are complementary.
    np.testing.assert_allclose(np.exp(answer).sum(axis=1), 1.0, rtol=1e-12)
    alone = extract_activations(model, tokens, layers=[0], batch_size=4, progress=False)
    np.testing.assert_array_equal(both, alone)  # the activations do not change
    with pytest.raises(NeuronprobeError, match="not all ids of this model's vocabulary"):
        extract_activations(
            model, tokens, progress=False, positive_ids=[10**7], logprob_out=np.zeros((6, 2))
        )


def test_an_interrupted_extraction_resumes_the_models_answer_too(
    tiny_gpt2_dir: Path, tmp_path: Path
) -> None:
    from neuronprobe.activations import extract_to_file, load_logprob

    loaded = load_model(str(tiny_gpt2_dir), device="cpu")
    model = loaded.model
    tokens = random_contexts(model.config.vocab_size, n=13, seed=5)
    path = tmp_path / "activations.npy"
    with hooked(model.transformer.h[0], _Interrupt(after=2)), pytest.raises(KeyboardInterrupt):
        extract_to_file(
            model, tokens, path, identity=loaded.identity, batch_size=5, progress=False,
            positive_ids=[470],
        )  # fmt: skip
    assert load_logprob(path) is None  # nothing finished-looking
    got = extract_to_file(
        model, tokens, path, identity=loaded.identity, batch_size=5, progress=False,
        positive_ids=[470],
    )  # fmt: skip
    np.testing.assert_allclose(load_logprob(path), _plain_logprob(model, tokens, [470]), atol=1e-5)
    assert np.asarray(got).shape == (4, 13, 256)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "activations.json",
        "activations.logprob.npy",
        "activations.npy",
    ]
    # Activations stored without the answer are not reused for a run that wants it.
    counter = _Interrupt(after=10**6)
    with hooked(model.transformer.h[0], counter):
        extract_to_file(model, tokens, path, identity=loaded.identity, progress=False)
        assert counter.calls == 1
        extract_to_file(
            model, tokens, path, identity=loaded.identity, progress=False, positive_ids=[470]
        )
        assert counter.calls == 2
