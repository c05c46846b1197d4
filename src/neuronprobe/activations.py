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
    positive_ids: Sequence[int] | None = None,
    logprob_out: np.ndarray | None = None,
) -> np.ndarray:
    """Neuron activations at one token of each context (the last, by default), and, from the
    same forward pass, the model's own answer at the last token.

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
    positive_ids:
        Token ids whose total probability the model gives at the last token is wanted (the
        first tokens of the positive followers: ``"'t"`` for the default contrast). The forward
        pass then runs to the end and the LM head is applied at the last position only.
    logprob_out:
        float64 [contexts, 2] to fill with ``log P`` and ``log(1 - P)``, ``P`` the model's
        total probability of ``positive_ids`` at the last token (both from log-sum-exps over
        the logits, so neither loses precision when ``P`` is near 0 or 1). Required with
        ``positive_ids``.

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
    wanted = None
    if positive_ids is not None:
        if logprob_out is None or logprob_out.shape != (n_contexts, 2):
            raise ValueError("positive_ids needs logprob_out, float64 [contexts, 2]")
        wanted = torch.as_tensor(sorted({int(i) for i in positive_ids}), device=device)
        vocabulary = model.get_output_embeddings().weight.shape[0]
        if not len(wanted) or int(wanted.min()) < 0 or int(wanted.max()) >= vocabulary:
            raise NeuronprobeError(
                f"the positive followers' first tokens {wanted.tolist()} are not all ids of "
                f"this model's vocabulary (0-{vocabulary - 1}); were the contexts made with "
                "its tokenizer?"
            )

    current: dict[int, Any] = {}  # layer -> [batch, d_mlp] of the batch being processed
    deepest = chosen[-1]

    def reader(layer: int) -> Callable[[Any], None]:
        def read(values: Any) -> None:
            # [batch, pos, width] -> [batch, width]; a copy, so the full tensor can be freed.
            current[layer] = values[rows_index, columns, :].clone()
            if layer == deepest and wanted is None:
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
                    output = model(
                        input_ids=batch,
                        attention_mask=mask,
                        position_ids=position_ids,
                        use_cache=False,
                        # The LM head at the last position only: [batch, 1, vocab].
                        logits_to_keep=1,
                    )
                if wanted is not None:
                    assert logprob_out is not None
                    answer = _positive_logprob(output.logits[:, -1], wanted)  # [batch, 2]
                    logprob_out[first : first + len(chunk)] = answer
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


def _positive_logprob(logits: Any, wanted: Any) -> np.ndarray:
    """``[log P, log(1 - P)]`` per row, float64 [batch, 2], from logits [batch, vocab];
    ``P`` = the softmax probability of the ids ``wanted`` together."""
    import torch

    logits = logits.to(torch.float64)
    total = torch.logsumexp(logits, dim=-1)
    rest = logits.clone()
    rest[:, wanted] = -torch.inf
    positive = torch.logsumexp(logits[:, wanted], dim=-1) - total
    negative = torch.logsumexp(rest, dim=-1) - total
    return torch.stack([positive, negative], dim=-1).cpu().numpy()


def logodds(logprob: np.ndarray) -> np.ndarray:
    """``log P - log(1 - P)`` from :func:`extract_activations`' ``[log P, log(1 - P)]`` pairs
    (float64 [contexts, 2] -> [contexts])."""
    return np.asarray(logprob[:, 0] - logprob[:, 1], dtype=np.float64)


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
    positive_ids: Sequence[int] | None = None,
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
    positive_ids:
        With them, the model's own answer from the same forward pass is stored beside the
        activations (``ActivationFile.logprob_path``; read it with :func:`load_logprob`).

    Returns
    -------
    np.ndarray
        Read-only memory map, float32 [layers, contexts, neurons].
    """
    tokens = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64))
    chosen = resolve_layers(layers, len(hook_points(model, site)))
    shape = (len(chosen), tokens.shape[0], site_width(model, site))
    store = ActivationFile.for_path(
        path, activation_key(identity, tokens, chosen, site, position, shape, positive_ids)
    )
    finished = store.finished()
    if finished is not None:
        return finished
    out, logprob, done = store.open(shape)
    extract_activations(
        model,
        tokens,
        layers=chosen,
        site=site,
        position=position,
        batch_size=batch_size,
        out=out,
        start=done,
        on_batch=lambda done: store.checkpoint(out, done, logprob),
        progress=progress,
        positive_ids=positive_ids,
        logprob_out=logprob,
    )
    return store.finish(out, logprob)


def load_logprob(path: Path | str) -> np.ndarray | None:
    """The model's own answer stored beside the activations ``path`` by :func:`extract_to_file`:
    float64 [contexts, 2], ``log P`` and ``log(1 - P)`` of the positive followers' first tokens
    at the last token; None where the activations were recorded without it."""
    file = ActivationFile.for_path(path, {}).logprob_path
    return np.load(file) if file.is_file() else None


def activation_key(
    identity: dict[str, Any],
    tokens: np.ndarray,
    layers: Sequence[int],
    site: str,
    position: int,
    shape: tuple[int, int, int],
    positive_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """What decides whether stored activations can be reused: the model's identity (without
    its device and cache folder), the contexts' tokens (int64 [contexts, pos], hashed), the
    site, position, resolved layers, the array's shape ``[layers, contexts, neurons]``, and
    the token ids of the model's stored answer (None: no answer stored)."""
    import hashlib

    tokens = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64))
    return {
        "model": {k: v for k, v in identity.items() if k not in ("device", "cache")},
        "site": site,
        "position": position,
        "layers": list(layers),
        "tokens_sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
        "shape": list(shape),
        "positive_ids": sorted({int(i) for i in positive_ids}) if positive_ids else None,
    }


@dataclass(frozen=True)
class ActivationFile:
    """The files of one resumable extraction into ``path`` (see :func:`extract_to_file`).

    ``<path>.partial`` is the memory-mapped ``.npy`` being filled, ``<path>.progress.json``
    holds ``{"key": ..., "done": n}`` (the first ``n`` contexts are in the partial file), and
    ``<path stem>.json`` describes the finished array. When the key names ``positive_ids``,
    the model's own answer (float64 [contexts, 2], see :func:`extract_activations`) is filled
    beside it in ``<path stem>.logprob.npy.partial`` and checkpointed with it. Every engine (the single-process one
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

    @property
    def logprob_path(self) -> Path:
        return self.path.with_name(self.path.stem + ".logprob.npy")

    @property
    def logprob_partial(self) -> Path:
        return self.logprob_path.with_name(self.logprob_path.name + ".partial")

    @property
    def with_logprob(self) -> bool:
        return bool(self.key.get("positive_ids"))

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
        if problem is None and self.with_logprob:
            problem = (
                npy_problem(self.logprob_path, [self.key["shape"][1], 2])
                if self.logprob_path.is_file()
                else f"without its {self.logprob_path.name}"
            )
        if problem is not None:
            logger.warning(
                "%s is damaged (%s); recording the activations again", self.path, problem
            )
            return None
        logger.info("reusing the activations in %s", self.path)
        return np.load(self.path, mmap_mode="r")

    def open(self, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray | None, int]:
        """The partial array (float32 ``shape``, memory-mapped for writing), the partial answer
        (float64 [contexts, 2], or None when the key wants none) and how many contexts they
        already hold: resumed when the key matches, else started afresh."""
        from neuronprobe.rundir import read_json, write_json

        resumable = self.partial.is_file() and (
            not self.with_logprob or self.logprob_partial.is_file()
        )
        if resumable and self._stored_key(self.progress_file) == self.key:
            done = int(read_json(self.progress_file)["done"])
            out = np.load(self.partial, mmap_mode="r+")
            logprob = np.load(self.logprob_partial, mmap_mode="r+") if self.with_logprob else None
            logger.info("resuming the activations at context %d of %d", done, shape[1])
            return out, logprob, done
        out = np.lib.format.open_memmap(self.partial, mode="w+", dtype=np.float32, shape=shape)
        logprob = None
        if self.with_logprob:
            logprob = np.lib.format.open_memmap(
                self.logprob_partial, mode="w+", dtype=np.float64, shape=(shape[1], 2)
            )
        write_json(self.progress_file, {"key": self.key, "done": 0})
        return out, logprob, 0

    def checkpoint(self, out: np.ndarray, done: int, logprob: np.ndarray | None = None) -> None:
        """Record that the first ``done`` contexts are in ``out`` and ``logprob`` (flushed
        first)."""
        from neuronprobe.rundir import write_json

        for array in (out, logprob):
            if isinstance(array, np.memmap):
                array.flush()  # the rows first, then the count that says they are there
        write_json(self.progress_file, {"key": self.key, "done": done})

    def finish(self, out: np.ndarray, logprob: np.ndarray | None = None) -> np.ndarray:
        """Rename the complete partial arrays to ``path`` (and ``logprob_path``), describe
        them; the activations as a read-only memory map."""
        from neuronprobe.rundir import write_json

        for array in (out, logprob):
            if isinstance(array, np.memmap):
                array.flush()
        if self.with_logprob:
            os.replace(self.logprob_partial, self.logprob_path)
        os.replace(self.partial, self.path)
        description: dict[str, Any] = {"key": self.key, "axes": ["layer", "context", "neuron"]}
        if self.with_logprob:
            description["logprob"] = {
                "file": self.logprob_path.name,
                "columns": ["log P(positive first tokens)", "log(1 - P)"],
                "position": "the last token",
            }
        write_json(self.described, description)
        self.progress_file.unlink(missing_ok=True)
        return np.load(self.path, mmap_mode="r")
