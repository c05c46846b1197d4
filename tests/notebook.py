"""The notebook's own context loop (part 1 of can-vs-cant-notebook), the reference for
neuronprobe's scanner. Used by the tests and by the benchmarks (which put ``tests/`` on
``sys.path``); kept verbatim but for the stopping rule, which callers choose."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


def notebook_scan(
    texts: Iterable[str],
    tokenizer: Any,
    stop: Callable[[int, int], bool] | None = None,
) -> tuple[list[list[int]], list[list[int]], int]:
    """The notebook's loop over ``texts``: ("can" contexts, "can't" contexts, documents scanned).

    ``stop(len(can_tokens), len(cant_tokens))`` is checked before each document; the notebook's
    own rule is ``lambda can, cant: cant >= 500``. None scans every document.
    """
    context_pre = 10
    cantok = tokenizer.encode(" can")[0]
    attok = tokenizer.encode("'t")[0]
    excluded_following = [
        tokenizer.encode(word)[0]
        for word in [" of", " with", " from", " in", " on", " for", " not"]
    ]
    cant_tokens: list[list[int]] = []
    can_tokens: list[list[int]] = []
    scanned = 0
    for text in texts:
        if stop is not None and stop(len(can_tokens), len(cant_tokens)):
            break
        scanned += 1
        tokens = tokenizer.encode(text)
        for ti in range(context_pre, len(tokens) - 1):
            if tokens[ti] == cantok:
                if tokenizer.decode(tokens[ti + 1]).startswith(" "):
                    if tokens[ti + 1] not in excluded_following:
                        can_tokens.append(tokens[ti - context_pre : ti + 1])
                if tokens[ti + 1] == attok:
                    cant_tokens.append(tokens[ti - context_pre : ti + 1])
    return can_tokens, cant_tokens, scanned


def notebook_activations(
    model: Any, batch_can: Any, batch_cant: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The notebook's part 2 on a gated-MLP model (SmolLM2): hooks on every layer's
    ``mlp.gate_proj`` (GPT-2's ``mlp.c_fc``) keep ALL positions, one full forward pass per
    class batch. Returns (can_activations, cant_activations): ``mlp_{layer}`` -> [batch, pos,
    d_mlp] numpy arrays."""
    import torch

    activations: dict[str, Any] = {}

    def implant_hook(layer_number: int) -> Callable[[Any, Any, Any], None]:
        def hook(module: Any, input: Any, output: Any) -> None:
            activations[f"mlp_{layer_number}"] = output.detach().cpu().numpy()

        return hook

    handles = [
        layer.mlp.gate_proj.register_forward_hook(implant_hook(i))
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        model(batch_can)
    can_activations = activations.copy()
    with torch.no_grad():
        model(batch_cant)
    cant_activations = activations.copy()
    for handle in handles:
        handle.remove()
    return can_activations, cant_activations
