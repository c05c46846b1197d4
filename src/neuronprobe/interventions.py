"""Interventions at the last token: set some neurons of one layer, read the prediction.

Entry point: :func:`logodds_after` (model + contexts + :class:`Intervention` list ->
float64 ``[interventions + 1, contexts]`` of ``logodds_positive``, the log odds that the token
after the context is one of ``positive_ids``; row 0 is the unchanged model). An intervention
writes ``values`` into ``neurons`` of one layer's site (the sites of
:mod:`neuronprobe.activations`: ``mlp.pre``, ``mlp.post``, ``resid.post``) at the last position
only.

A change at the last position leaves every earlier position as it was, so the contexts'
first ``n - 1`` positions are run once per batch of contexts, with their keys and values kept
(a ``DynamicCache``), and each intervention recomputes only the last position, many
interventions at a time (the cache repeated along the batch, intervention-major rows). The
recompute starts at the changed layer: the blocks before it are not run again but replaced,
for that pass, by the hidden state that enters the changed layer at the last position,
recorded once per batch of contexts in the unchanged pass (their outputs at the last position
do not depend on the change, and the changed layer and the ones after it read only their own
cache entries). :func:`logodds_full_forward` is the naive way, one forward pass of every
position per intervention, kept as the reference.

transformers' caches: a ``DynamicCache`` grows in place, by concatenation, when a forward pass
uses it (``use_cache=True``), so a cache reused for the next pass would hold the previous pass's
last position. After every pass each layer that the pass appended to is cropped back to the
first positions, one layer at a time: ``Cache.crop`` crops every layer, also those of the
skipped blocks, which were not appended to. Since transformers 5.2x the forward argument is
``cache`` (``past_key_values`` before); both are handled.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from neuronprobe.activations import (
    HookPoint,
    _get,
    _left_padded,
    architecture_of,
    hook_points,
    site_width,
)
from neuronprobe.errors import NeuronprobeError

logger = logging.getLogger(__name__)

MAX_ROWS = 1024
"""Default rows (interventions x contexts) recomputed in one pass at the last position."""


@dataclass(frozen=True, eq=False)
class Intervention:
    """Set some neurons of one layer's site to given values, at the last position.

    Compared by identity (it holds arrays). ``neurons`` is stored as int64 and ``values`` as
    float32 whatever array-like is given.

    Attributes
    ----------
    layer:
        Model layer number (0 = the first block).
    neurons:
        int64 [k] neuron indices at the site, distinct; ``k`` may be 0 (changes nothing).
    values:
        float32 [k] (the same for every context) or [contexts, k] (one row per context, e.g.
        the other class's mean for a patch).
    """

    layer: int
    neurons: np.ndarray
    values: np.ndarray

    def __post_init__(self) -> None:
        try:
            neurons = np.asarray(self.neurons)
            values = np.asarray(self.values, dtype=np.float32)
        except (TypeError, ValueError) as error:
            raise NeuronprobeError(
                f"intervention at layer {self.layer}: neurons and values must be numeric arrays "
                f"({error})."
            ) from error
        if neurons.ndim != 1 or (neurons.size and not np.issubdtype(neurons.dtype, np.integer)):
            raise NeuronprobeError(
                f"intervention at layer {self.layer}: neurons must be a 1-D integer array, got "
                f"shape {neurons.shape} of {neurons.dtype}."
            )
        object.__setattr__(self, "neurons", neurons.astype(np.int64))
        object.__setattr__(self, "values", values)


def logodds_positive(logits_last: Any, positive_ids: Sequence[int]) -> tuple[Any, Any]:
    """Log probability and log odds that the next token is one of ``positive_ids``.

    ``P`` = the softmax's total probability of ``positive_ids``; ``logprob = log P`` and
    ``logodds = log P - log(1 - P)``, both from log-sum-exps (over the positive ids, over all
    tokens, over the other tokens), so they stay exact where ``P`` is near 0 or 1.

    Parameters
    ----------
    logits_last:
        [rows, vocab] logits at the last position: a torch tensor (computed in at least
        float32, returned as torch tensors) or a numpy array (computed and returned in float64).
    positive_ids:
        Distinct token ids, not all of the vocabulary.

    Returns
    -------
    tuple
        ``(logprob, logodds)``, each [rows].
    """
    import torch

    as_numpy = not isinstance(logits_last, torch.Tensor)
    logits = (
        torch.from_numpy(np.asarray(logits_last, dtype=np.float64)) if as_numpy else logits_last
    )
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    ids = torch.as_tensor(list(positive_ids), dtype=torch.long, device=logits.device)
    positive = torch.logsumexp(logits[..., ids], dim=-1)  # [rows]
    total = torch.logsumexp(logits, dim=-1)  # [rows]
    negative = torch.logsumexp(logits.index_fill(-1, ids, float("-inf")), dim=-1)  # [rows]
    logprob, logodds = positive - total, positive - negative
    if as_numpy:
        return logprob.numpy(), logodds.numpy()
    return logprob, logodds


def logodds_after(
    model: Any,
    tokens: np.ndarray | Sequence[Sequence[int]],
    interventions: Sequence[Intervention | Sequence[Intervention]],
    *,
    positive_ids: Sequence[int],
    site: str = "mlp.pre",
    batch_size: int = 64,
    progress: bool = False,
    max_rows: int = MAX_ROWS,
) -> np.ndarray:
    """``logodds_positive`` at the last position, unchanged and after each intervention.

    The first ``n - 1`` positions of each batch of contexts run once (keys and values
    cached); each intervention then recomputes the last position only, from its layer on,
    with up to ``max_rows`` (interventions x contexts) rows per pass.

    Parameters
    ----------
    model:
        A Hugging Face causal LM (see :func:`neuronprobe.models.load_model`).
    tokens:
        int [contexts, pos], or a list of token lists of unequal lengths (left-padded, with an
        attention mask and position ids, as in :func:`neuronprobe.activations.extract_activations`).
    interventions:
        What to change (see :class:`Intervention`); per-context values have one row per context.
        An item may also be a sequence of interventions at different layers, made together in
        one pass (the whole model's: every layer's neurons at once).
    positive_ids:
        Token ids whose total probability is ``P`` (the first tokens of the positive followers).
    site:
        Where the neurons are (``mlp.pre``, ``mlp.post`` or ``resid.post``).
    batch_size:
        Contexts whose first positions run together.
    progress:
        Show a progress bar (passes done).
    max_rows:
        Rows per recompute pass (memory: the logits are [rows, vocab] floats).

    Returns
    -------
    np.ndarray
        float64 [len(interventions) + 1, contexts]: row 0 the unchanged model, row ``i + 1``
        after ``interventions[i]``.
    """
    import torch
    from tqdm.auto import tqdm

    rows = _context_rows(tokens)
    ids = _positive_ids(model, positive_ids)
    point_list = hook_points(model, site)
    width = site_width(model, site)
    # Each item as {layer: its change}, the layers' non-empty changes only.
    items: list[dict[int, Intervention]] = []
    for number, item in enumerate(interventions):
        changes = [item] if isinstance(item, Intervention) else list(item)
        by_item: dict[int, Intervention] = {}
        for change in changes:
            _check_intervention(change, number, len(point_list), width, len(rows))
            if change.layer in by_item:
                raise NeuronprobeError(
                    f"interventions[{number}] changes layer {change.layer} twice; give each "
                    "layer's neurons in one Intervention."
                )
            if change.neurons.size:
                by_item[int(change.layer)] = change
        items.append(by_item)
    if batch_size < 1 or max_rows < 1:
        raise NeuronprobeError(
            f"batch_size ({batch_size}) and max_rows ({max_rows}) must be at least 1."
        )
    # Grouped by the first layer they change: a pass recomputes from there on.
    by_layer: dict[int, list[int]] = defaultdict(list)
    for number, by_item in enumerate(items):
        if by_item:  # k = 0 changes nothing: the baseline row is copied
            by_layer[min(by_item)].append(number)
    n_contexts = len(rows)
    out = np.empty((len(items) + 1, n_contexts), dtype=np.float64)
    blocks = _get(model, architecture_of(model).blocks)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    passes = sum(
        -(-len(numbers) // max(1, max_rows // min(batch_size, n_contexts - first)))
        for first in range(0, n_contexts, batch_size)
        for numbers in by_layer.values()
    )
    with (
        torch.inference_mode(),
        _eval_mode(model),
        tqdm(total=passes, desc="interventions", unit=" passes", disable=not progress) as bar,
    ):
        for first in range(0, n_contexts, batch_size):
            chunk = rows[first : first + batch_size]
            step = _LastStep.prepare(model, chunk, device)
            logits, entering = step.run(model, blocks, record=True)
            out[0, first : first + len(chunk)] = _logodds(logits, ids)
            per_pass = max(1, max_rows // len(chunk))
            for layer, numbers in sorted(by_layer.items()):
                for start in range(0, len(numbers), per_pass):
                    group = numbers[start : start + per_pass]
                    # One edit per layer the group changes; an item that leaves a layer alone
                    # has no neuron set there.
                    edits = [
                        (
                            point_list[changed],
                            _Edit.build(
                                [items[n].get(changed, _unchanged(changed)) for n in group],
                                first,
                                len(chunk),
                                width,
                                dtype,
                                device,
                            ),
                        )
                        for changed in sorted({lay for n in group for lay in items[n]})
                    ]
                    logits, _ = step.run(
                        model,
                        blocks,
                        repeats=len(group),
                        edits=edits,
                        start=layer,
                        entering=entering,
                    )
                    values = _logodds(logits, ids).reshape(len(group), len(chunk))
                    out[np.asarray(group) + 1, first : first + len(chunk)] = values
                    bar.update(1)
            logger.debug("interventions: contexts %d-%d done", first, first + len(chunk) - 1)
    for number, by_item in enumerate(items):
        if not by_item:
            out[number + 1] = out[0]
    return out


def _unchanged(layer: int) -> Intervention:
    """No neuron of ``layer`` changed (a place holder in a pass that changes it for others)."""
    return Intervention(layer, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))


def logodds_full_forward(
    model: Any,
    tokens: np.ndarray | Sequence[Sequence[int]],
    intervention: Intervention | Sequence[Intervention] | None,
    *,
    positive_ids: Sequence[int],
    site: str = "mlp.pre",
    batch_size: int = 64,
) -> np.ndarray:
    """``logodds_positive`` after one intervention, the naive way: every position, every layer.

    One forward pass of all positions per batch of contexts, with the same hook as
    :func:`logodds_after` (last position changed only), no cache. The reference for the cached
    path's tests and the benchmark's baseline.

    Parameters
    ----------
    intervention:
        The change (or changes at several layers, made together), or None for the unchanged
        model.
    tokens, positive_ids, site, batch_size:
        As for :func:`logodds_after`.

    Returns
    -------
    np.ndarray
        float64 [contexts].
    """
    import torch

    rows = _context_rows(tokens)
    ids = _positive_ids(model, positive_ids)
    point_list = hook_points(model, site)
    width = site_width(model, site)
    changes = (
        [] if intervention is None
        else [intervention] if isinstance(intervention, Intervention)
        else list(intervention)
    )  # fmt: skip
    for change in changes:
        _check_intervention(change, 0, len(point_list), width, len(rows))
    if batch_size < 1:
        raise NeuronprobeError(f"batch_size ({batch_size}) must be at least 1.")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    out = np.empty(len(rows), dtype=np.float64)
    with torch.inference_mode(), _eval_mode(model):
        for first in range(0, len(rows), batch_size):
            chunk = rows[first : first + batch_size]
            input_ids, mask, positions = _left_padded(chunk, device)
            handles = [
                _register_edit(
                    point_list[change.layer],
                    _Edit.build([change], first, len(chunk), width, dtype, device),
                )
                for change in changes
                if change.neurons.size
            ]
            try:
                output = model(
                    input_ids=input_ids,
                    attention_mask=mask,
                    position_ids=positions,
                    use_cache=False,
                    **_logits_to_keep(model),
                )
            finally:
                for handle in handles:
                    handle.remove()
            out[first : first + len(chunk)] = _logodds(output.logits[:, -1, :], ids)
    return out


# --- input checks -----------------------------------------------------------------------------


def _context_rows(tokens: np.ndarray | Sequence[Sequence[int]]) -> list[list[int]]:
    """Contexts as lists of ints; refuses an empty set or an empty context."""
    try:
        rows = [list(map(int, row)) for row in tokens]
    except (TypeError, ValueError) as error:
        raise NeuronprobeError(
            f"tokens must be integer token ids, [contexts, pos] ({error})."
        ) from error
    if not rows or not all(rows):
        raise NeuronprobeError("tokens must be a non-empty list of non-empty contexts.")
    return rows


def _vocab_size(model: Any) -> int:
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def _positive_ids(model: Any, positive_ids: Sequence[int]) -> list[int]:
    """Distinct positive token ids, checked against the vocabulary."""
    try:
        ids = sorted({int(i) for i in positive_ids})
    except (TypeError, ValueError) as error:
        raise NeuronprobeError(f"positive_ids must be token ids ({error}).") from error
    vocab = _vocab_size(model)
    if not ids:
        raise NeuronprobeError("positive_ids is empty: name at least one token id.")
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise NeuronprobeError(
            f"positive_ids {bad[:10]} are outside the vocabulary (0-{vocab - 1})."
        )
    if len(ids) == vocab:
        raise NeuronprobeError("positive_ids holds the whole vocabulary: P is 1 everywhere.")
    return ids


def _check_intervention(
    intervention: Intervention, number: int, n_layers: int, width: int, n_contexts: int
) -> None:
    """Refuse an intervention that does not fit the model, the site or the contexts."""
    if not isinstance(intervention, Intervention):
        raise NeuronprobeError(
            f"interventions[{number}] is a {type(intervention).__name__}, not an Intervention."
        )
    name = f"interventions[{number}] (layer {intervention.layer})"
    if not isinstance(intervention.layer, int | np.integer) or not (
        0 <= intervention.layer < n_layers
    ):
        raise NeuronprobeError(
            f"{name}: layer {intervention.layer} is out of range: the model has {n_layers} "
            f"layers (0-{n_layers - 1})."
        )
    neurons, values = intervention.neurons, intervention.values
    k = neurons.size
    bad = neurons[(neurons < 0) | (neurons >= width)]
    if bad.size:
        raise NeuronprobeError(
            f"{name}: neuron indices {bad[:10].tolist()} are out of range: the site has {width} "
            f"neurons (0-{width - 1})."
        )
    if np.unique(neurons).size != k:
        raise NeuronprobeError(f"{name}: neurons holds repeated indices.")
    if values.shape not in ((k,), (n_contexts, k)):
        raise NeuronprobeError(
            f"{name}: values has shape {values.shape}; expected ({k},) for {k} neurons, or "
            f"({n_contexts}, {k}) for one row per context."
        )
    if not np.isfinite(values).all():
        raise NeuronprobeError(f"{name}: values holds NaN or infinite numbers.")


# --- the forward passes -----------------------------------------------------------------------


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Put the model in eval mode for a block, and back as it was."""
    training = bool(model.training)
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def _logits_to_keep(model: Any) -> dict[str, int]:
    """``logits_to_keep=1`` where the model takes it: the head runs on the last position only."""
    parameters = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}


def _cache_name(model: Any) -> str:
    """The forward argument that takes the cache: ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (earlier)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _logodds(logits: Any, ids: Sequence[int]) -> np.ndarray:
    """float64 [rows] log odds from [rows, vocab] logits, which it overwrites (the positive
    ids become -inf): :func:`logodds_positive`'s log odds with two passes over the logits
    fewer, and no copy of them (a tenth of a sweep's time)."""
    import torch

    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    index = torch.as_tensor(list(ids), dtype=torch.long, device=logits.device)
    positive = torch.logsumexp(logits[:, index], dim=-1)  # [rows]
    negative = torch.logsumexp(logits.index_fill_(-1, index, float("-inf")), dim=-1)  # [rows]
    return (positive - negative).double().cpu().numpy()


@dataclass
class _Edit:
    """Write values into neurons of ``groups`` interventions at once, at the last position.

    Rows of the site's tensor are intervention-major: row ``g * contexts + c``.
    """

    mask: Any  # [groups, 1, width] bool: which neurons each intervention sets
    values: Any  # [groups, 1 or contexts, width]: what they are set to (model dtype)
    groups: int
    contexts: int

    @classmethod
    def build(
        cls,
        interventions: Sequence[Intervention],
        first: int,
        contexts: int,
        width: int,
        dtype: Any,
        device: Any,
    ) -> _Edit:
        """The edit of ``interventions`` for contexts ``first`` to ``first + contexts - 1``."""
        import torch

        per_context = any(i.values.ndim == 2 for i in interventions)
        groups = len(interventions)
        mask = torch.zeros((groups, 1, width), dtype=torch.bool)
        values = torch.zeros((groups, contexts if per_context else 1, width), dtype=torch.float32)
        for g, intervention in enumerate(interventions):
            neurons = torch.from_numpy(intervention.neurons)
            mask[g, 0, neurons] = True
            chosen = intervention.values
            if chosen.ndim == 2:
                chosen = chosen[first : first + contexts]
            values[g, :, neurons] = torch.from_numpy(np.ascontiguousarray(chosen))
        return cls(mask.to(device), values.to(device=device, dtype=dtype), groups, contexts)

    def apply(self, site: Any) -> Any:
        """[groups * contexts, pos, width] -> the same with the last position edited."""
        import torch

        rows, pos, width = site.shape
        last = site[:, -1, :].reshape(self.groups, self.contexts, width)
        edited = torch.where(self.mask, self.values.to(site.dtype), last).reshape(rows, width)
        if pos == 1:
            return edited.unsqueeze(1)
        site = site.clone()
        site[:, -1, :] = edited
        return site


def _register_edit(point: HookPoint, edit: _Edit) -> Any:
    """Hook ``edit`` onto a site: a pre-hook that replaces the input (``mlp.post``) or a hook
    that replaces the output (``mlp.pre``, ``resid.post``; a block's tuple keeps its tail)."""
    if point.reads == "input":

        def on_input(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
            if not args:
                raise NeuronprobeError(f"{point.name} was called without a positional input.")
            return (edit.apply(args[0]), *args[1:])

        return point.module.register_forward_pre_hook(on_input)

    def on_output(_module: Any, _inputs: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (edit.apply(output[0]), *output[1:])
        return edit.apply(output)

    return point.module.register_forward_hook(on_output)


def _make_replay(hidden: Any) -> Any:
    """A module that stands in for a skipped block: whatever it is given, it returns ``hidden``
    (the hidden state [rows, 1, d_model] that enters the first recomputed block)."""
    import torch

    class _Replay(torch.nn.Module):
        def forward(self, *_args: Any, **_kwargs: Any) -> Any:
            return hidden

    return _Replay()


@dataclass
class _LastStep:
    """One batch of contexts: the cached first positions and the last position's inputs."""

    input_ids: Any  # [contexts, 1] the last token
    mask: Any  # [contexts, pos] attention mask over all positions
    positions: Any  # [contexts, 1] the last token's position id
    prefix: list[tuple[Any, Any]] | None  # per layer (keys, values) [contexts, heads, pos-1, d]
    caches: dict[int, Any] = field(default_factory=dict)  # repeats -> DynamicCache

    @classmethod
    def prepare(cls, model: Any, rows: Sequence[Sequence[int]], device: Any) -> _LastStep:
        """Left-pad ``rows`` and run their first ``pos - 1`` positions once, keeping the cache."""
        input_ids, mask, positions = _left_padded(rows, device)
        prefix = None
        if input_ids.shape[1] > 1:
            output = model(
                input_ids=input_ids[:, :-1],
                attention_mask=mask[:, :-1],
                position_ids=positions[:, :-1],
                use_cache=True,
                **_logits_to_keep(model),
            )
            cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
            if cache is None or not hasattr(cache, "layers"):
                raise NeuronprobeError(
                    f"{type(model).__name__} returned no key/value cache with layers "
                    f"({type(cache).__name__}); interventions need transformers >= 5."
                )
            windows = [getattr(layer, "sliding_window", None) for layer in cache.layers]
            window = min((w for w in windows if isinstance(w, int)), default=None)
            if window is not None and input_ids.shape[1] >= window:
                # A sliding-window layer drops its oldest position: no rewinding past it.
                raise NeuronprobeError(
                    f"contexts of {input_ids.shape[1]} tokens do not fit the model's sliding "
                    f"attention window ({window} tokens); use contexts under {window} tokens."
                )
            prefix = [(layer.keys, layer.values) for layer in cache.layers]
        return cls(input_ids[:, -1:], mask, positions[:, -1:], prefix)

    def cache(self, model: Any, repeats: int) -> Any:
        """The cache of the first positions, each context repeated ``repeats`` times
        (intervention-major rows), built once per ``repeats`` and rewound after every pass
        (see :meth:`rewind`)."""
        from transformers import DynamicCache

        assert self.prefix is not None
        if repeats not in self.caches:
            data = [
                (keys.repeat(repeats, 1, 1, 1), values.repeat(repeats, 1, 1, 1))
                for keys, values in self.prefix
            ]
            self.caches[repeats] = DynamicCache(ddp_cache_data=data, config=model.config)
        return self.caches[repeats]

    def rewind(self, cache: Any) -> None:
        """Drop the last position from every layer of ``cache`` that a pass appended it to
        (``Cache.crop`` would crop every layer, also those of skipped blocks)."""
        assert self.prefix is not None
        length = self.prefix[0][0].shape[-2]
        for layer in cache.layers:
            grown = layer.get_seq_length()
            if grown == length + 1:
                layer.crop(-1)
            elif grown != length:
                raise RuntimeError(f"cache layer holds {grown} positions, not {length} or one more")

    def run(
        self,
        model: Any,
        blocks: Any,
        *,
        repeats: int = 1,
        edits: Sequence[tuple[HookPoint, _Edit]] = (),
        start: int = 0,
        entering: list[Any] | None = None,
        record: bool = False,
    ) -> tuple[Any, list[Any] | None]:
        """Recompute the last position for ``repeats`` copies of the contexts.

        Parameters
        ----------
        edits:
            Where and what to change: (site, edit) of each changed layer.
        start:
            First block to run; the blocks before it are replaced, for this pass, by the
            hidden state that enters it (``entering[start]``, recorded with ``record``).
        record:
            Also return the hidden state [contexts, 1, d_model] that enters each block (index
            = block; None for block 0), or None if the blocks do not return a plain tensor
            (then every pass runs all blocks).

        Returns
        -------
        tuple
            Logits [repeats * contexts, vocab] at the last position, and what was recorded.
        """
        import torch

        kwargs: dict[str, Any] = {
            "input_ids": self.input_ids.repeat(repeats, 1),
            "attention_mask": self.mask.repeat(repeats, 1),
            "position_ids": self.positions.repeat(repeats, 1),
            **_logits_to_keep(model),
        }
        cache = self.cache(model, repeats) if self.prefix is not None else None
        if cache is not None:
            kwargs[_cache_name(model)] = cache
        kwargs["use_cache"] = cache is not None
        handles: list[Any] = []
        outputs: list[Any] = []
        replaced: dict[int, Any] = {}
        if record:
            handles += [
                block.register_forward_hook(lambda _m, _i, output: outputs.append(output))
                for block in blocks
            ]
        handles += [_register_edit(point, edit) for point, edit in edits]
        if start and entering is not None:
            hidden = entering[start].repeat(repeats, 1, 1)
            for index in range(start):
                replaced[index] = blocks[index]
                blocks[index] = _make_replay(hidden)
        completed = False
        try:
            logits = model(**kwargs).logits[:, -1, :]
            completed = True
        finally:
            for index, block in replaced.items():
                blocks[index] = block
            for handle in handles:
                handle.remove()
            if cache is not None and completed:
                self.rewind(cache)
            elif cache is not None:
                self.caches.pop(repeats, None)  # a failed pass may have grown some layers
        recorded = None
        if record and all(isinstance(output, torch.Tensor) for output in outputs):
            recorded = [None, *(output[:, -1:, :] for output in outputs[:-1])]
        return logits, recorded


# ----------------------------------------------------------------------------------------------
# The experiment: the strongest neurons of each layer against random ones
# ----------------------------------------------------------------------------------------------

#: Columns of ``interventions.parquet``, one row per intervention.
SWEEP_COLUMNS = (
    "layer",
    "k",
    "k_label",
    "selection",
    "draw",
    "ablation",
    "contexts",
    "delta_logodds_positive",
    "delta_logodds_negative",
    "auc_before",
    "auc_after",
    "neurons",
)


@dataclass(frozen=True)
class _Planned:
    """One row of the sweep before it runs: which neurons of which layers, and its labels."""

    layer: int  # -1: the whole model
    k_label: str
    selection: str  # "top" or "random"
    draw: int
    changes: tuple[Intervention, ...]

    @property
    def k(self) -> int:
        return sum(len(change.neurons) for change in self.changes)


def ablation_values(
    activations: np.ndarray,
    labels: np.ndarray,
    train_mask: np.ndarray,
    held_out_labels: np.ndarray,
    ablation: str,
) -> np.ndarray:
    """What each neuron of one layer is set to, for each held-out context.

    Parameters
    ----------
    activations:
        float32 [contexts, neurons], one layer's stored activations at the run's site.
    labels, train_mask:
        bool [contexts]: the class of each context and whether it is a training context.
    held_out_labels:
        bool [held-out contexts]: the class of each context the interventions run on.
    ablation:
        ``mean``: each neuron's mean over the training contexts; ``zero``; ``patch``: each
        neuron's mean over the training contexts of the other class than the context's own
        (what the neuron does on the other class, without the context's own deviation).

    Returns
    -------
    np.ndarray
        float32 [held-out contexts, neurons].
    """
    width = activations.shape[1]
    if ablation == "zero":
        return np.zeros((len(held_out_labels), width), dtype=np.float32)
    train = np.asarray(activations, dtype=np.float64)[train_mask]
    if ablation == "mean":
        means = train.mean(axis=0)
        return np.broadcast_to(means, (len(held_out_labels), width)).astype(np.float32)
    if ablation == "patch":
        positive = train[labels[train_mask]].mean(axis=0)
        negative = train[~labels[train_mask]].mean(axis=0)
        return np.where(held_out_labels[:, None], negative, positive).astype(np.float32)
    raise NeuronprobeError(f"--ablation must be one of mean, zero, patch (got {ablation!r}).")


def random_neurons(seed: int, layer: int, k: int, draw: int, width: int) -> np.ndarray:
    """Draw ``draw`` of ``k`` distinct random neurons of a layer, sorted: the same for the same
    seed, layer, size and draw (so the whole model's control is made of the layers' ones)."""
    rng = np.random.default_rng([seed, layer, k, draw])
    return np.sort(rng.choice(width, size=k, replace=False)).astype(np.int64)


def intervention_sweep(
    model: Any,
    tokens: np.ndarray,
    labels: np.ndarray,
    train_mask: np.ndarray,
    activations: Any,
    layers: Sequence[int],
    neurons: pd.DataFrame,
    *,
    positive_ids: Sequence[int],
    site: str = "mlp.pre",
    test: str = "wald",
    ablation: str = "mean",
    ablate_k: Sequence[str] = ("10", "all"),
    random_draws: int = 5,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
) -> pd.DataFrame:
    """Does the model use its significant neurons? Change them, and random ones, and see.

    For each recorded layer and each ``k`` of ``ablate_k``, the layer's ``k`` strongest
    significant neurons (the order of :func:`neuronprobe.tables.top_neurons`; ``all``: every
    significant one) are set by ``ablation`` at the last token of each held-out context, and
    the model's own ``logodds_positive`` is read at its output; the control sets ``k`` random
    neurons of the same layer the same way, ``random_draws`` seeded times. The whole model
    (``layer`` -1) changes each layer's top ``k`` at once, against each layer's random ``k``.
    A layer with no significant neuron has no row (nothing to change, nothing to compare).

    Parameters
    ----------
    model:
        The run's causal LM.
    tokens:
        int [contexts, pos], the run's contexts.
    labels, train_mask:
        bool [contexts]: the class of each context, and the statistics' training contexts
        (the interventions run on the others, the held-out ones).
    activations:
        float32 [recorded layers, contexts, neurons], stored at the run's site and the last
        token (the ablation values come from their training contexts).
    layers:
        The model layer of each row of ``activations``.
    neurons:
        The run's neuron table (``layer, neuron, significant, pvalue_adj``, raw p-values,
        ``beta``).
    positive_ids:
        The first tokens of the positive followers: ``logodds_positive``'s tokens.
    site, test, ablation, ablate_k, random_draws, seed, batch_size, progress:
        The run's site and deciding test; see :class:`neuronprobe.config.RunConfig`.

    Returns
    -------
    pandas.DataFrame
        One row per intervention, the columns of :data:`SWEEP_COLUMNS`: ``layer`` (-1 = the
        whole model), ``k`` (neurons changed), ``k_label`` (as asked: ``"10"``, ``"all"``),
        ``selection`` (``top``/``random``), ``draw`` (0 for top, 1... for random), ``ablation``,
        ``contexts`` (held-out contexts), ``delta_logodds_positive`` and
        ``delta_logodds_negative`` (mean change of ``logodds_positive`` over the held-out
        contexts of each class), ``auc_before``, ``auc_after`` (the model's held-out AUC at
        telling the classes apart by ``logodds_positive``), ``neurons`` (``"layer:neuron"``
        of every changed neuron).
    """
    from neuronprobe.behavior import roc_auc
    from neuronprobe.tables import top_neurons

    labels = np.asarray(labels, dtype=bool)
    train_mask = np.asarray(train_mask, dtype=bool)
    held_out = ~train_mask
    test_labels = labels[held_out]
    test_tokens = np.asarray(tokens)[held_out]
    width = int(activations.shape[2])
    plan: list[_Planned] = []
    whole: dict[tuple[str, int], list[Intervention]] = {}
    for index, layer in enumerate(layers):
        ranked = top_neurons(neurons[neurons["layer"] == layer], len(neurons), test=test)
        significant = ranked["neuron"].to_numpy(dtype=np.int64)
        if not len(significant):
            continue
        values = ablation_values(activations[index], labels, train_mask, test_labels, ablation)
        for label in ablate_k:
            k = len(significant) if label == "all" else min(int(label), len(significant))
            top = significant[:k]
            change = Intervention(layer, top, values[:, top])
            plan.append(_Planned(layer, label, "top", 0, (change,)))
            whole.setdefault((label, 0), []).append(change)
            for draw in range(1, random_draws + 1):
                chosen = random_neurons(seed, layer, k, draw, width)
                change = Intervention(layer, chosen, values[:, chosen])
                plan.append(_Planned(layer, label, "random", draw, (change,)))
                whole.setdefault((label, draw), []).append(change)
    if len(layers) > 1:
        for (label, draw), changes in whole.items():
            selection = "top" if draw == 0 else "random"
            plan.append(_Planned(-1, label, selection, draw, tuple(changes)))
    logger.info("%d interventions on %d held-out contexts", len(plan), len(test_tokens))
    if not plan:
        return pd.DataFrame({name: [] for name in SWEEP_COLUMNS})
    logodds = logodds_after(
        model,
        test_tokens,
        [planned.changes for planned in plan],
        positive_ids=positive_ids,
        site=site,
        batch_size=batch_size,
        progress=progress,
    )  # [1 + interventions, held-out contexts]
    before = logodds[0]
    auc_before = roc_auc(before, test_labels)
    rows = []
    for planned, after in zip(plan, logodds[1:], strict=True):
        change = after - before
        rows.append(
            {
                "layer": planned.layer,
                "k": planned.k,
                "k_label": planned.k_label,
                "selection": planned.selection,
                "draw": planned.draw,
                "ablation": ablation,
                "contexts": len(test_tokens),
                "delta_logodds_positive": float(change[test_labels].mean()),
                "delta_logodds_negative": float(change[~test_labels].mean()),
                "auc_before": auc_before,
                "auc_after": roc_auc(after, test_labels),
                "neurons": " ".join(
                    f"{c.layer}:{n}" for c in planned.changes for n in c.neurons.tolist()
                ),
            }
        )
    return pd.DataFrame(rows, columns=list(SWEEP_COLUMNS))
