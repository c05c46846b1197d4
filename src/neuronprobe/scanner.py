"""Find a target token and its neighbours in documents without tokenizing whole documents.

Entry points: :func:`find_targets` and :func:`target_hits` (its hits only). They return, for each
document, exactly the occurrences of the target token that whole-document tokenization
(``tokenizer(text, add_special_tokens=False)``) would show, with the tokens before and after
each one, but they tokenize only short windows of text around the places where the target's
text occurs. :func:`find_targets` also counts, per document, every target token and the ones
skipped because fewer than ``before`` tokens precede them (:class:`DocumentTargets`).

Why the windows give the same tokens (the exactness argument)
--------------------------------------------------------------
The fast path is used only for a fast tokenizer whose backend has no normalizer, a
``ByteLevel(add_prefix_space=False, use_regex=True)`` pre-tokenizer and a BPE model without
dropout (GPT-2, SmolLM2 and other GPT-2 style tokenizers), and only for documents that contain
none of the tokenizer's added-token strings (those are split out before pre-tokenization);
every other case takes the reference path, whole-document tokenization.

Such a tokenizer splits the text into pre-tokens with the GPT-2 regex::

    's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

and BPE then works inside each pre-token on its own. Every character is a letter, a number,
whitespace or none of these, so the regex matches at every position it is tried from: the
pre-tokens tile the text. Call a position ``b`` a *boundary* when ``text[b] == " "`` and
``text[b - 1]`` is a printable ASCII character other than the space (``"!"`` to ``"~"``),
which is not whitespace in any definition of ``\\s``.

1. No pre-token contains both ``b - 1`` and ``b``: the alternatives that can hold a space hold
   it either as their first character (``" ?..."``) or inside a whitespace run (``\\s+...``),
   which would need ``text[b - 1]`` to be whitespace. So a pre-token starts at ``b``.
2. What the regex matches from ``b`` on depends only on ``text[b:]``: it has no look-behind,
   no anchors and no word boundaries.
3. What it matches before ``b`` does not depend on ``text[b:]``: every greedy run (letters,
   numbers, other symbols) stops at ``b`` because ``text[b]`` is a space, exactly as it stops at
   the end of a cut string; no whitespace run reaches ``b - 1``, so the look-ahead ``(?!\\S)``
   only ever looks at characters before ``b``; a contraction (``'re``...) or an optional leading
   space cannot start at ``b - 1`` and end past it in either string.

Hence for ``a`` in {0} ∪ boundaries and ``b`` in boundaries ∪ {len(text)}, the pre-tokens of
``text[a:b]`` are the text's pre-tokens on that span, and so are its BPE tokens.

The windows. The target token's bytes are the UTF-8 bytes of ``needle`` (``needle`` encodes to
that one token and the tokenizer is byte-level), and UTF-8 is self-synchronising, so every
target token in the whole-document tokens sits on an occurrence of ``needle`` in the text:
documents without ``needle`` have no hits and are not tokenized. For an occurrence at ``c``
the window runs from the ``before``-th boundary left of ``c`` (or the document start, if there
are fewer) to the ``after + 1``-th boundary at or right of ``c + len(needle)`` (or the document
end). A pre-token starts at every boundary and holds at least one token, so the window holds at
least ``before`` tokens before the target and ``after`` after it: the context and followers are
the document's. Windows that overlap are merged (the union of windows is cut at boundaries
too), so each target token is seen once, in document order. A window that starts at the
document start gives the exact token index; one that starts later has ``>= before`` tokens
before every target in it, so the ``index >= before`` rule holds there. The token index of the
window's start is counted, not tokenized: ``text[:a]`` is cut at its boundaries into short
chunks (mostly `` word``), and the token counts of distinct chunks are cached.

The counts. Every target token lies in exactly one (merged) window, so the document's target
tokens are the windows' target tokens, counted without tokenizing anything more. A target with
fewer than ``before`` tokens before it can only be in a window that starts at the document
start (every other window has ``>= before`` tokens before each of its targets), where the
window's token indices are the document's: such targets are the target ids among that window's
first ``before`` tokens.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = ["DocumentTargets", "Hit", "fast_path_available", "find_targets", "target_hits"]

# Chunks of text cut at every boundary (and nowhere else).
_CHUNK = re.compile(r"(?s) ?(?:[^ ]|(?<![!-~]) )+| ")


@dataclass(frozen=True, slots=True)
class Hit:
    """One occurrence of the target token in a document's whole-document tokens.

    Attributes
    ----------
    context:
        ``before + 1`` token ids, ``tokens[index - before : index + 1]``; the last is the target.
    following:
        ``tokens[index + 1 : index + 1 + after]``: between 1 and ``after`` ids (fewer than
        ``after`` only at the end of the document).
    offset:
        Character offset of the target token's text (``needle``) in the document (-1 when a
        slow tokenizer on the reference path cannot say).
    index:
        Index of the target token in the document's tokens (-1 when not asked for).
    """

    context: list[int]
    following: list[int]
    offset: int
    index: int


class DocumentTargets(NamedTuple):
    """The target tokens of one document (see :func:`find_targets`).

    Attributes
    ----------
    hits:
        The target tokens with ``before`` tokens before them and a next token, in order.
    tokens:
        Every target token of the document's whole-document tokens.
    too_early:
        The target tokens skipped because fewer than ``before`` tokens precede them (index
        ``< before``).
    """

    hits: list[Hit]
    tokens: int
    too_early: int


def target_hits(
    texts: Sequence[str],
    tokenizer: Any,
    target_id: int,
    needle: str,
    before: int,
    after: int,
    with_index: bool = True,
) -> list[list[Hit]]:
    """Every target token with ``before`` tokens before it and a next token, per document.

    The hits of :func:`find_targets` (which see for the parameters), without its counts.
    """
    found = find_targets(texts, tokenizer, target_id, needle, before, after, with_index)
    return [document.hits for document in found]


def find_targets(
    texts: Sequence[str],
    tokenizer: Any,
    target_id: int,
    needle: str,
    before: int,
    after: int,
    with_index: bool = True,
) -> list[DocumentTargets]:
    """Every target token with ``before`` tokens before it and a next token, per document, and
    how many target tokens each document holds and how many came too early.

    Parameters
    ----------
    texts:
        The documents, tokenized together (pass a batch of a few hundred).
    tokenizer:
        A Hugging Face tokenizer; the reference is ``tokenizer(text, add_special_tokens=False)``.
    target_id:
        The target token's id; ``needle`` must encode to exactly ``[target_id]``.
    needle:
        The target's text, such as ``" can"``.
    before:
        Tokens of context before the target (``>= 0``).
    after:
        Tokens wanted after the target (``>= 1``).
    with_index:
        Compute each hit's token index in the whole document. On the window path that means
        counting the tokens between windows, most of the scan's cost; without it ``index`` is -1
        (the character ``offset`` still locates the hit).

    Returns
    -------
    list[DocumentTargets]
        One per text. Document ``k``'s ``hits`` hold, in order, a :class:`Hit` for every
        ``i`` with ``before <= i < len(tokens) - 1`` and ``tokens[i] == target_id``, where
        ``tokens`` are document ``k``'s whole-document tokens: exactly what the notebook's loop
        sees; ``tokens`` counts every ``i`` with ``tokens[i] == target_id`` and ``too_early``
        those with ``i < before``. Tokenizes windows around the occurrences of ``needle`` when
        that is provably the same (:func:`fast_path_available`), whole documents otherwise.
    """
    if before < 0 or after < 1:
        raise ValueError(f"need before >= 0 and after >= 1 (got {before}, {after})")
    plan = _fast_plan(tokenizer, target_id, needle)
    if plan is None:
        if not texts:
            return []
        batch = tokenizer(list(texts), add_special_tokens=False)
        encodings = batch.encodings if getattr(batch, "encodings", None) else [None] * len(texts)
        return [
            _targets_in(list(ids), enc, target_id, before, after)
            for ids, enc in zip(batch["input_ids"], encodings, strict=True)
        ]

    backend, added = plan
    results: list[list[Hit]] = [[] for _ in texts]
    tokens = [0] * len(texts)  # target tokens per document
    too_early = [0] * len(texts)  # of which fewer than ``before`` tokens precede them
    whole: list[int] = []  # documents that take the reference path
    pieces: list[str] = []  # windows to tokenize
    owners: list[tuple[int, int]] = []  # (document, window start) per window
    gaps: list[str] = []  # per window: the text between the previous window (or 0) and it
    for k, text in enumerate(texts):
        if needle not in text:
            continue
        if any(token in text for token in added):
            whole.append(k)
            continue
        previous = 0
        for start, stop in _windows(text, needle, before, after):
            pieces.append(text[start:stop])
            owners.append((k, start))
            gaps.append(text[previous:start])
            previous = stop

    if whole:
        encoded = backend.encode_batch([texts[k] for k in whole], add_special_tokens=False)
        for k, enc in zip(whole, encoded, strict=True):
            results[k], tokens[k], too_early[k] = _targets_in(
                enc.ids, enc, target_id, before, after
            )
    if pieces:
        gap_counts = _counter(backend).count(gaps) if with_index else [0] * len(gaps)
        encoded = backend.encode_batch(pieces, add_special_tokens=False)
        document, shift = -1, 0
        for (k, start), enc, gap in zip(owners, encoded, gap_counts, strict=True):
            ids = enc.ids
            if k != document:
                document, shift = k, 0
            shift += gap  # tokens before this window: earlier windows and gaps
            early = ids[:before].count(target_id)
            if start and early:  # impossible by construction (docstring)
                raise AssertionError("a window holds too few tokens before a target")
            too_early[k] += early
            tokens[k] += ids.count(target_id)
            hits = _hits_in(ids, enc, start, shift, target_id, before, after)
            if not with_index:
                hits = [dataclasses.replace(hit, index=-1) for hit in hits]
            results[k].extend(hits)
            shift += len(ids)
    return [DocumentTargets(*counts) for counts in zip(results, tokens, too_early, strict=True)]


def fast_path_available(tokenizer: Any) -> bool:
    """Whether :func:`target_hits` may tokenize windows instead of whole documents."""
    return _added_tokens(tokenizer) is not None


def _fast_plan(tokenizer: Any, target_id: int, needle: str) -> tuple[Any, tuple[str, ...]] | None:
    added = _added_tokens(tokenizer)
    if added is None or not needle:
        return None
    backend = tokenizer.backend_tokenizer
    if backend.encode(needle, add_special_tokens=False).ids != [target_id]:
        return None
    return backend, added


_ELIGIBLE: dict[int, tuple[Any, tuple[str, ...] | None]] = {}
_PROBE = "It can't  be\n\n said: 42 caf\u00e9s , can\tcan \u2019s  "


def _added_tokens(tokenizer: Any) -> tuple[str, ...] | None:
    """The added-token strings of an eligible tokenizer; None if it is not eligible."""
    cached = _ELIGIBLE.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    result = _check_eligible(tokenizer)
    _ELIGIBLE[id(tokenizer)] = (tokenizer, result)
    return result


def _check_eligible(tokenizer: Any) -> tuple[str, ...] | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", False):
        return None
    try:
        spec = json.loads(backend.to_str())
    except Exception:  # pragma: no cover - a backend that cannot describe itself
        return None
    pre = spec.get("pre_tokenizer") or {}
    model = spec.get("model") or {}
    if (
        spec.get("normalizer") is not None
        or pre.get("type") != "ByteLevel"
        or pre.get("use_regex") is not True
        or pre.get("add_prefix_space") is not False
        or model.get("type") != "BPE"
        or model.get("dropout") not in (None, 0, 0.0)
    ):
        return None
    # The wrapper must tokenize as its backend does (the reference path calls the wrapper).
    wrapped = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    if list(wrapped) != backend.encode(_PROBE, add_special_tokens=False).ids:
        return None
    return tuple(t.content for t in backend.get_added_tokens_decoder().values() if t.content)


def _targets_in(
    ids: list[int], enc: Any, target_id: int, before: int, after: int
) -> DocumentTargets:
    """The hits and counts of one whole document's tokens."""
    hits = _hits_in(ids, enc, 0, 0, target_id, before, after)
    return DocumentTargets(hits, ids.count(target_id), ids[:before].count(target_id))


def _hits_in(
    ids: list[int],
    enc: Any,
    start: int,
    shift: int,
    target_id: int,
    before: int,
    after: int,
) -> list[Hit]:
    """Hits among ``ids`` (a document's tokens, or a window's starting at char ``start``)."""
    hits = []
    last = len(ids) - 1
    i = before - 1
    while True:
        try:
            i = ids.index(target_id, i + 1, last)
        except ValueError:
            break
        offset = -1
        if enc is not None:
            chars = enc.token_to_chars(i)
            offset = start + chars[0] if chars else -1
        hits.append(Hit(ids[i - before : i + 1], ids[i + 1 : i + 1 + after], offset, shift + i))
    return hits


def _windows(text: str, needle: str, before: int, after: int) -> list[tuple[int, int]]:
    """Merged windows ``(start, stop)`` around every occurrence of ``needle``, cut at boundaries."""
    windows: list[tuple[int, int]] = []
    size = len(text)
    width = len(needle)
    left_count = max(before, 1)
    c = text.find(needle)
    while c >= 0:
        start = _left_cut(text, c, left_count)
        stop = _right_cut(text, c + width, after + 1, size)
        if windows and start < windows[-1][1]:
            windows[-1] = (windows[-1][0], max(stop, windows[-1][1]))
        else:
            windows.append((start, stop))
        c = text.find(needle, c + 1)
    return windows


def _left_cut(text: str, c: int, count: int) -> int:
    """The ``count``-th boundary left of ``c`` (boundaries < c), or 0 if there are fewer."""
    printable = _PRINTABLE
    space = c
    while True:
        space = text.rfind(" ", 1, space)
        if space < 0:
            return 0
        if text[space - 1] in printable:
            count -= 1
            if count == 0:
                return space


def _right_cut(text: str, end: int, count: int, size: int) -> int:
    """The ``count``-th boundary at or right of ``end``, or the end of the text if fewer."""
    printable = _PRINTABLE
    space = end - 1
    while True:
        space = text.find(" ", space + 1)
        if space < 0:
            return size
        if text[space - 1] in printable:
            count -= 1
            if count == 0:
                return space


_PRINTABLE = frozenset(chr(c) for c in range(0x21, 0x7F))
_IRREGULAR_MARK = 1 << 40  # added to the count of a piece whose following space is no boundary


class _TokenCounter:
    """Counts the tokens of spans that start and end at cut points (boundaries or the ends).

    A span ``text[a:b]`` split at its spaces is ``head, " " + p1, " " + p2, ...``; when every
    one of those spaces is a boundary (its piece ends in ``"!"..."~"``), or the span's start,
    these are the chunks the span's tokens split into, and the counts add up. Counts of
    distinct chunks are cached. Spans with other spaces are cut with a regex instead.
    """

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.spaced: dict[str, int] = {"": _IRREGULAR_MARK}  # piece -> tokens in " " + piece
        self.plain: dict[str, int] = {"": 0}  # chunk -> tokens in chunk

    def count(self, spans: list[str]) -> list[int]:
        spaced, plain = self.spaced, self.plain
        counts: list[int] = []
        unknown: list[int] = []
        split = [span.split(" ") for span in spans]
        for n, pieces in enumerate(split):
            try:
                total = sum(map(spaced.__getitem__, pieces)) + plain[pieces[0]]
            except KeyError:
                unknown.append(n)
                total = -1
            counts.append(total)
        if unknown:
            self._learn(spaced, {p for n in unknown for p in split[n] if p not in spaced}, " ")
            self._learn(plain, {split[n][0] for n in unknown if split[n][0] not in plain}, "")
            for n in unknown:
                pieces = split[n]
                counts[n] = sum(map(spaced.__getitem__, pieces)) + plain[pieces[0]]
        for n, pieces in enumerate(split):
            head = pieces[0]
            counts[n] -= spaced[head]
            if counts[n] >= _IRREGULAR_MARK or (head and head[-1] not in _PRINTABLE):
                counts[n] = self._count_chunks(spans[n])
        return counts

    def _count_chunks(self, span: str) -> int:
        chunks = _CHUNK.findall(span)
        self._learn(self.plain, {c for c in chunks if c not in self.plain}, "")
        return sum(map(self.plain.__getitem__, chunks))

    def _learn(self, cache: dict[str, int], keys: set[str], prefix: str) -> None:
        if not keys:
            return
        ordered = sorted(keys)
        encoded = self.backend.encode_batch_fast([prefix + key for key in ordered], False)
        for key, enc in zip(ordered, encoded, strict=True):
            mark = prefix and (key == "" or key[-1] not in _PRINTABLE)
            cache[key] = len(enc) + (_IRREGULAR_MARK if mark else 0)


_COUNTERS: dict[int, tuple[Any, _TokenCounter]] = {}


def _counter(backend: Any) -> _TokenCounter:
    cached = _COUNTERS.get(id(backend))
    if cached is None or cached[0] is not backend:
        cached = (backend, _TokenCounter(backend))
        _COUNTERS[id(backend)] = cached
    return cached[1]
