"""Stage 3, activations: read the neurons of every requested layer at the last token.

Entry point: :func:`extract_activations` (model + token array -> float32
``[layers, contexts, neurons]``). Neurons are read at a named *site*, the same names for
every architecture:

``mlp.pre`` (default)
    The MLP's expansion before its non-linearity, ``[batch, pos, d_mlp]``: the output of
    ``mlp.c_fc`` in GPT-2 (the notebook's hook), of ``mlp.gate_proj`` in gated MLPs (Llama,
    SmolLM2, Mistral, Qwen2, Gemma), of ``mlp.dense_h_to_4h`` in GPT-NeoX/Pythia.
``mlp.post``
    The input of the MLP's down projection, ``[batch, pos, d_mlp]``: GELU of ``c_fc`` in
    GPT-2, ``act(gate_proj(x)) * up_proj(x)`` in gated MLPs.
``resid.post``
    The block's output hidden state (the residual stream after the layer), ``[batch, pos,
    d_model]``.

Only the last position is kept (the notebook stores all positions and then uses the last one),
the forward pass stops right after the deepest requested layer (no later block, no logits),
and everything runs under ``torch.inference_mode``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neuronprobe.errors import NeuronprobeError

logger = logging.getLogger(__name__)

SITES = ("mlp.pre", "mlp.post", "resid.post")


@dataclass(frozen=True)
class Architecture:
    """Where one architecture keeps its blocks and the modules the sites are read from.

    Attributes
    ----------
    blocks:
        Attribute path, from the ``*ForCausalLM`` model, of the list of transformer blocks.
    mlp_in:
        Path, from a block, of the MLP's expansion: its output is ``mlp.pre``.
    mlp_out:
        Path, from a block, of the MLP's down projection: its input is ``mlp.post``.
    """

    blocks: str
    mlp_in: str
    mlp_out: str


_GATED = Architecture(blocks="model.layers", mlp_in="mlp.gate_proj", mlp_out="mlp.down_proj")
ARCHITECTURES: dict[str, Architecture] = {
    "gpt2": Architecture(blocks="transformer.h", mlp_in="mlp.c_fc", mlp_out="mlp.c_proj"),
    "gpt_neox": Architecture(
        blocks="gpt_neox.layers", mlp_in="mlp.dense_h_to_4h", mlp_out="mlp.dense_4h_to_h"
    ),
    "llama": _GATED,
    "mistral": _GATED,
    "qwen2": _GATED,
    "qwen3": _GATED,
    "gemma": _GATED,
    "gemma2": _GATED,
}


@dataclass(frozen=True)
class HookPoint:
    """Where one site of one layer is read: a module, and whether its input or its output."""

    module: Any
    name: str  # e.g. "model.layers.3.mlp.gate_proj"
    reads: str  # "input" or "output"

    def register(self, read: Callable[[Any], None]) -> Any:
        """Call ``read`` with the site's tensor [batch, pos, width] on every forward pass."""
        if self.reads == "input":
            return self.module.register_forward_pre_hook(lambda _m, args: read(args[0]))

        def on_output(_module: Any, _inputs: Any, output: Any) -> None:
            # Blocks return a tuple (hidden states, ...) in some versions, a tensor in others.
            read(output[0] if isinstance(output, tuple) else output)

        return self.module.register_forward_hook(on_output)


class _StopForward(Exception):
    """Raised by the deepest layer's hook: everything after it is not needed."""


def architecture_of(model: Any) -> Architecture:
    """The :class:`Architecture` of a Hugging Face causal LM, or a clear error."""
    return architecture_for(getattr(getattr(model, "config", None), "model_type", None))


def architecture_for(model_type: str | None) -> Architecture:
    """The :class:`Architecture` of a ``config.model_type``, or a clear error (checked before
    a model's weights are loaded or downloaded)."""
    if model_type not in ARCHITECTURES:
        raise NeuronprobeError(
            f"model type {model_type!r} has no neuron-site mapping yet; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}."
        )
    return ARCHITECTURES[model_type]


def _get(module: Any, path: str) -> Any:
    for name in path.split("."):
        module = getattr(module, name)
    return module


def hook_points(model: Any, site: str = "mlp.pre") -> list[HookPoint]:
    """Where ``site`` is read in every layer; index = layer."""
    if site not in SITES:
        raise NeuronprobeError(f"unknown neuron site {site!r}; available: {', '.join(SITES)}.")
    architecture = architecture_of(model)
    blocks = _get(model, architecture.blocks)
    points = []
    for layer, block in enumerate(blocks):
        prefix = f"{architecture.blocks}.{layer}"
        if site == "mlp.pre":
            path, reads = architecture.mlp_in, "output"
        elif site == "mlp.post":
            path, reads = architecture.mlp_out, "input"
        else:
            path, reads = "", "output"
        module = _get(block, path) if path else block
        points.append(HookPoint(module, f"{prefix}.{path}" if path else prefix, reads))
    return points


def resolve_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    """Requested layers, sorted and unique; ``None`` -> all. Negative indices count from the end."""
    if layers is None:
        return list(range(n_layers))
    resolved = set()
    for layer in layers:
        index = layer + n_layers if layer < 0 else layer
        if not 0 <= index < n_layers:
            raise NeuronprobeError(
                f"layer {layer} is out of range: the model has {n_layers} layers (0-{n_layers - 1})."
            )
        resolved.add(index)
    if not resolved:
        raise NeuronprobeError("--layers is empty; name at least one layer, or omit it for all.")
    return sorted(resolved)


def _left_padded(rows: Sequence[Sequence[int]], device: Any) -> tuple[Any, Any, Any]:
    """Left-pad token rows: (input_ids, attention_mask, position_ids), each [batch, pos].

    Left padding puts every context's last token in the last column; the mask hides the pads
    from attention and the position ids count from each context's own first token, so a
    padded context computes what it computes alone.
    """
    import torch

    length = max(len(row) for row in rows)
    ids = torch.zeros((len(rows), length), dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, length - len(row) :] = torch.as_tensor(list(row), dtype=torch.long)
            mask[i, length - len(row) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def extract_activations(
    model: Any,
    tokens: np.ndarray | Sequence[Sequence[int]],
    *,
    layers: Sequence[int] | None = None,
    site: str = "mlp.pre",
    position: int = -1,
    batch_size: int = 64,
    out: np.ndarray | None = None,
    start: int = 0,
    on_batch: Callable[[int], None] | None = None,
    progress: bool = True,
    context_offset: int = 0,
) -> np.ndarray:
    """Neuron activations at one token of each context (the last, by default).

    Parameters
    ----------
    model:
        A Hugging Face causal LM in eval mode (see :func:`neuronprobe.models.load_model`).
    tokens:
        int [contexts, pos], or a list of token lists of unequal lengths (left-padded, with an
        attention mask and position ids, so each context computes what it computes alone).
    layers:
        Layers to read (default all).
    site:
        Neuron site name (see the module docstring).
    position:
        Which token of each context: ``-1`` the last (the target), ``-2`` the one before...;
        ``0`` and up count from each context's first token.
    batch_size:
        Contexts per forward pass.
    out:
        Optional float32 array [layers, contexts, neurons] to fill (e.g. an ``np.memmap``);
        a new array is allocated when omitted.
    start:
        First context to compute; rows before it in ``out`` are taken as already done (resume).
    on_batch:
        Called with the number of contexts done after each batch is written into ``out``.
    context_offset:
        Index of ``tokens[0]`` among all contexts, for error messages only (the Ray engine
        extracts one batch at a time).

    Returns
    -------
    np.ndarray
        float32 [layers, contexts, neurons], ``out`` if it was given.
    """
    import torch
    from tqdm.auto import tqdm

    points = hook_points(model, site)
    chosen = resolve_layers(layers, len(points))
    rows = [list(map(int, row)) for row in tokens]
    if not rows or not all(rows):
        raise NeuronprobeError("tokens must be a non-empty list of non-empty contexts.")
    shortest = min(len(row) for row in rows)
    if not -shortest <= position < shortest:
        raise NeuronprobeError(
            f"position {position} is outside the shortest context ({shortest} tokens); use "
            f"-{shortest} to {shortest - 1} (-1 = the last token)."
        )
    device = next(model.parameters()).device
    n_contexts = len(rows)
    if start and out is None:
        raise ValueError("start > 0 resumes into `out`: pass the partly filled array")

    current: dict[int, Any] = {}  # layer -> [batch, d_mlp] of the batch being processed
    deepest = chosen[-1]

    def reader(layer: int) -> Callable[[Any], None]:
        def read(values: Any) -> None:
            # [batch, pos, width] -> [batch, width]; a copy, so the full tensor can be freed.
            current[layer] = values[rows_index, columns, :].clone()
            if layer == deepest:
                raise _StopForward

        return read

    handles = [points[layer].register(reader(layer)) for layer in chosen]
    try:
        with (
            torch.inference_mode(),
            tqdm(
                total=n_contexts,
                initial=start,
                desc="activations",
                unit=" contexts",
                disable=not progress,
            ) as bar,
        ):
            for first in range(start, n_contexts, batch_size):
                chunk = rows[first : first + batch_size]
                batch, mask, position_ids = _left_padded(chunk, device)
                padded = batch.shape[1]
                lengths = torch.as_tensor([len(row) for row in chunk], device=device)
                # The wanted token's column: from the end, or from each context's own start.
                columns = (padded + position) if position < 0 else (padded - lengths + position)
                rows_index = torch.arange(len(chunk), device=device)
                current.clear()
                with contextlib.suppress(_StopForward):
                    model(
                        input_ids=batch,
                        attention_mask=mask,
                        position_ids=position_ids,
                        use_cache=False,
                    )
                if out is None:
                    width = current[deepest].shape[-1]
                    out = np.empty((len(chosen), n_contexts, width), dtype=np.float32)
                for row, layer in enumerate(chosen):
                    values = current[layer].to(torch.float32).cpu().numpy()  # [batch, width]
                    _check_finite(values, layer, context_offset + first)
                    out[row, first : first + len(chunk)] = values
                bar.update(len(chunk))
                if on_batch is not None:
                    on_batch(first + len(chunk))
    finally:
        for handle in handles:
            handle.remove()
    assert out is not None
    return out


def _check_finite(values: np.ndarray, layer: int, first: int) -> None:
    """Refuse NaN or infinite activations, naming where they are."""
    bad = ~np.isfinite(values)
    if bad.any():
        contexts, neurons = np.nonzero(bad)
        raise NeuronprobeError(
            f"layer {layer} gave {int(bad.sum())} NaN or infinite activations (first at context "
            f"{first + int(contexts[0])}, neuron {int(neurons[0])}; neurons "
            f"{sorted(set(neurons.tolist()))[:10]}); the model's weights or --dtype are unusable "
            "here: try --dtype float32."
        )


def site_width(model: Any, site: str = "mlp.pre") -> int:
    """Neurons per layer at ``site``: ``d_mlp`` for the MLP sites, ``d_model`` for ``resid.post``."""
    point = hook_points(model, site)[0]
    if site == "resid.post":
        return int(model.config.hidden_size)
    weight = point.module.weight
    # GPT-2's Conv1D stores [in, out]; nn.Linear stores [out, in].
    in_features, out_features = (
        weight.shape if type(point.module).__name__ == "Conv1D" else weight.shape[::-1]
    )
    return int(out_features if site == "mlp.pre" else in_features)


def extract_to_file(
    model: Any,
    tokens: np.ndarray,
    path: Path,
    *,
    identity: dict[str, Any],
    layers: Sequence[int] | None = None,
    site: str = "mlp.pre",
    position: int = -1,
    batch_size: int = 64,
    progress: bool = True,
) -> np.ndarray:
    """:func:`extract_activations` into ``path`` (``.npy``), resumable and reusable.

    Batches are written into ``<path>.partial`` (a memory-mapped ``.npy``) and the number of
    contexts done into ``<path>.progress.json`` after each one, so an interrupted extraction
    (Ctrl-C, a kill) continues where it stopped; the finished array is renamed to ``path`` and
    described in ``<path stem>.json``. A later call whose model identity, contexts, site and
    layers are the same reuses the finished array, or the partial one.

    Parameters
    ----------
    identity:
        What identifies the model's weights (e.g. ``LoadedModel.identity``: GGUF or weight
        hashes, hub revision); part of the key that decides reuse.

    Returns
    -------
    np.ndarray
        Read-only memory map, float32 [layers, contexts, neurons].
    """
    tokens = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64))
    chosen = resolve_layers(layers, len(hook_points(model, site)))
    shape = (len(chosen), tokens.shape[0], site_width(model, site))
    store = ActivationFile.for_path(
        path, activation_key(identity, tokens, chosen, site, position, shape)
    )
    finished = store.finished()
    if finished is not None:
        return finished
    out, done = store.open(shape)
    extract_activations(
        model,
        tokens,
        layers=chosen,
        site=site,
        position=position,
        batch_size=batch_size,
        out=out,
        start=done,
        on_batch=lambda done: store.checkpoint(out, done),
        progress=progress,
    )
    return store.finish(out)


def activation_key(
    identity: dict[str, Any],
    tokens: np.ndarray,
    layers: Sequence[int],
    site: str,
    position: int,
    shape: tuple[int, int, int],
) -> dict[str, Any]:
    """What decides whether stored activations can be reused: the model's identity (without
    its device and cache folder), the contexts' tokens (int64 [contexts, pos], hashed), the
    site, position, resolved layers and the array's shape ``[layers, contexts, neurons]``."""
    import hashlib

    tokens = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64))
    return {
        "model": {k: v for k, v in identity.items() if k not in ("device", "cache")},
        "site": site,
        "position": position,
        "layers": list(layers),
        "tokens_sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
        "shape": list(shape),
    }


@dataclass(frozen=True)
class ActivationFile:
    """The files of one resumable extraction into ``path`` (see :func:`extract_to_file`).

    ``<path>.partial`` is the memory-mapped ``.npy`` being filled, ``<path>.progress.json``
    holds ``{"key": ..., "done": n}`` (the first ``n`` contexts are in the partial file), and
    ``<path stem>.json`` describes the finished array. Every engine (the single-process one
    and :mod:`neuronprobe.distributed`'s Ray engine) uses these files, so an extraction
    interrupted under one engine resumes under the other.
    """

    path: Path
    key: dict[str, Any]

    @classmethod
    def for_path(cls, path: Path | str, key: dict[str, Any]) -> ActivationFile:
        return cls(Path(path), key)

    @property
    def partial(self) -> Path:
        return self.path.with_name(self.path.name + ".partial")

    @property
    def progress_file(self) -> Path:
        return self.path.with_name(self.path.name + ".progress.json")

    @property
    def described(self) -> Path:
        return self.path.with_suffix(".json")

    def _stored_key(self, file: Path) -> Any:
        from neuronprobe.rundir import read_json

        try:
            return read_json(file).get("key")
        except (OSError, ValueError):
            return None

    def finished(self) -> np.ndarray | None:
        """The finished array (read-only memory map) if its key matches and the file is whole
        (not truncated or overwritten since), else None."""
        from neuronprobe.rundir import npy_problem

        if not self.path.is_file() or self._stored_key(self.described) != self.key:
            return None
        problem = npy_problem(self.path, self.key.get("shape"))
        if problem is not None:
            logger.warning(
                "%s is damaged (%s); recording the activations again", self.path, problem
            )
            return None
        logger.info("reusing the activations in %s", self.path)
        return np.load(self.path, mmap_mode="r")

    def open(self, shape: tuple[int, int, int]) -> tuple[np.ndarray, int]:
        """The partial array (float32 ``shape``, memory-mapped for writing) and how many
        contexts it already holds: resumed when its key matches, else started afresh."""
        from neuronprobe.rundir import read_json, write_json

        if self.partial.is_file() and self._stored_key(self.progress_file) == self.key:
            done = int(read_json(self.progress_file)["done"])
            out = np.load(self.partial, mmap_mode="r+")
            logger.info("resuming the activations at context %d of %d", done, shape[1])
            return out, done
        out = np.lib.format.open_memmap(self.partial, mode="w+", dtype=np.float32, shape=shape)
        write_json(self.progress_file, {"key": self.key, "done": 0})
        return out, 0

    def checkpoint(self, out: np.ndarray, done: int) -> None:
        """Record that the first ``done`` contexts are in ``out`` (flushed first)."""
        from neuronprobe.rundir import write_json

        if isinstance(out, np.memmap):
            out.flush()  # the rows first, then the count that says they are there
        write_json(self.progress_file, {"key": self.key, "done": done})

    def finish(self, out: np.ndarray) -> np.ndarray:
        """Rename the complete partial array to ``path``, describe it; a read-only memory map."""
        from neuronprobe.rundir import write_json

        if isinstance(out, np.memmap):
            out.flush()
        os.replace(self.partial, self.path)
        write_json(self.described, {"key": self.key, "axes": ["layer", "context", "neuron"]})
        self.progress_file.unlink(missing_ok=True)
        return np.load(self.path, mmap_mode="r")
