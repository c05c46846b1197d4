"""Stage 2, contexts: find the two kinds of context in the text, balanced and seeded.

Entry point: :func:`collect_contexts` (documents + tokenizer + :class:`Contrast` ->
:class:`Contexts`). The rule is the notebook's, token for token: for every position ``ti``
(``context_length <= ti < len(tokens) - 1``) whose token is the target, the context is
``tokens[ti - context_length : ti + 1]``; it is *positive* ("can't") when the following
tokens are one of the positive followers, *negative* ("can") when the next token starts with a
space and is not the first token of an excluded word (or, when the contrast names negative
followers, such as `` am`` for "I'm" versus "I am", when the following tokens are one of them).
Scanning stops, between documents, once both classes have ``min_per_class`` contexts; then both
classes are sampled down to the size of the smaller one with the run's seed (the notebook's
balancing step, without its ``randperm`` bug). Two options the notebook lacks: exact duplicate
contexts are dropped (on by default), and curly apostrophes can be read as ``'`` (off by
default). The tokenizing is done by :mod:`neuronprobe.scanner`, on windows around the target
where that provably gives the whole-document tokens. When the corpus ends too early, the error
says why from the scan's counts (targets with too little text before them, a target written
without its space).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

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
    negative_followers:
        Text that, following the target, makes the context negative (`` am`` after `` I``),
        matched as the positive followers are (the positive class is checked first). Empty
        (the default): the negative class is every space-initial next token that is not the
        first token of an excluded follower.
    excluded_followers:
        Words whose first token, following the target, excludes the context from the negative
        class (after "can", these make it a noun: `` of``, `` with``...). Only with the default
        negative rule (no ``negative_followers``).
    context_length:
        Tokens kept before the target (at least 1); contexts are ``context_length + 1`` tokens
        long.
    positive_name, negative_name:
        How tables and figures name the classes.
    """

    target: str = " can"
    positive_followers: tuple[str, ...] = ("'t",)
    negative_followers: tuple[str, ...] = ()
    excluded_followers: tuple[str, ...] = (" of", " with", " from", " in", " on", " for", " not")
    context_length: int = 10
    positive_name: str = "can't"
    negative_name: str = "can"

    def __post_init__(self) -> None:
        for name in ("target", "positive_name", "negative_name"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise NeuronprobeError(f"contrast {name} must be a non-empty string.")
        for name in ("positive_followers", "negative_followers", "excluded_followers"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                raise NeuronprobeError(
                    f"contrast {name} must be a list of non-empty strings (got {value!r})."
                )
        if not isinstance(self.context_length, int) or isinstance(self.context_length, bool):
            raise NeuronprobeError(
                f"contrast context_length must be an integer (got {self.context_length!r})."
            )
        if self.context_length < 1:
            raise NeuronprobeError(
                f"contrast context_length (--context-length) must be at least 1 (got "
                f"{self.context_length}); give the number of tokens kept before the target "
                "(the notebook uses 10)."
            )
        if not self.positive_followers:
            raise NeuronprobeError('contrast needs at least one positive follower (such as "\'t").')
        if self.negative_followers and self.excluded_followers:
            raise NeuronprobeError(
                f"contrast gives both negative_followers {list(self.negative_followers)} and "
                f"excluded_followers {list(self.excluded_followers)}: exclusions belong to the "
                "default negative rule (any space-initial word); with negative followers, set "
                "excluded_followers to [] (on the command line: give --negative without --exclude)."
            )
        both = [f for f in self.positive_followers if f in self.negative_followers]
        if both:
            raise NeuronprobeError(
                f"contrast follower {both[0]!r} is both positive and negative; remove it from "
                "positive_followers (--positive) or negative_followers (--negative)."
            )
        # JSON round trips give lists; keep the dataclass hashable and comparable.
        object.__setattr__(self, "positive_followers", tuple(self.positive_followers))
        object.__setattr__(self, "negative_followers", tuple(self.negative_followers))
        object.__setattr__(self, "excluded_followers", tuple(self.excluded_followers))

    def describe(self) -> str:
        """One line in words: what is told apart from what."""
        followers = " or ".join(repr(f) for f in self.positive_followers)
        if self.negative_followers:
            negative = " or ".join(repr(f) for f in self.negative_followers)
        elif self.excluded_followers:
            excluded = ", ".join(repr(w) for w in self.excluded_followers)
            negative = f"a space-initial token other than {excluded}"
        else:
            negative = "any space-initial token"
        return (
            f"{self.target!r} followed by {followers} ({self.positive_name!r}) versus "
            f"{self.target!r} followed by {negative} ({self.negative_name!r}); "
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
        """A contrast from a TOML table or run.json's ``contrast`` (unknown keys are refused).

        Negative followers replace the default negative rule: given without
        ``excluded_followers``, the default exclusions do not apply.
        """
        check_known_keys(values, (f.name for f in dataclasses.fields(cls)), "contrast")
        if values.get("negative_followers") and "excluded_followers" not in values:
            values = {**values, "excluded_followers": ()}
        return cls(**values)


@dataclass(frozen=True)
class ContrastTokens:
    """A :class:`Contrast` resolved against one tokenizer."""

    target_id: int
    positive_sequences: tuple[tuple[int, ...], ...]
    excluded_ids: frozenset[int]
    negative_sequences: tuple[tuple[int, ...], ...] = ()


def resolve_contrast(contrast: Contrast, tokenizer: Any) -> ContrastTokens:
    """Token ids of the contrast's words under ``tokenizer`` (no special tokens added).

    Raises
    ------
    NeuronprobeError
        If the target is not exactly one token (the message shows how it splits), a follower
        encodes to no tokens, or a positive and a negative follower are the same tokens.
    """
    target_ids = _encode(tokenizer, contrast.target)
    if len(target_ids) != 1:
        pieces = [tokenizer.decode([token]) for token in target_ids]
        raise NeuronprobeError(
            f"the contrast target {contrast.target!r} is {len(target_ids)} tokens for this "
            f"tokenizer ({target_ids} = {pieces}); choose a target that is a single token."
        )
    positive = _sequences(tokenizer, contrast.positive_followers, "positive")
    negative = _sequences(tokenizer, contrast.negative_followers, "negative")
    for follower, sequence in zip(contrast.negative_followers, negative, strict=True):
        if sequence in positive:
            same = contrast.positive_followers[positive.index(sequence)]
            raise NeuronprobeError(
                f"the negative follower {follower!r} is the same tokens {list(sequence)} as the "
                f"positive follower {same!r}; remove it from --negative or --positive."
            )
    excluded = {ids[0] for word in contrast.excluded_followers if (ids := _encode(tokenizer, word))}
    return ContrastTokens(target_ids[0], positive, frozenset(excluded), negative)


def _sequences(tokenizer: Any, followers: Sequence[str], kind: str) -> tuple[tuple[int, ...], ...]:
    """Each follower's token ids (refusing one that encodes to nothing)."""
    sequences = []
    for follower in followers:
        ids = _encode(tokenizer, follower)
        if not ids:
            raise NeuronprobeError(f"the {kind} follower {follower!r} encodes to no tokens.")
        sequences.append(tuple(ids))
    return tuple(sequences)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


#: Apostrophes that a tokenizer splits differently from "'" (the notebook's "FYI" cells):
#: right and left single quotation marks, modifier letter apostrophe, prime, Armenian
#: apostrophe, fullwidth apostrophe. Each is one character, so offsets do not move.
APOSTROPHES = "\u2019\u2018\u02bc\u2032\u055a\uff07"
_TO_ASCII_APOSTROPHE = str.maketrans(dict.fromkeys(APOSTROPHES, "'"))


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
    sources:
        [contexts] the part of the corpus that document comes from (``imdb``, a file, ...).
    offsets:
        int64 [contexts] character offset of the target's text in its document (-1 where a
        slow tokenizer cannot say).
    next_tokens:
        int64 [contexts] the token that follows the target (not part of the context).
    counts:
        Documents scanned, contexts found and duplicates dropped per class, the target's text
        and tokens in the scanned documents and the target tokens skipped for too little text
        before them, contexts kept per class, and how many positive contexts each spelling of
        the follower gave.
    """

    tokens: np.ndarray
    labels: np.ndarray
    document_ids: list[str]
    sources: list[str]
    offsets: np.ndarray
    next_tokens: np.ndarray
    counts: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


_COLUMNS = ("tokens", "document_ids", "sources", "offsets", "next_tokens")


@dataclass
class _Found:
    """The contexts of one class, in corpus order; exact duplicates are counted, not kept."""

    drop_duplicates: bool = True
    tokens: list[list[int]] = field(default_factory=list)
    document_ids: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    next_tokens: list[int] = field(default_factory=list)
    duplicates: int = 0
    _seen: set[tuple[int, ...]] = field(default_factory=set, repr=False)

    def add(
        self, tokens: list[int], document_id: str, source: str, offset: int, next_token: int
    ) -> bool:
        """Keep a context unless it repeats one already kept; say whether it was kept."""
        if self.drop_duplicates:
            key = tuple(tokens)
            if key in self._seen:
                self.duplicates += 1
                return False
            self._seen.add(key)
        self.tokens.append(tokens)
        self.document_ids.append(document_id)
        self.sources.append(source)
        self.offsets.append(offset)
        self.next_tokens.append(next_token)
        return True

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class Scan:
    """Every context found by :func:`scan_contexts`, per class, in corpus order (not balanced).

    ``spellings`` counts the kept positive contexts by the follower's text as written in the
    document (``'t`` or ``’t`` ...): with apostrophe normalisation, each spelling's share.
    ``target_tokens`` counts the target tokens of the scanned documents (whole-document tokens),
    ``targets_too_early`` those skipped because fewer than ``context_length`` tokens precede
    them in their document, and ``target_text_occurrences`` the occurrences of the target's
    text (inside words too): what the error says when the corpus ends too early.

    A scan is built document by document, in corpus order, with :meth:`add_document`; the
    stopping rule is :meth:`satisfied`. The single-process scan and the Ray engine
    (:mod:`neuronprobe.distributed`, which finds the candidates of many documents in parallel
    and merges them here in corpus order) share these two steps, so they give the same scan.
    """

    positive: _Found
    negative: _Found
    documents_scanned: int
    spellings: Counter[str] = field(default_factory=Counter)
    target_tokens: int = 0
    targets_too_early: int = 0
    target_text_occurrences: int = 0

    @classmethod
    def empty(cls, drop_duplicates: bool = True) -> Scan:
        """A scan of no documents yet."""
        return cls(_Found(drop_duplicates), _Found(drop_duplicates), 0)

    def satisfied(self, min_per_class: int) -> bool:
        """Whether both classes have ``min_per_class`` contexts: the scan stops before the next
        document (checked before each document, as the notebook's loop does)."""
        return len(self.positive) >= min_per_class and len(self.negative) >= min_per_class

    def add_document(
        self, document_id: str, source: str, finds: DocumentFinds | None = None
    ) -> None:
        """Count one more scanned document and keep its candidates (duplicates dropped)."""
        self.documents_scanned += 1
        if finds is None:
            return
        self.target_tokens += finds.target_tokens
        self.targets_too_early += finds.targets_too_early
        self.target_text_occurrences += finds.target_text_occurrences
        for candidate in finds.candidates:
            found = self.positive if candidate.positive else self.negative
            kept = found.add(
                list(candidate.tokens),
                document_id,
                source,
                candidate.offset,
                candidate.next_token,
            )
            if kept and candidate.positive:
                self.spellings[candidate.spelling] += 1


class Candidate(NamedTuple):
    """One context of one class found in a document, before duplicates are dropped.

    Attributes
    ----------
    positive:
        True for the positive class ("can't").
    tokens:
        ``context_length + 1`` token ids; the last is the target.
    offset:
        Character offset of the target's text in the document (-1 if unknown).
    next_token:
        The token after the target.
    spelling:
        For positive contexts, the follower as the document writes it (``'t``, ``’t``); else "".
    """

    positive: bool
    tokens: tuple[int, ...]
    offset: int
    next_token: int
    spelling: str


class DocumentFinds(NamedTuple):
    """What :meth:`ContextFinder.find` finds in one document, for :meth:`Scan.add_document`.

    Attributes
    ----------
    candidates:
        The document's contexts of both classes, in order.
    target_tokens:
        Target tokens in the document's whole-document tokens.
    targets_too_early:
        Of these, the ones skipped because fewer than ``context_length`` tokens precede them.
    target_text_occurrences:
        Occurrences of the target's text (``str.count``; inside words too).
    """

    candidates: Sequence[Candidate] = ()
    target_tokens: int = 0
    targets_too_early: int = 0
    target_text_occurrences: int = 0

    @property
    def found_anything(self) -> bool:
        """Whether the document adds anything to a scan but its count."""
        return bool(self.candidates or self.target_tokens or self.target_text_occurrences)


class ContextFinder:
    """The per-document half of the scan: the candidates of each document, found in batches.

    Independent of every other document, so documents can be handled anywhere (another
    process, another machine) and merged in corpus order with :meth:`Scan.add_document`.
    Picklable (it holds the tokenizer, a contrast and small caches).

    Parameters
    ----------
    tokenizer:
        A Hugging Face tokenizer (see :func:`collect_contexts`).
    contrast:
        What to find; the notebook's "can" / "can't" by default.
    normalize_apostrophes:
        See :func:`scan_contexts`.
    """

    def __init__(
        self, tokenizer: Any, contrast: Contrast | None = None, normalize_apostrophes: bool = False
    ) -> None:
        self.tokenizer = tokenizer
        self.contrast = contrast or Contrast()
        self.normalize_apostrophes = normalize_apostrophes
        self.ids = resolve_contrast(self.contrast, tokenizer)
        sequences = self.ids.positive_sequences + self.ids.negative_sequences
        self.after = max(len(sequence) for sequence in sequences)
        self.follower_texts = {
            seq: tokenizer.decode(list(seq)) for seq in self.ids.positive_sequences
        }
        self._space_initial: dict[int, bool] = {}

    def _text_of(self, document: Document) -> str:
        if self.normalize_apostrophes:
            return document.text.translate(_TO_ASCII_APOSTROPHE)
        return document.text

    def find(self, documents: Sequence[Document]) -> list[DocumentFinds]:
        """The candidates and counts of each document, in document order (one per document)."""
        from neuronprobe.scanner import find_targets

        if not documents:
            return []
        contrast, ids = self.contrast, self.ids
        texts = [self._text_of(document) for document in documents]
        # Exactly the whole-document tokens' hits, from windows where that is provably the same
        # (see neuronprobe.scanner). Token indices are not needed (the character offset locates
        # a context), which saves most of the work.
        all_targets = find_targets(
            texts,
            self.tokenizer,
            ids.target_id,
            contrast.target,
            contrast.context_length,
            self.after,
            with_index=False,
        )
        found: list[DocumentFinds] = []
        for document, text, targets in zip(documents, texts, all_targets, strict=True):
            candidates: list[Candidate] = []
            for hit in targets.hits:
                following = hit.following
                next_token = following[0]
                matched = _match(following, ids.positive_sequences)
                if matched is not None:
                    spelling = _spelling(
                        document.text, hit.offset, contrast, self.follower_texts[matched]
                    )
                    candidates.append(
                        Candidate(True, tuple(hit.context), hit.offset, next_token, spelling)
                    )
                elif self._negative(following):
                    candidates.append(
                        Candidate(False, tuple(hit.context), hit.offset, next_token, "")
                    )
            found.append(
                DocumentFinds(
                    candidates, targets.tokens, targets.too_early, text.count(contrast.target)
                )
            )
        return found

    def _negative(self, following: list[int]) -> bool:
        """Whether the tokens after the target (not a positive follower) make it negative."""
        ids = self.ids
        if ids.negative_sequences:
            return _match(following, ids.negative_sequences) is not None
        next_token = following[0]
        return next_token not in ids.excluded_ids and _space_initial(
            self.tokenizer, next_token, self._space_initial
        )

    def iterate(
        self, documents: Iterable[Document], batch_documents: int = 256
    ) -> Iterator[tuple[Document, DocumentFinds]]:
        """``(document, what it holds)`` for each document in order, found in batches."""
        batch: list[Document] = []
        for document in documents:
            batch.append(document)
            if len(batch) >= batch_documents:
                yield from zip(batch, self.find(batch), strict=True)
                batch = []
        if batch:
            yield from zip(batch, self.find(batch), strict=True)


def scan_contexts(
    documents: Iterable[Document],
    tokenizer: Any,
    contrast: Contrast | None = None,
    *,
    min_per_class: int = 500,
    drop_duplicates: bool = True,
    normalize_apostrophes: bool = False,
    batch_documents: int = 256,
    progress: bool = True,
) -> Scan:
    """Scan documents in order until both classes have ``min_per_class`` contexts.

    The stopping rule is checked before each document, as the notebook's loop does, so the
    document that crosses the line is scanned to its end. Duplicates do not count toward
    ``min_per_class`` when they are dropped.

    Parameters
    ----------
    drop_duplicates:
        Keep only the first of identical contexts (same tokens) within a class; the corpora
        repeat documents (IMDB holds duplicate reviews). The notebook keeps them.
    normalize_apostrophes:
        Read every apostrophe in :data:`APOSTROPHES` as ``'`` before tokenizing, so that
        ``can’t`` counts as ``can't``. Off by default, as the notebook.
    """
    from tqdm.auto import tqdm

    contrast = contrast or Contrast()
    finder = ContextFinder(tokenizer, contrast, normalize_apostrophes)
    scan = Scan.empty(drop_duplicates)
    bar = tqdm(desc="scanning documents", unit=" docs", disable=not progress, mininterval=0.5)
    try:
        for document, finds in finder.iterate(documents, batch_documents):
            if scan.satisfied(min_per_class):
                break
            scan.add_document(document.id, document.source, finds)
            bar.update(1)
            if finds.candidates:
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


def _match(following: list[int], sequences: tuple[tuple[int, ...], ...]) -> tuple[int, ...] | None:
    """The first of ``sequences`` that the tokens ``following`` the target begin with."""
    return next((seq for seq in sequences if tuple(following[: len(seq)]) == seq), None)


def _spelling(text: str, offset: int, contrast: Contrast, follower: str) -> str:
    """The follower as the document writes it (before any normalisation)."""
    if offset < 0:
        return follower
    start = offset + len(contrast.target)
    return text[start : start + len(follower)]


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
        for name in _COLUMNS
    }
    width = len(columns["tokens"][0]) if per_class else 0
    return Contexts(
        tokens=np.asarray(columns["tokens"], dtype=np.int64).reshape(2 * per_class, width),
        labels=np.repeat([False, True], per_class),
        document_ids=columns["document_ids"],
        sources=columns["sources"],
        offsets=np.asarray(columns["offsets"], dtype=np.int64),
        next_tokens=np.asarray(columns["next_tokens"], dtype=np.int64),
        counts={
            "documents_scanned": scan.documents_scanned,
            "found_positive": len(scan.positive),
            "found_negative": len(scan.negative),
            "duplicates_dropped_positive": scan.positive.duplicates,
            "duplicates_dropped_negative": scan.negative.duplicates,
            "target_text_occurrences": scan.target_text_occurrences,
            "target_tokens": scan.target_tokens,
            "targets_too_early": scan.targets_too_early,
            "kept_per_class": per_class,
            "positive_spellings": dict(scan.spellings.most_common()),
        },
    )


def collect_contexts(
    documents: Iterable[Document],
    tokenizer: Any,
    contrast: Contrast | None = None,
    *,
    min_per_class: int = 500,
    seed: int = 0,
    drop_duplicates: bool = True,
    normalize_apostrophes: bool = False,
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
    drop_duplicates, normalize_apostrophes:
        See :func:`scan_contexts`.

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
        documents,
        tokenizer,
        contrast,
        min_per_class=min_per_class,
        drop_duplicates=drop_duplicates,
        normalize_apostrophes=normalize_apostrophes,
        progress=progress,
    )
    return finish_scan(scan, contrast, min_per_class=min_per_class, seed=seed)


def finish_scan(scan: Scan, contrast: Contrast, *, min_per_class: int, seed: int) -> Contexts:
    """Check that the scan reached ``min_per_class`` and balance it with ``seed``.

    The last step of :func:`collect_contexts`, shared with the Ray engine.

    Raises
    ------
    NeuronprobeError
        If the corpus ended before both classes reached ``min_per_class``; the message says
        what the scan found and, where its counts show one, the likely cause
        (:func:`too_few_message`).
    """
    if not scan.satisfied(min_per_class):
        raise NeuronprobeError(too_few_message(scan, contrast, min_per_class))
    contexts = balance_contexts(scan, seed=seed)
    logger.info(
        "scanned %d documents: %d %r and %d %r contexts (%d and %d duplicates dropped); "
        "kept %d per class",
        scan.documents_scanned,
        len(scan.positive),
        contrast.positive_name,
        len(scan.negative),
        contrast.negative_name,
        scan.positive.duplicates,
        scan.negative.duplicates,
        contexts.counts["kept_per_class"],
    )
    return contexts


def too_few_message(scan: Scan, contrast: Contrast, min_per_class: int) -> str:
    """The one-line error for a corpus that ended before both classes had ``min_per_class``.

    It gives the scan's counts (documents, contexts and duplicates per class, target tokens)
    and, where they point to one, the cause: most target tokens had fewer than
    ``context_length`` tokens before them (short records), or a target without its leading
    space is mostly text inside words (``can`` in ``scandal``; `` can`` is another token).
    """
    target, length = contrast.target, contrast.context_length
    tokens, early = scan.target_tokens, scan.targets_too_early
    parts = [
        f"the corpus ended after {scan.documents_scanned:,} documents with "
        f"{len(scan.positive):,} {contrast.positive_name!r} and {len(scan.negative):,} "
        f"{contrast.negative_name!r} contexts ({scan.positive.duplicates:,} and "
        f"{scan.negative.duplicates:,} duplicates dropped), fewer than --min-per-class "
        f"{min_per_class}",
        f"the target token {target!r} occurs {tokens:,} times in them"
        + (
            f" and {early:,} of these had fewer than --context-length {length} tokens before "
            "them in their document (skipped)"
            if early
            else ""
        ),
    ]
    text = scan.target_text_occurrences
    if not target[:1].isspace() and 2 * tokens < text:
        spaced = " " + target
        parts.append(
            f"the text {target!r} occurs {text:,} times in the scanned documents but the token "
            f"{target!r} only {tokens:,} times; most occurrences are inside words or are the "
            f"token {spaced!r} (with its space): did you mean --target {spaced!r}? Otherwise "
            "lower --min-per-class or use a larger corpus."
        )
    elif early and 2 * early >= tokens:
        parts.append(
            "most targets come too early in their document: use a smaller --context-length or "
            "longer documents (not one sentence per record), or lower --min-per-class."
        )
    else:
        parts.append("lower --min-per-class or use a larger corpus.")
    return "; ".join(parts)


def _space_initial(tokenizer: Any, token: int, cache: dict[int, bool]) -> bool:
    # The notebook's test: tokenizer.decode(next_token).startswith(' ').
    if token not in cache:
        cache[token] = tokenizer.decode([token]).startswith(" ")
    return cache[token]


def save_contexts(contexts: Contexts, path: Path, tokenizer: Any, contrast: Contrast) -> None:
    """Write ``contexts.parquet``: one row per context, with its text for people to read."""
    import pandas as pd

    table = pd.DataFrame(
        {
            "context": np.arange(len(contexts), dtype=np.int64),
            "label": contexts.labels,
            "class": np.where(contexts.labels, contrast.positive_name, contrast.negative_name),
            "document_id": contexts.document_ids,
            "source": contexts.sources,
            "offset": contexts.offsets,
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
        sources=table["source"].astype(str).tolist(),
        offsets=table["offset"].to_numpy(dtype=np.int64),
        next_tokens=table["next_token"].to_numpy(dtype=np.int64),
    )
