"""Settings: the defaults are the notebook's, round-trip through run.json, and bad values are named."""

from __future__ import annotations

import json

import pytest

from neuronprobe.config import RunConfig
from neuronprobe.contexts import Contrast
from neuronprobe.errors import NeuronprobeError


def test_defaults_are_the_notebooks_analysis() -> None:
    config = RunConfig()
    assert (config.model, config.corpus, config.site) == (
        "smollm2-135m",
        "movie-reviews",
        "mlp.pre",
    )
    assert (config.alpha, config.test_size, config.min_per_class) == (0.1, 0.2, 500)
    # The notebook's figure layer, 3, where it is recorded; else the first recorded layer.
    assert config.figure_layer is None
    assert config.resolved_figure_layer(list(range(30))) == 3
    assert config.resolved_figure_layer([29]) == 29
    assert RunConfig(figure_layer=-1).resolved_figure_layer([28, 29], n_layers=30) == 29
    with pytest.raises(
        NeuronprobeError, match=r"--layer 5 is not among the recorded layers \[29\]"
    ):
        RunConfig(figure_layer=5).resolved_figure_layer([29])
    contrast = config.contrast
    assert (contrast.target, contrast.positive_followers, contrast.context_length) == (
        " can",
        ("'t",),
        10,
    )
    assert contrast.excluded_followers == (" of", " with", " from", " in", " on", " for", " not")


def test_engine_ray_is_the_alias_of_executor_ray() -> None:
    """One setting for the statistics engine, one for where the heavy stages run; earlier
    run.json files and config files with engine = "ray" still mean the Ray executor."""
    assert (RunConfig().engine, RunConfig().executor) == ("fast", "local")
    aliased = RunConfig.from_dict({"engine": "ray"})
    assert (aliased.engine, aliased.executor) == ("fast", "ray")
    both = RunConfig(engine="statsmodels", executor="ray")
    assert RunConfig.from_dict(json.loads(json.dumps(both.to_dict()))) == both
    with pytest.raises(NeuronprobeError, match="--executor must be one of local, ray"):
        RunConfig(executor="dask")


def test_config_round_trips_through_json() -> None:
    config = RunConfig(
        seed=4, layers=[0, 5], contrast=Contrast(target=" will", positive_followers=(" not",))
    )
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"modle": "gpt2"}, r"unknown config key\(s\) \['modle'\]"),
        (
            {"contrast": {"target": " can", "follower": "'t"}},
            r"unknown contrast key\(s\) \['follower'\]",
        ),
        ({"test_size": 1.5}, "--test-size must be between 0 and 1"),
        ({"alpha": 0}, "--alpha must be a positive number"),
        ({"min_per_class": 0}, "--min-per-class must be at least 2"),
        ({"batch_size": 0}, "--batch-size must be >= 1"),
        ({"contrast": {"positive_followers": []}}, "at least one positive follower"),
        ({"contrast": {"context_length": 0}}, r"context_length \(--context-length\) must be at"),
        (
            {"contrast": {"negative_followers": [" am"], "excluded_followers": [" of"]}},
            "exclusions belong to the default negative rule",
        ),
        ({"decode_cv": 1}, r"--decode-cv must be at least 2 folds \(got 1\)"),
        ({"decode_k": ["0"]}, "--decode-k 0: a probe reads at least 1 neuron"),
        ({"decode_k": []}, "--decode-k must list numbers of neurons or 'all'"),
        ({"decode_k": "ten"}, "config key 'decode_k' must be list"),
    ],
)
def test_bad_settings_are_named(values: dict, message: str) -> None:
    with pytest.raises(NeuronprobeError, match=message):
        RunConfig.from_dict(values)


def test_shipped_contrast_examples_load_and_the_default_is_the_notebooks() -> None:
    from pathlib import Path

    examples = sorted((Path(__file__).parents[1] / "examples" / "contrasts").glob("*.toml"))
    assert [p.stem for p in examples] == ["can-cant", "do-not", "im-i-am", "will-not", "wont-won"]
    contrasts = {p.stem: Contrast.from_toml(p) for p in examples}
    assert contrasts["can-cant"] == Contrast()
    assert contrasts["wont-won"].positive_followers == ("'t",)
    assert contrasts["im-i-am"] == Contrast(
        target=" I",
        positive_followers=("'m",),
        negative_followers=(" am",),
        excluded_followers=(),
        context_length=10,
        positive_name="I'm",
        negative_name="I am",
    )


def test_contrast_file_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(NeuronprobeError, match="no such file"):
        Contrast.from_toml(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("target = ")
    with pytest.raises(NeuronprobeError, match="broken.toml is not valid TOML"):
        Contrast.from_toml(broken)
    typed = tmp_path / "typed.toml"
    typed.write_text('target = " can"\ncontext_length = "ten"\n')
    with pytest.raises(NeuronprobeError, match="context_length must be an integer"):
        Contrast.from_toml(typed)


def test_decode_k_is_read_in_order_once_and_bad_values_are_one_line() -> None:
    from neuronprobe.config import (
        DEFAULT_DECODE_K,
        check_decode_cv,
        check_decode_k,
        decode_k_sizes,
        parse_decode_k,
    )

    config = RunConfig()
    assert (config.decoding, config.decode_k, config.decode_cv) == (
        True,
        ["1", "2", "5", "10", "20", "50", "100", "all"],
        5,
    )
    assert config.decode_k == list(DEFAULT_DECODE_K)
    # Increasing, the whole layer last, each once, however written.
    assert parse_decode_k("all, 5,1,05,ALL") == ["1", "5", "all"]
    assert parse_decode_k([20, "all", 3]) == ["3", "20", "all"]
    assert RunConfig(decode_k=["all", "2"]).decode_k == ["2", "all"]
    assert decode_k_sizes(["1", "5", "all"]) == [1, 5, None]
    for bad, message in [
        ("-3", "--decode-k -3: a probe reads at least 1 neuron (or 'all', the whole layer)"),
        ("1,ten", "--decode-k takes numbers of neurons or 'all', e.g. 1,5,all (got 'ten')"),
        ([True], "--decode-k takes numbers of neurons or 'all'"),
        ("", "--decode-k takes numbers of neurons or 'all'"),
    ]:
        with pytest.raises(NeuronprobeError) as refused:
            parse_decode_k(bad)
        assert message in str(refused.value) and "\n" not in str(refused.value), bad
    # Above the layer's width: a size given is refused, the default list drops those sizes.
    assert check_decode_k(["1", "64", "all"], 64) == ["1", "64", "all"]
    with pytest.raises(
        NeuronprobeError,
        match=r"--decode-k 100 is more neurons than a layer has at this site \(64\); use at "
        "most 64, or 'all'",
    ):
        check_decode_k(["1", "100", "all"], 64)
    assert check_decode_k(list(DEFAULT_DECODE_K), 64) == ["1", "2", "5", "10", "20", "50", "all"]
    # Folds the smaller class cannot fill.
    check_decode_cv(5, 5, "the run has")
    with pytest.raises(
        NeuronprobeError,
        match=r"--decode-cv 5 needs at least 5 contexts of each class and the run has 3; use "
        r"--decode-cv 3 or fewer, or --no-decoding\.$",
    ):
        check_decode_cv(5, 3, "the run has")
    with pytest.raises(NeuronprobeError, match=r"use --decode-cv 3 or fewer\.$"):
        check_decode_cv(5, 3, "the run has", in_run=False)
    # Through run.json and back.
    chosen = RunConfig(decoding=False, decode_k=["3", "all"], decode_cv=4)
    assert RunConfig.from_dict(json.loads(json.dumps(chosen.to_dict()))) == chosen
