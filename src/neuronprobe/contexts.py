"""Stage 2, contexts: find the two kinds of context in the text, balanced and seeded.

Entry point: :func:`collect_contexts` (documents + tokenizer + :class:`Contrast` ->
:class:`Contexts`). The rule is the notebook's, token for token: for every position ``ti``
(``context_length <= ti < len(tokens) - 1``) whose token is the target, the context is
``tokens[ti - context_length : ti + 1]``; it is *positive* ("can't") when the following
tokens are one of the positive followers, *negative* ("can") when the next token starts with a
space and is not the first token of an excluded word. Scanning stops, between documents, once
both classes have ``min_per_class`` contexts; then both classes are sampled down to the size of
the smaller one with the run's seed (the notebook's balancing step, without its ``randperm`` bug).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from neuronprobe.errors import NeuronprobeError, check_known_keys
from neuronprobe.rundir import atomic_path
from neuronprobe.text import Document

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Contrast:
    """Two kinds of context that end in the same target token.

    Attributes
    ----------
    target:
        The word whose last-token activations are compared; must be one token (`` can``).
    positive_followers:
        Text that, following the target, makes the context positive (``'t``). Each is
        tokenized on its own and matched as a token sequence.
    excluded_followers:
        Words whose first token, following the target, excludes the context from the negative
        class (after "can", these make it a noun: `` of``, `` with``...).
    context_length:
        Tokens kept before the target; contexts are ``context_length + 1`` tokens long.
    positive_name, negative_name:
        How tables and figures name the classes.
    """

    target: str = " can"
    positive_followers: tuple[str, ...] = ("'t",)
    excluded_followers: tuple[str, ...] = (" of", " with", " from", " in", " on", " for", " not")
    context_length: int = 10
    positive_name: str = "can't"
    negative_name: str = "can"

    def __post_init__(self) -> None:
        for name in ("target", "positive_name", "negative_name"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise NeuronprobeError(f"contrast {name} must be a non-empty string.")
        for name in ("positive_followers", "excluded_followers"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                raise NeuronprobeError(
                    f"contrast {name} must be a list of non-empty strings (got {value!r})."
                )
        if not isinstance(self.context_length, int) or isinstance(self.context_length, bool):
            raise NeuronprobeError(
                f"contrast context_length must be an integer (got {self.context_length!r})."
            )
        if self.context_length < 0:
            raise NeuronprobeError(
                f"contrast context_length must be >= 0 (got {self.context_length})."
            )
        if not self.positive_followers:
            raise NeuronprobeError('contrast needs at least one positive follower (such as "\'t").')
        # JSON round trips give lists; keep the dataclass hashable and comparable.
        object.__setattr__(self, "positive_followers", tuple(self.positive_followers))
        object.__setattr__(self, "excluded_followers", tuple(self.excluded_followers))

    def describe(self) -> str:
        """One line in words: what is told apart from what."""
        followers = " or ".join(repr(f) for f in self.positive_followers)
        return (
            f"{self.target!r} followed by {followers} ({self.positive_name!r}) versus {self.target!r}"
            f" followed by a space-initial token other than "
            f"{', '.join(repr(w) for w in self.excluded_followers)} ({self.negative_name!r}); "
            f"{self.context_length} tokens of context before the target"
        )

    @classmethod
    def from_toml(cls, path: Path | str) -> Contrast:
        """Read a contrast from a TOML file with the dataclass's keys (see ``examples/contrasts``).

        Raises
        ------
        NeuronprobeError
            If the file is missing, is not TOML, or has unknown or ill-typed keys.
        """
        import tomllib

        path = Path(path)
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as error:
            raise NeuronprobeError(f"--contrast {path}: no such file; give a TOML file.") from error
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise NeuronprobeError(f"--contrast {path} is not valid TOML: {error}.") from error
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Contrast:
        check_known_keys(values, (f.name for f in dataclasses.fields(cls)), "contrast")
        return cls(**values)


@dataclass(frozen=True)
class ContrastTokens:
    """A :class:`Contrast` resolved against one tokenizer."""

    target_id: int
    positive_sequences: tuple[tuple[int, ...], ...]
    excluded_ids: frozenset[int]


def resolve_contrast(contrast: Contrast, tokenizer: Any) -> ContrastTokens:
    """Token ids of the contrast's words under ``tokenizer`` (no special tokens added).

    Raises
    ------
    NeuronprobeError
        If the target is not exactly one token (the message shows how it splits), or a
        follower is empty.
    """
    target_ids = _encode(tokenizer, contrast.target)
    if len(target_ids) != 1:
        pieces = [tokenizer.decode([token]) for token in target_ids]
        raise NeuronprobeError(
            f"the contrast target {contrast.target!r} is {len(target_ids)} tokens for this "
            f"tokenizer ({target_ids} = {pieces}); choose a target that is a single token."
        )
    positive = []
    for follower in contrast.positive_followers:
        ids = _encode(tokenizer, follower)
        if not ids:
            raise NeuronprobeError(f"the positive follower {follower!r} encodes to no tokens.")
        positive.append(tuple(ids))
    excluded = {ids[0] for word in contrast.excluded_followers if (ids := _encode(tokenizer, word))}
    return ContrastTokens(target_ids[0], tuple(positive), frozenset(excluded))


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


@dataclass
class Contexts:
    """Balanced contexts of the two classes, negative class first (as the notebook's labels).

    Attributes
    ----------
    tokens:
        int64 [contexts, context_length + 1]; the last column is the target.
    labels:
        bool [contexts]; True = positive class ("can't").
    document_ids:
        [contexts] id of the document each context comes from.
    positions:
        int64 [contexts] index of the target token in its document's tokens.
    next_tokens:
        int64 [contexts] the token that follows the target (not part of the context).
    counts:
        Documents scanned, contexts found per class, contexts kept per class.
    """

    tokens: np.ndarray
    labels: np.ndarray
    document_ids: list[str]
    positions: np.ndarray
    next_tokens: np.ndarray
    counts: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class _Found:
    tokens: list[list[int]] = field(default_factory=list)
    document_ids: list[str] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    next_tokens: list[int] = field(default_factory=list)

    def add(self, tokens: list[int], document_id: str, position: int, next_token: int) -> None:
        self.tokens.append(tokens)
        self.document_ids.append(document_id)
        self.positions.append(position)
        self.next_tokens.append(next_token)

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class Scan:
    """Every context found by :func:`scan_contexts`, per class, in corpus order (not balanced)."""

    positive: _Found
    negative: _Found
    documents_scanned: int


def scan_contexts(
    documents: Iterable[Document],
    tokenizer: Any,
    contrast: Contrast | None = None,
    *,
    min_per_class: int = 500,
    batch_documents: int = 256,
    progress: bool = True,
) -> Scan:
    """Scan documents in order until both classes have ``min_per_class`` contexts.

    The stopping rule is checked before each document, as the notebook's loop does, so the
    document that crosses the line is scanned to its end.
    """
    from tqdm.auto import tqdm

    contrast = contrast or Contrast()
    ids = resolve_contrast(contrast, tokenizer)
    width = contrast.context_length
    # Documents without the target's text cannot contain the target token; skip tokenizing them.
    needle = contrast.target.strip() or contrast.target
    space_initial: dict[int, bool] = {}

    scan = Scan(_Found(), _Found(), 0)
    bar = tqdm(desc="scanning documents", unit=" docs", disable=not progress, mininterval=0.5)
    try:
        for document, doc_tokens in _tokenized(documents, tokenizer, needle, batch_documents):
            if len(scan.positive) >= min_per_class and len(scan.negative) >= min_per_class:
                break
            scan.documents_scanned += 1
            bar.update(1)
            if doc_tokens is None:
                continue
            tokens = np.asarray(doc_tokens, dtype=np.int64)
            last = len(tokens) - 1  # the notebook's range(context_pre, len(tokens) - 1)
            hits = np.flatnonzero(tokens[width:last] == ids.target_id) + width
            for ti in hits.tolist():
                following = tokens[ti + 1 :]
                next_token = int(following[0])
                context = tokens[ti - width : ti + 1].tolist()
                if any(_starts_with(following, seq) for seq in ids.positive_sequences):
                    scan.positive.add(context, document.id, ti, next_token)
                elif next_token not in ids.excluded_ids and _space_initial(
                    tokenizer, next_token, space_initial
                ):
                    scan.negative.add(context, document.id, ti, next_token)
            bar.set_postfix(
                {
                    contrast.positive_name: len(scan.positive),
                    contrast.negative_name: len(scan.negative),
                },
                refresh=False,
            )
    finally:
        bar.close()
    return scan


def balance_contexts(scan: Scan, *, seed: int = 0) -> Contexts:
    """Sample both classes down to the smaller one's size with ``seed``.

    Returns the negatives first, then the positives, each kept in corpus order.
    """
    per_class = min(len(scan.positive), len(scan.negative))
    rng = np.random.default_rng(seed)
    keep_negative = np.sort(rng.choice(len(scan.negative), per_class, replace=False))
    keep_positive = np.sort(rng.choice(len(scan.positive), per_class, replace=False))

    def pick(found: _Found, keep: np.ndarray, name: str) -> list[Any]:
        column = getattr(found, name)
        return [column[i] for i in keep.tolist()]

    columns = {
        name: pick(scan.negative, keep_negative, name) + pick(scan.positive, keep_positive, name)
        for name in ("tokens", "document_ids", "positions", "next_tokens")
    }
    width = len(columns["tokens"][0]) if per_class else 0
    return Contexts(
        tokens=np.asarray(columns["tokens"], dtype=np.int64).reshape(2 * per_class, width),
        labels=np.repeat([False, True], per_class),
        document_ids=columns["document_ids"],
        positions=np.asarray(columns["positions"], dtype=np.int64),
        next_tokens=np.asarray(columns["next_tokens"], dtype=np.int64),
        counts={
            "documents_scanned": scan.documents_scanned,
            "found_positive": len(scan.positive),
            "found_negative": len(scan.negative),
            "kept_per_class": per_class,
        },
    )


def collect_contexts(
    documents: Iterable[Document],
    tokenizer: Any,
    contrast: Contrast | None = None,
    *,
    min_per_class: int = 500,
    seed: int = 0,
    progress: bool = True,
) -> Contexts:
    """Find both classes of context in the documents and balance them: the stage's entry point.

    Parameters
    ----------
    documents:
        The corpus, in order (see :mod:`neuronprobe.text`).
    tokenizer:
        A Hugging Face tokenizer; documents are encoded without special tokens, as the
        notebook's ``tokenizer.encode`` does for GPT-2.
    contrast:
        What to collect; the notebook's "can" / "can't" by default.
    min_per_class:
        Stop once both classes have at least this many contexts.
    seed:
        Seeds the sampling that balances the classes.

    Returns
    -------
    Contexts
        ``2 * n`` contexts, ``n`` = the smaller class's count: negatives first, then positives,
        each in corpus order.

    Raises
    ------
    NeuronprobeError
        If the corpus ends before both classes reach ``min_per_class``.
    """
    contrast = contrast or Contrast()
    scan = scan_contexts(
        documents, tokenizer, contrast, min_per_class=min_per_class, progress=progress
    )
    if len(scan.positive) < min_per_class or len(scan.negative) < min_per_class:
        raise NeuronprobeError(
            f"the corpus ended after {scan.documents_scanned} documents with {len(scan.positive)} "
            f"{contrast.positive_name!r} and {len(scan.negative)} {contrast.negative_name!r} "
            f"contexts, fewer than --min-per-class {min_per_class}; lower --min-per-class or use "
            "a larger corpus."
        )
    contexts = balance_contexts(scan, seed=seed)
    logger.info(
        "scanned %d documents: %d %r and %d %r contexts; kept %d per class",
        scan.documents_scanned,
        len(scan.positive),
        contrast.positive_name,
        len(scan.negative),
        contrast.negative_name,
        contexts.counts["kept_per_class"],
    )
    return contexts


def _starts_with(tokens: np.ndarray, sequence: tuple[int, ...]) -> bool:
    return len(tokens) >= len(sequence) and tuple(tokens[: len(sequence)].tolist()) == sequence


def _space_initial(tokenizer: Any, token: int, cache: dict[int, bool]) -> bool:
    # The notebook's test: tokenizer.decode(next_token).startswith(' ').
    if token not in cache:
        cache[token] = tokenizer.decode([token]).startswith(" ")
    return cache[token]


def _tokenized(
    documents: Iterable[Document], tokenizer: Any, needle: str, batch_size: int
) -> Iterator[tuple[Document, list[int] | None]]:
    """Yield each document with its tokens (None when it cannot hold the target), in order.

    Documents are tokenized in batches, which the fast tokenizers parallelise.
    """
    batch: list[Document] = []

    def flush() -> Iterator[tuple[Document, list[int] | None]]:
        wanted = [doc.text for doc in batch if needle in doc.text]
        encoded = iter(tokenizer(wanted, add_special_tokens=False)["input_ids"]) if wanted else None
        for doc in batch:
            yield doc, (next(encoded) if encoded is not None and needle in doc.text else None)
        batch.clear()

    for document in documents:
        batch.append(document)
        if len(batch) >= batch_size:
            yield from flush()
    if batch:
        yield from flush()


def save_contexts(contexts: Contexts, path: Path, tokenizer: Any, contrast: Contrast) -> None:
    """Write ``contexts.parquet``: one row per context, with its text for people to read."""
    import pandas as pd

    table = pd.DataFrame(
        {
            "context": np.arange(len(contexts), dtype=np.int64),
            "label": contexts.labels,
            "class": np.where(contexts.labels, contrast.positive_name, contrast.negative_name),
            "document_id": contexts.document_ids,
            "position": contexts.positions,
            "tokens": list(contexts.tokens),
            "next_token": contexts.next_tokens,
            "text": tokenizer.batch_decode(contexts.tokens.tolist()),
            "next_text": tokenizer.batch_decode(contexts.next_tokens[:, None].tolist()),
        }
    )
    with atomic_path(path) as temporary:
        table.to_parquet(temporary, index=False)


def load_contexts(path: Path) -> Contexts:
    """Read a ``contexts.parquet`` written by :func:`save_contexts` (counts are not stored there)."""
    import pandas as pd

    table = pd.read_parquet(path)
    return Contexts(
        tokens=np.stack([np.asarray(t, dtype=np.int64) for t in table["tokens"]]),
        labels=table["label"].to_numpy(dtype=bool),
        document_ids=table["document_id"].astype(str).tolist(),
        positions=table["position"].to_numpy(dtype=np.int64),
        next_tokens=table["next_token"].to_numpy(dtype=np.int64),
    )
