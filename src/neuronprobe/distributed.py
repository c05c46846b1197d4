"""The two heavy stages on a Ray cluster: the same contexts and activations, many workers.

Entry points: :func:`connect` (or :func:`ray_session`) to reach a cluster,
:func:`collect_contexts_ray` for stage 2 and :func:`extract_to_file_ray` for stage 3. Both
give exactly what the single-process functions give (:func:`neuronprobe.contexts.
collect_contexts`, :func:`neuronprobe.activations.extract_to_file`); the statistics stay local
(they read the memory-mapped activations layer by layer and take seconds).

Contexts
--------
The corpus is cut into deterministic shards: a folder of files by file (consecutive small
files grouped), a Hugging Face dataset by its dataset shards (data files), anything else by
document index (the driver reads the documents in order and hands out ``shard_documents`` at a
time). Each shard is scanned by a Ray task with :class:`~neuronprobe.contexts.ContextFinder`,
which finds each document's candidate contexts independently of every other document. The
driver merges the shards' results strictly in corpus order into one
:class:`~neuronprobe.contexts.Scan`, with the same two steps the single-process scan uses
(:meth:`~neuronprobe.contexts.Scan.satisfied` before each document, then
:meth:`~neuronprobe.contexts.Scan.add_document`, which drops duplicates), so the stopping point,
the duplicate counts and the kept contexts are the single-process scan's. ``workers`` shards
are scanned at once (finished ones wait for the shards before them); once the merged prefix
satisfies the stopping rule, no further shard is launched and the ones in flight are cancelled.
A shard whose text is bad (malformed JSON, not UTF-8) reports the error with the documents
before it, and the error is raised if the merge reaches it (the single-process scan reads up to
256 documents ahead, so it may raise an error that lies just past the stopping point).

Activations
-----------
Ray Data ``map_batches`` over the batches of contexts with a pool of actors
(:class:`ActivationWorker`), each of which loads the model once by name (one per GPU where there
are GPUs: ``num_gpus_per_actor``). A batch holds ``batch_size`` consecutive contexts starting at
a multiple of ``batch_size`` (the single-process engine's batches, so the numbers are the same
to the bit) and carries its first context's index; the driver writes each result into the
memory-mapped ``[layers, contexts, neurons]`` array at its rows, and records progress in the
single-process engine's files (``<path>.partial``, ``<path>.progress.json``, ``<stem>.json``)
only for the contiguous prefix of finished batches. So a run interrupted under either engine
resumes under either, and a batch retried after a worker died is written once, at its rows.

Failures
--------
An unreachable ``--ray-address`` fails within seconds with one line saying what to do. An error
inside a worker (a model that does not load, bad text) is raised as the worker's own
:class:`~neuronprobe.errors.NeuronprobeError` message, not as a Ray traceback. Workers that die
(killed, out of memory) are restarted and their batches or shards retried by Ray.

Workers need neuronprobe installed (the same version) and, for the bundled model and corpora,
the asset packages; environment variables that decide offline behaviour and caches
(:data:`FORWARDED_ENV`) are passed to them when this module starts or joins Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from neuronprobe.activations import (
    ActivationFile,
    activation_key,
    extract_activations,
    hook_points,
    resolve_layers,
    site_width,
)
from neuronprobe.contexts import (
    ContextFinder,
    Contexts,
    Contrast,
    DocumentFinds,
    Scan,
    finish_scan,
)
from neuronprobe.errors import NeuronprobeError
from neuronprobe.text import Corpus, Document, FileCorpus, HFDatasetCorpus

logger = logging.getLogger(__name__)

__all__ = [
    "FORWARDED_ENV",
    "ActivationWorker",
    "collect_contexts_ray",
    "connect",
    "extract_to_file_ray",
    "ray_session",
    "scan_contexts_ray",
]

#: Environment variables passed from the driver to Ray's workers when set: they decide where
#: models and datasets are cached and whether the hub is used (the tests' offline setting).
FORWARDED_ENV = (
    "HF_ENDPOINT",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HF_DATASETS_CACHE",
    "TRANSFORMERS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    "NEURONPROBE_CACHE",
)
#: The port of a Ray head's GCS when an address names none (``ray start --head``'s default).
DEFAULT_GCS_PORT = 6379
#: The Ray Client server's default port (``ray://HOST`` addresses).
DEFAULT_CLIENT_PORT = 10001
_INSTALL_HINT = "pip install 'neuronprobe[ray]'"


def _ray() -> Any:
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError as error:  # pragma: no cover - ray is in the dev and ray extras
        raise NeuronprobeError(
            f"--engine ray needs Ray, which is not installed; run `{_INSTALL_HINT}`."
        ) from error
    return ray


# --------------------------------------------------------------------------- connecting


def _split_address(address: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of a Ray address (``HOST[:PORT]`` or ``ray://HOST[:PORT]``)."""
    scheme, rest = "", address.strip()
    if "://" in rest:
        scheme, rest = rest.split("://", 1)
        if scheme != "ray":
            raise NeuronprobeError(
                f"--ray-address {address!r}: unknown scheme {scheme + '://'!r}; give HOST:PORT "
                "(the address `ray start --head` prints), ray://HOST:10001, or auto."
            )
    default = DEFAULT_CLIENT_PORT if scheme == "ray" else DEFAULT_GCS_PORT
    host, _, port_text = rest.rstrip("/").rpartition(":") if ":" in rest else (rest, "", "")
    host = host.strip("[]")
    if not host:
        raise NeuronprobeError(
            f"--ray-address {address!r} names no host; give HOST:PORT, such as 10.0.0.5:6379."
        )
    if not port_text:
        return scheme, host, default
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise NeuronprobeError(
            f"--ray-address {address!r}: {port_text!r} is not a port; give HOST:PORT, "
            "such as 10.0.0.5:6379."
        )
    return scheme, host, int(port_text)


def _check_reachable(address: str, timeout_s: float) -> None:
    """Raise a one-line :class:`NeuronprobeError` unless something listens at ``address``."""
    scheme, host, port = _split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as error:
        reason = (
            f"nothing answered within {timeout_s:g} s"
            if isinstance(error, TimeoutError)
            else (error.strerror or str(error) or type(error).__name__)
        )
        start = (
            "start a Ray client server there (`ray start --head` starts one on port 10001)"
            if scheme == "ray"
            else f"start one there with `ray start --head --port {port}`"
        )
        raise NeuronprobeError(
            f"--ray-address {address}: no Ray cluster answers at {host}:{port} ({reason}); "
            f"{start}, give the address `ray start --head` printed, or omit --ray-address to "
            "start a local Ray instance."
        ) from None


def _runtime_env() -> dict[str, Any]:
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    return {"env_vars": env} if env else {}


def connect(
    address: str | None = None,
    num_cpus: int | None = None,
    *,
    num_gpus: int | None = None,
    timeout_s: float = 5.0,
) -> bool:
    """Start a local Ray instance, or join the cluster at ``address``.

    Parameters
    ----------
    address:
        ``None``: the cluster in ``$RAY_ADDRESS`` if that is set (as in a ``ray job submit``
        job), else a new local instance on this machine. ``local``: a new local instance.
        ``HOST:PORT``: the GCS address that ``ray start --head`` prints (the port defaults to
        6379). ``ray://HOST:PORT``: Ray Client. ``auto``: the cluster this machine's
        ``ray start`` joined.
    num_cpus, num_gpus:
        Resources of a local instance (default: all of this machine's); ignored when joining.
    timeout_s:
        How long to wait for the address to answer before giving up.

    Returns
    -------
    bool
        True when this call initialised Ray (so the caller should shut it down), False when
        Ray was already initialised in this process (it is reused).

    Raises
    ------
    NeuronprobeError
        Within ``timeout_s`` when nothing answers at ``address``, or when Ray cannot start or
        join; one line naming ``--ray-address`` and what to do.
    """
    if address is None and os.environ.get("RAY_ADDRESS", "").strip():
        address = "auto"  # ray.init reads $RAY_ADDRESS
        logger.info("joining the Ray cluster in $RAY_ADDRESS (%s)", os.environ["RAY_ADDRESS"])
    if address is not None and address.strip() not in ("", "auto", "local"):
        _check_reachable(address, timeout_s)
    ray = _ray()
    if ray.is_initialized():
        logger.debug("reusing the Ray instance this process is connected to")
        return False
    options: dict[str, Any] = {
        "logging_level": logging.WARNING,
        "log_to_driver": False,
        "runtime_env": _runtime_env() or None,
    }
    if address is None or address.strip() in ("", "local"):
        # "local": a new instance, even where a `ray start` cluster that a plain ray.init()
        # would join runs on this machine.
        options.update(
            address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False
        )
        where = "a local Ray instance"
    else:
        options["address"] = address.strip()
        shown = os.environ.get("RAY_ADDRESS", "").strip() if address == "auto" else ""
        where = f"the Ray cluster at {shown or address}"
    # Ray retries a GCS that does not answer once a second for 20 s; an address that accepts
    # connections but is not a Ray head should fail as fast as one that refuses them.
    wait: dict[str, str | None] = {}
    if options["address"] != "local":
        wait["RAY_gcs_server_port_wait_time_s"] = str(max(1, round(timeout_s)))
    if options["address"] != "auto":
        wait["RAY_ADDRESS"] = None  # ray.init would prefer it to the address it is given
    try:
        with _environ(wait):
            ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as error:
        raise _connect_error(error, where, address) from None
    _quiet_ray_data()
    resources = ray.cluster_resources()
    logger.info(
        "connected to %s: %d CPUs, %d GPUs",
        where,
        int(resources.get("CPU", 0)),
        int(resources.get("GPU", 0)),
    )
    return True


@contextlib.contextmanager
def _environ(values: dict[str, str | None]) -> Iterator[None]:
    """For the block only: set variables that are not set already, and unset those given as
    None; restored afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        elif name not in os.environ:
            os.environ[name] = value
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _connect_error(error: BaseException, where: str, address: str | None) -> NeuronprobeError:
    """One line for a failed ``ray.init``: what failed, and what to do."""
    text = " ".join(str(e) for e in _chain(error))
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "InvalidAuthToken" in text or "Unauthenticated" in text:
        return NeuronprobeError(
            f"--ray-address {address}: the cluster refused this machine's Ray authentication "
            "token; run `ray get-auth-token` on the head node and set RAY_AUTH_MODE=token and "
            "RAY_AUTH_TOKEN=<that token> here (or put it in ~/.ray/auth_token)."
        )
    if address not in (None, "", "local"):
        return NeuronprobeError(
            f"--ray-address {address}: could not join a Ray cluster there ({first}); give the "
            "address `ray start --head` printed (HOST:6379), or omit --ray-address to start a "
            "local Ray instance."
        )
    return NeuronprobeError(
        f"could not start {where} ({first}); see `ray status`, or give --ray-address of a "
        "running cluster."
    )


@contextlib.contextmanager
def ray_session(
    address: str | None = None,
    num_cpus: int | None = None,
    *,
    num_gpus: int | None = None,
    timeout_s: float = 5.0,
) -> Iterator[None]:
    """:func:`connect` for the duration of a ``with`` block; shuts Ray down afterwards only if
    the block started it (an instance the caller had already initialised is left running)."""
    started = connect(address, num_cpus, num_gpus=num_gpus, timeout_s=timeout_s)
    try:
        yield
    finally:
        if started:
            _ray().shutdown()


@contextlib.contextmanager
def _session_if_needed() -> Iterator[None]:
    """Use the Ray instance this process is connected to, or a local one for this call only."""
    if _ray().is_initialized():
        yield
        return
    with ray_session():
        yield


def _quiet_ray_data() -> None:
    """Ray Data prints an execution plan and progress lines by default; neuronprobe has its own."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)


@contextlib.contextmanager
def _data_context() -> Iterator[Any]:
    """Ray Data settings for one extraction: no progress bars or banners, original errors."""
    from ray.data import DataContext

    _quiet_ray_data()
    context = DataContext.get_current()
    saved = {
        name: getattr(context, name)
        for name in (
            "enable_progress_bars",
            "print_on_execution_start",
            "raise_original_map_exception",
        )
    }
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.raise_original_map_exception = True
    # A failing UDF is reported once, by this module, with the worker's own message: Ray Data's
    # own report (a traceback on stderr) is muted while the dataset runs.
    loud = [
        handler
        for handler in logging.getLogger("ray.data").handlers
        if isinstance(handler, logging.StreamHandler)
        and not isinstance(handler, logging.FileHandler)
    ]
    levels = [handler.level for handler in loud]
    for handler in loud:
        handler.setLevel(logging.CRITICAL + 1)
    try:
        yield context
    finally:
        for name, value in saved.items():
            setattr(context, name, value)
        for handler, level in zip(loud, levels, strict=True):
            handler.setLevel(level)


# --------------------------------------------------------------------------- errors


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and every exception it wraps (Ray's ``cause``, ``args``, ``__cause__``)."""
    seen: set[int] = set()
    queue: deque[BaseException] = deque([error])
    while queue:
        current = queue.popleft()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = [getattr(current, "cause", None), current.__cause__, current.__context__]
        linked += [arg for arg in getattr(current, "args", ()) if isinstance(arg, BaseException)]
        queue.extend(e for e in linked if isinstance(e, BaseException))


def _is_ray_wrapper(error: BaseException) -> bool:
    module = type(error).__module__ or ""
    return module.startswith("ray") or type(error).__name__.startswith("RayTaskError")


def _worker_error(error: BaseException, what: str) -> NeuronprobeError:
    """A one-line error from whatever a Ray worker raised: its own NeuronprobeError message if
    it raised one, else its exception type and message, else Ray's first line."""
    chain = list(_chain(error))
    for cause in chain:
        if isinstance(cause, NeuronprobeError) and not _is_ray_wrapper(cause):
            # Ray Data appends its retry summary on further lines; the message is the first.
            return NeuronprobeError(_first_line(cause))
    for cause in chain:
        if not _is_ray_wrapper(cause) and not isinstance(
            cause, NeuronprobeError | StopIteration | GeneratorExit
        ):
            first = _first_line(cause)
            return NeuronprobeError(
                f"{what} failed in a Ray worker: {type(cause).__name__}: {first}"
            )
    return NeuronprobeError(f"{what} failed on the Ray cluster: {_first_line(error)}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextlib.contextmanager
def _worker_errors(what: str) -> Iterator[None]:
    """Turn Ray's wrappers of a worker's error into :class:`NeuronprobeError` (one line)."""
    try:
        yield
    except NeuronprobeError as error:
        if _is_ray_wrapper(error):
            raise _worker_error(error, what) from None
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as error:
        if any(_is_ray_wrapper(e) for e in _chain(error)):
            raise _worker_error(error, what) from None
        raise


# --------------------------------------------------------------------------- contexts


@dataclass
class _Shard:
    """One piece of the corpus for one Ray task (picklable).

    ``kind`` is ``files`` (``corpus.files[i]`` for ``i`` in ``indices``), ``hf`` (dataset shard
    ``indices[0]`` of ``corpus``) or ``documents`` (the documents themselves).
    """

    number: int
    kind: str
    corpus: Any = None
    indices: tuple[int, ...] = ()
    documents: list[Document] = field(default_factory=list)

    def describe(self) -> str:
        if self.kind == "files":
            return f"files {self.indices[0]}-{self.indices[-1]}"
        if self.kind == "hf":
            return f"dataset shard {self.indices[0]}"
        return f"{len(self.documents)} documents"


@dataclass
class _ShardResult:
    """What a task found in one shard: how many documents (and, for a dataset shard, rows) it
    read, what the documents that hold candidates or the target's text hold (position in the
    shard, id, source, finds: candidates and target counts), and the error that stopped the
    shard early, if any."""

    documents: int = 0
    rows: int = 0
    found: list[tuple[int, str, str, DocumentFinds]] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    characters: int = 0


_FINDERS: dict[str, ContextFinder] = {}  # per worker process: finders by object id
_FINDERS_LOCK = threading.Lock()


def _finder(box: list[Any]) -> ContextFinder:
    """The finder whose object reference is ``box[0]``, fetched once per worker process."""
    ref = box[0]
    key = ref.hex()
    with _FINDERS_LOCK:
        finder = _FINDERS.get(key)
        if finder is None:
            finder = _ray().get(ref)
            _FINDERS.clear()  # one run's finder at a time
            _FINDERS[key] = finder
    return finder


def _shard_documents(shard: _Shard, result: _ShardResult) -> Iterator[Document]:
    if shard.kind == "documents":
        yield from shard.documents
    elif shard.kind == "files":
        for index in shard.indices:
            yield from shard.corpus.file_documents(index)
    elif shard.kind == "hf":
        corpus: HFDatasetCorpus = shard.corpus
        for text in corpus.shard_texts(shard.indices[0]):
            row = result.rows
            result.rows += 1
            if text is not None:
                # The id is the row within the shard; the driver adds the rows of earlier shards.
                yield Document(id=str(row), text=text, source=corpus.name)
    else:  # pragma: no cover - _plan_shards makes only these
        raise ValueError(f"unknown shard kind {shard.kind!r}")


def _scan_shard(shard: _Shard, box: list[Any], batch_documents: int = 256) -> _ShardResult:
    """Ray task: the candidates of every document of one shard, in order."""
    started = time.perf_counter()
    finder = _finder(box)
    result = _ShardResult()
    batch: list[Document] = []

    def scan(batch: list[Document]) -> None:
        for document, finds in zip(batch, finder.find(batch), strict=True):
            if finds.found_anything:
                result.found.append((result.documents, document.id, document.source, finds))
            result.documents += 1
            result.characters += len(document.text)

    try:
        for document in _shard_documents(shard, result):
            batch.append(document)
            if len(batch) >= batch_documents:
                scan(batch)
                batch = []
    except NeuronprobeError as error:
        # The documents before the bad one count; the driver raises this only if the merge
        # reaches it (the stopping rule may end the scan first).
        result.error = str(error)
    scan(batch)
    result.seconds = time.perf_counter() - started
    return result


def _file_groups(corpus: FileCorpus, target_bytes: int) -> list[tuple[int, ...]]:
    """Consecutive file indices grouped until a group holds ``target_bytes`` (a big file alone)."""
    groups: list[tuple[int, ...]] = []
    current: list[int] = []
    size = 0
    for index, file in enumerate(corpus.files):
        current.append(index)
        size += file.stat().st_size
        if size >= target_bytes:
            groups.append(tuple(current))
            current, size = [], 0
    if current:
        groups.append(tuple(current))
    return groups


def _plan_shards(
    corpus: Corpus, shard_documents: int, shard_bytes: int
) -> tuple[str, Iterator[_Shard]]:
    """How the corpus is cut (in words) and its shards, in corpus order (lazily)."""
    if isinstance(corpus, FileCorpus) and len(corpus.files) > 1:
        groups = _file_groups(corpus, shard_bytes)
        shards = (_Shard(n, "files", corpus, group) for n, group in enumerate(groups))
        return f"by file ({len(corpus.files)} files in {len(groups)} shards)", shards
    if isinstance(corpus, HFDatasetCorpus):
        count = corpus.shard_count()
        if count > 1:
            shards = (_Shard(n, "hf", corpus, (n,)) for n in range(count))
            return f"by dataset shard ({count} shards)", shards

    def by_index() -> Iterator[_Shard]:
        batch: list[Document] = []
        number = 0
        for document in corpus.documents():
            batch.append(document)
            if len(batch) >= shard_documents:
                yield _Shard(number, "documents", documents=batch)
                batch, number = [], number + 1
        if batch:
            yield _Shard(number, "documents", documents=batch)

    return f"by document index ({shard_documents} documents per shard)", by_index()


def _cluster_workers(resource: str = "CPU", per_worker: float = 1.0) -> int:
    available = float(_ray().cluster_resources().get(resource, 0.0))
    return max(1, int(available // per_worker)) if per_worker > 0 else 1


def scan_contexts_ray(
    corpus: Corpus,
    tokenizer: Any,
    contrast: Contrast | None = None,
    *,
    min_per_class: int = 500,
    drop_duplicates: bool = True,
    normalize_apostrophes: bool = False,
    shard_documents: int = 2000,
    shard_bytes: int = 16 << 20,
    workers: int | None = None,
    batch_documents: int = 256,
    progress: bool = True,
    finder: ContextFinder | None = None,
    stats: dict[str, Any] | None = None,
) -> Scan:
    """:func:`neuronprobe.contexts.scan_contexts` over ``corpus`` with parallel Ray tasks.

    Returns the same :class:`~neuronprobe.contexts.Scan` (contexts, documents scanned,
    duplicates, spellings) as the single-process scan of ``corpus.documents()``. Uses the Ray
    instance this process is connected to, or starts a local one for the call.

    Parameters
    ----------
    corpus:
        The corpus (see :func:`neuronprobe.text.open_corpus`); cut into shards as the module
        docstring says.
    tokenizer:
        The model's tokenizer (shipped to the workers once), or a model name to load it from.
    shard_documents:
        Documents per shard when the corpus is cut by document index.
    shard_bytes:
        Consecutive files of a folder are grouped into shards of at least this many bytes.
    workers:
        Shards scanned at once (tasks of one CPU each); default: the cluster's CPUs.
    finder:
        A prebuilt :class:`~neuronprobe.contexts.ContextFinder` (then ``tokenizer``,
        ``contrast`` and ``normalize_apostrophes`` are taken from it).
    stats:
        If given, filled with the merged shards' ``shards``, ``documents_read`` (the whole
        shard, also past the stopping point), ``characters_read`` and ``task_seconds`` (time
        inside the tasks: ``characters_read / task_seconds`` is one worker's rate).

    Returns
    -------
    Scan
        Every context found up to the stopping point, per class, in corpus order.

    Raises
    ------
    NeuronprobeError
        If the corpus's text is bad where the scan needs it, or a worker fails (with the
        worker's message).
    """
    from tqdm.auto import tqdm

    with _session_if_needed():
        ray = _ray()
        if finder is None:
            if isinstance(tokenizer, str):
                from neuronprobe.models import load_model

                tokenizer = load_model(tokenizer, device="cpu").tokenizer
            finder = ContextFinder(tokenizer, contrast, normalize_apostrophes)
        contrast = finder.contrast
        workers = workers or _cluster_workers()
        how, shards = _plan_shards(corpus, shard_documents, shard_bytes)
        logger.info("scanning %s with %d Ray workers, %s", corpus.name, workers, how)
        task = ray.remote(num_cpus=1, max_retries=3)(_scan_shard)
        box = [ray.put(finder)]
        scan = Scan.empty(drop_duplicates)
        pending: deque[tuple[_Shard, Any]] = deque()  # launched, not merged; corpus order
        running: set[Any] = set()  # launched, not finished
        read_error: NeuronprobeError | None = None
        exhausted = False
        row_offset = 0
        totals = {"shards": 0, "documents_read": 0, "characters_read": 0, "task_seconds": 0.0}
        bar = tqdm(desc="scanning documents", unit=" docs", disable=not progress, mininterval=0.5)
        try:
            with _worker_errors("scanning the corpus"):
                while True:
                    # ``workers`` shards at a time; finished ones wait (at most 4 x workers)
                    # for the shards before them to be merged.
                    while (
                        not exhausted
                        and read_error is None
                        and len(running) < workers
                        and len(pending) < 4 * workers
                    ):
                        try:
                            shard = next(shards)
                        except StopIteration:
                            exhausted = True
                        except NeuronprobeError as error:  # the driver's read of the corpus
                            read_error = error
                        else:
                            logger.debug("scanning shard %d: %s", shard.number, shard.describe())
                            ref = task.remote(shard, box, batch_documents)
                            pending.append((shard, ref))
                            running.add(ref)
                    if not pending:
                        break
                    shard, ref = pending[0]
                    if ref in running:
                        ready, _ = ray.wait(list(running), num_returns=1)
                        running.difference_update(ready)
                        continue
                    pending.popleft()
                    result: _ShardResult = ray.get(ref)
                    totals["shards"] += 1
                    totals["documents_read"] += result.documents
                    totals["characters_read"] += result.characters
                    totals["task_seconds"] += result.seconds
                    stopped = _merge(scan, result, shard, corpus, row_offset, min_per_class)
                    bar.update(scan.documents_scanned - bar.n)
                    bar.set_postfix(
                        {
                            contrast.positive_name: len(scan.positive),
                            contrast.negative_name: len(scan.negative),
                        },
                        refresh=False,
                    )
                    row_offset += result.rows
                    if stopped or scan.satisfied(min_per_class):
                        break
                    if result.error is not None:
                        raise NeuronprobeError(result.error)
        finally:
            bar.close()
            for _, ref in pending:  # shards past the stopping point
                with contextlib.suppress(Exception):
                    ray.cancel(ref)
        if read_error is not None and not scan.satisfied(min_per_class):
            raise read_error
        if scan.documents_scanned == 0:
            # Let the corpus say why it has no documents (its own message), as the local scan does.
            for _ in corpus.documents():
                break
        if stats is not None:
            stats.update(totals)
        logger.info(
            "merged %d shards: %d documents scanned", totals["shards"], scan.documents_scanned
        )
        return scan


def _merge(
    scan: Scan,
    result: _ShardResult,
    shard: _Shard,
    corpus: Corpus,
    row_offset: int,
    min_per_class: int,
) -> bool:
    """Add one shard's documents to ``scan`` in order; True if the stopping rule ended it.

    The rule is checked before every document, as in the single-process scan; a run of
    documents without candidates cannot change it, so it is checked once before such a run.
    """
    position = 0  # the next document of the shard to add
    for found_at, document_id, source, finds in result.found:
        if found_at > position:  # documents without candidates or targets: only counted
            if scan.satisfied(min_per_class):
                return True
            scan.documents_scanned += found_at - position
        if scan.satisfied(min_per_class):
            return True
        if shard.kind == "hf":
            assert isinstance(corpus, HFDatasetCorpus)
            document_id = corpus.document_id(row_offset + int(document_id))
        scan.add_document(document_id, source, finds)
        position = found_at + 1
    if result.documents > position:
        if scan.satisfied(min_per_class):
            return True
        scan.documents_scanned += result.documents - position
    return False


def collect_contexts_ray(
    corpus: Corpus,
    tokenizer: Any,
    contrast: Contrast | None = None,
    *,
    min_per_class: int = 500,
    seed: int = 0,
    drop_duplicates: bool = True,
    normalize_apostrophes: bool = False,
    shard_documents: int = 2000,
    workers: int | None = None,
    progress: bool = True,
) -> Contexts:
    """:func:`neuronprobe.contexts.collect_contexts` with the scan on Ray.

    See :func:`scan_contexts_ray` for ``tokenizer``, ``shard_documents`` and ``workers``; the
    other parameters are :func:`~neuronprobe.contexts.collect_contexts`'s.

    Returns
    -------
    Contexts
        Exactly what ``collect_contexts(corpus.documents(), tokenizer, contrast, ...)``
        returns with the same arguments: tokens int64 [contexts, context_length + 1], labels
        bool [contexts], document ids, sources, offsets, next tokens, and the same counts
        (documents scanned, contexts found, duplicates dropped, spellings).

    Raises
    ------
    NeuronprobeError
        If the corpus ends before both classes reach ``min_per_class``, its text is bad, or a
        worker fails (with the worker's message).
    """
    contrast = contrast or Contrast()
    scan = scan_contexts_ray(
        corpus,
        tokenizer,
        contrast,
        min_per_class=min_per_class,
        drop_duplicates=drop_duplicates,
        normalize_apostrophes=normalize_apostrophes,
        shard_documents=shard_documents,
        workers=workers,
        progress=progress,
    )
    return finish_scan(scan, contrast, min_per_class=min_per_class, seed=seed)


# --------------------------------------------------------------------------- activations


class ActivationWorker:
    """Ray Data UDF: loads the model once, then extracts one batch of contexts per call.

    Parameters
    ----------
    model_name:
        What :func:`neuronprobe.models.load_model` loads (each worker loads it itself).
    layers, site, position:
        As :func:`neuronprobe.activations.extract_activations` (layers resolved).
    device, dtype:
        Passed to ``load_model``; ``auto`` uses the GPU Ray assigned to this actor, if any.
    """

    def __init__(
        self,
        model_name: str,
        *,
        layers: Sequence[int],
        site: str,
        position: int,
        device: str = "auto",
        dtype: str = "float32",
        positive_ids: Sequence[int] | None = None,
    ) -> None:
        from neuronprobe.models import load_model

        self.model_name = model_name
        self.layers = list(layers)
        self.site = site
        self.position = position
        self.positive_ids = list(positive_ids) if positive_ids else None
        # A model that does not load is reported with the first batch, as an ordinary error:
        # an actor that dies in its constructor makes Ray print tracebacks while it gives up.
        self.error: str | None = None
        try:
            self.loaded = load_model(model_name, device=device, dtype=dtype)
        except NeuronprobeError as error:
            self.error = str(error)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``first`` [rows], ``count`` [rows], ``tokens`` [rows, batch_size, pos] ->
        ``first``, ``count``, ``values`` float32 [rows, layers, batch_size, neurons] and
        ``logprob`` float64 [rows, batch_size, 2] (the model's own answer, zero without
        ``positive_ids``; rows past ``count`` are zero)."""
        if self.error is not None:
            raise NeuronprobeError(self.error)
        firsts = np.asarray(batch["first"], dtype=np.int64)
        counts = np.asarray(batch["count"], dtype=np.int64)
        tokens = np.asarray(batch["tokens"], dtype=np.int64)
        values: np.ndarray | None = None
        logprob = np.zeros((len(firsts), tokens.shape[1], 2), dtype=np.float64)
        for row, (first, count) in enumerate(zip(firsts.tolist(), counts.tolist(), strict=True)):
            answer = np.zeros((count, 2), dtype=np.float64)
            try:
                result = extract_activations(
                    self.loaded.model,
                    tokens[row, :count],
                    layers=self.layers,
                    site=self.site,
                    position=self.position,
                    batch_size=count,  # exactly one forward pass: the single-process batch
                    progress=False,
                    context_offset=first,
                    positive_ids=self.positive_ids,
                    logprob_out=answer if self.positive_ids else None,
                )
            except NeuronprobeError:
                raise
            except Exception as error:
                hint = (
                    "; were the contexts made with this model's tokenizer?"
                    if isinstance(error, IndexError)
                    else ""
                )
                raise NeuronprobeError(
                    f"--model {self.model_name!r} failed on contexts {first}-{first + count - 1}"
                    f" ({type(error).__name__}: {_first_line(error)}){hint}"
                ) from error
            if values is None:
                values = np.zeros(
                    (len(firsts), result.shape[0], tokens.shape[1], result.shape[2]),
                    dtype=np.float32,
                )
            values[row, :, :count] = result
            logprob[row, :count] = answer
        assert values is not None
        return {"first": firsts, "count": counts, "values": values, "logprob": logprob}


def _describe_model(model_name: str, site: str, dtype: str) -> tuple[int, int, dict[str, Any]]:
    """Ray task: the model's layer count and site width, and its identity."""
    from neuronprobe.models import load_model

    loaded = load_model(model_name, device="cpu", dtype=dtype)
    return len(hook_points(loaded.model, site)), site_width(loaded.model, site), loaded.identity


def extract_to_file_ray(
    model_name: str,
    tokens: np.ndarray,
    path: Path | str,
    *,
    identity: dict[str, Any] | None = None,
    model: Any = None,
    layers: Sequence[int] | None = None,
    site: str = "mlp.pre",
    position: int = -1,
    batch_size: int = 64,
    device: str = "auto",
    dtype: str = "float32",
    num_actors: int | None = None,
    num_gpus_per_actor: float | None = None,
    num_cpus_per_actor: float = 1.0,
    max_restarts: int = 3,
    progress: bool = True,
    worker_class: type[ActivationWorker] = ActivationWorker,
    stats: dict[str, Any] | None = None,
    positive_ids: Sequence[int] | None = None,
) -> np.ndarray:
    """:func:`neuronprobe.activations.extract_to_file` with the forward passes on Ray actors.

    Writes the same ``path`` (``.npy``, float32 ``[layers, contexts, neurons]``) with the same
    numbers, and uses the same resume files, so an extraction interrupted under either engine
    continues under either; a finished array with the same key is reused.

    Parameters
    ----------
    model_name:
        The model each actor loads with :func:`neuronprobe.models.load_model`.
    tokens:
        int [contexts, pos], the contexts (``Contexts.tokens``).
    path:
        Where the array goes (``activations.npy``).
    identity:
        The model's identity (``LoadedModel.identity`` of the driver's copy): part of the key
        that decides reuse and resume. Default: the identity a worker reports.
    model:
        The driver's loaded copy of the model, used only for its layer count and site width;
        without it (and without ``identity``) one Ray task loads the model to find them.
    layers, site, position, batch_size, positive_ids:
        As :func:`~neuronprobe.activations.extract_to_file`; batches are ``batch_size``
        consecutive contexts from multiples of ``batch_size``, as there.
    device, dtype:
        For the actors' ``load_model`` (``auto``: the actor's GPU if it has one).
    num_actors:
        Actors in the pool (each loads the model once). Default: the cluster's GPUs divided by
        ``num_gpus_per_actor`` when that is > 0, else its CPUs divided by ``num_cpus_per_actor``;
        never more than the batches.
    num_gpus_per_actor, num_cpus_per_actor:
        Ray resources per actor. GPUs default to 1 where the cluster has GPUs (one actor per
        GPU), else 0.
    max_restarts:
        How often a dead actor is restarted (its batch is retried each time).
    worker_class:
        The UDF class (a subclass of :class:`ActivationWorker`; tests inject failures).
    stats:
        If given, filled with ``actors``, ``contexts`` (computed in this call), ``seconds``
        (the actor pool's run), ``seconds_to_first_batch`` (actor start and model load
        included) and ``steady_contexts_per_second`` (after the first batch arrived).

    Returns
    -------
    np.ndarray
        Read-only memory map, float32 [layers, contexts, neurons].

    Raises
    ------
    NeuronprobeError
        For bad arguments, and for a worker's failure (a model that does not load, NaN
        activations), with the worker's message.
    """
    from tqdm.auto import tqdm

    tokens = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64))
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise NeuronprobeError("tokens must be a non-empty [contexts, positions] array.")
    if not -tokens.shape[1] <= position < tokens.shape[1]:
        raise NeuronprobeError(
            f"position {position} is outside the contexts ({tokens.shape[1]} tokens); use "
            f"-{tokens.shape[1]} to {tokens.shape[1] - 1} (-1 = the last token)."
        )
    if batch_size < 1:
        raise NeuronprobeError(f"--batch-size must be >= 1 (got {batch_size}).")
    with _session_if_needed(), _worker_errors(f"loading or running --model {model_name!r}"):
        ray = _ray()
        if model is not None and identity is not None:
            n_layers, width = len(hook_points(model, site)), site_width(model, site)
        else:
            describe = ray.remote(num_cpus=1, max_retries=1)(_describe_model)
            n_layers, width, reported = ray.get(describe.remote(model_name, site, dtype))
            identity = identity if identity is not None else reported
        assert identity is not None
        chosen = resolve_layers(layers, n_layers)
        shape = (len(chosen), tokens.shape[0], width)
        store = ActivationFile.for_path(
            path, activation_key(identity, tokens, chosen, site, position, shape, positive_ids)
        )
        finished = store.finished()
        if finished is not None:
            return finished
        out, logprob, done = store.open(shape)
        firsts = list(range(done, tokens.shape[0], batch_size))
        if num_gpus_per_actor is None:
            num_gpus_per_actor = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        if firsts:
            _extract_batches(
                ray,
                tokens,
                firsts,
                out,
                logprob,
                store,
                done,
                model_name=model_name,
                layers=chosen,
                site=site,
                position=position,
                positive_ids=positive_ids,
                batch_size=batch_size,
                device=device,
                dtype=dtype,
                num_actors=num_actors,
                num_gpus_per_actor=num_gpus_per_actor,
                num_cpus_per_actor=num_cpus_per_actor,
                max_restarts=max_restarts,
                worker_class=worker_class,
                stats=stats,
                bar=tqdm(
                    total=tokens.shape[0],
                    initial=done,
                    desc="activations",
                    unit=" contexts",
                    disable=not progress,
                ),
            )
        return store.finish(out, logprob)


def _extract_batches(
    ray: Any,
    tokens: np.ndarray,
    firsts: list[int],
    out: np.ndarray,
    logprob: np.ndarray | None,
    store: ActivationFile,
    done: int,
    *,
    model_name: str,
    layers: list[int],
    site: str,
    position: int,
    positive_ids: Sequence[int] | None,
    batch_size: int,
    device: str,
    dtype: str,
    num_actors: int | None,
    num_gpus_per_actor: float,
    num_cpus_per_actor: float,
    max_restarts: int,
    worker_class: type[ActivationWorker],
    stats: dict[str, Any] | None,
    bar: Any,
) -> None:
    """Run the batches starting at ``firsts`` on an actor pool; write them into ``out``."""
    import ray.data

    n_contexts, width = tokens.shape
    if num_actors is None:
        if num_gpus_per_actor > 0:
            num_actors = _cluster_workers("GPU", num_gpus_per_actor)
        else:
            num_actors = _cluster_workers("CPU", num_cpus_per_actor)
    num_actors = max(1, min(num_actors, len(firsts)))
    rows = []
    for first in firsts:
        count = min(batch_size, n_contexts - first)
        padded = np.zeros((batch_size, width), dtype=np.int64)
        padded[:count] = tokens[first : first + count]
        rows.append({"first": first, "count": count, "tokens": padded})
    logger.info(
        "extracting %d batches of %d contexts on %d Ray actors (%g GPUs, %g CPUs each)",
        len(rows),
        batch_size,
        num_actors,
        num_gpus_per_actor,
        num_cpus_per_actor,
    )
    remaining = set(firsts)
    # Batches finished past the first unfinished one: the progress file only ever says
    # "the first N contexts are done", so a resume never skips a missing batch.
    finished_ahead: set[int] = set()
    prefix = done
    with _data_context(), warnings.catch_warnings():
        # max_restarts and max_task_retries have no named parameter in Ray 2.60; passing them
        # as remote args warns that this way goes in Ray 2.64 (pinned: ray==2.60.0).
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            worker_class,
            fn_constructor_kwargs={
                "model_name": model_name,
                "layers": layers,
                "site": site,
                "position": position,
                "device": device,
                "dtype": dtype,
                "positive_ids": list(positive_ids) if positive_ids else None,
            },
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_cpus=num_cpus_per_actor,
            num_gpus=num_gpus_per_actor,
            max_restarts=max_restarts,
            max_task_retries=max_restarts,
        )
        started = time.perf_counter()
        first_arrival: float | None = None
        first_count = 0
        try:
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                if first_arrival is None:
                    first_arrival = time.perf_counter()
                    first_count = int(np.sum(batch["count"]))
                for first, count, values, answer in zip(
                    batch["first"].tolist(),
                    batch["count"].tolist(),
                    batch["values"],
                    batch["logprob"],
                    strict=True,
                ):
                    if first not in remaining:
                        logger.warning("batch at context %d arrived twice; kept the first", first)
                        continue
                    remaining.discard(first)
                    out[:, first : first + count] = values[:, :count]
                    if logprob is not None:
                        logprob[first : first + count] = answer[:count]
                    finished_ahead.add(first)
                    bar.update(count)
                    advanced = prefix
                    while advanced in finished_ahead:
                        finished_ahead.discard(advanced)
                        advanced = min(advanced + batch_size, n_contexts)
                    if advanced != prefix:
                        prefix = advanced
                        store.checkpoint(out, prefix, logprob)
        finally:
            bar.close()
    finished = time.perf_counter()
    if stats is not None:
        computed = sum(min(batch_size, n_contexts - first) for first in firsts)
        steady = computed - first_count
        stats.update(
            actors=num_actors,
            contexts=computed,
            seconds=finished - started,
            seconds_to_first_batch=(first_arrival or finished) - started,
            steady_contexts_per_second=(
                steady / (finished - first_arrival)
                if first_arrival is not None and finished > first_arrival and steady
                else float("nan")
            ),
        )
    if remaining:
        raise NeuronprobeError(
            f"the Ray cluster returned {len(firsts) - len(remaining)} of {len(firsts)} batches "
            f"(missing the batch at context {min(remaining)}); rerun to resume."
        )
