"""Run-directory files appear whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from neuronprobe.rundir import atomic_path, read_json, write_json


def test_failed_write_leaves_neither_the_file_nor_a_temporary(tmp_path: Path) -> None:
    target = tmp_path / "neurons.parquet"
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_bytes(b"half a table")
        raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "run.json"
    write_json(target, {"status": "complete"})
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text("{ broken")
        raise RuntimeError
    assert read_json(target) == {"status": "complete"}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_a_folder_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "history" / "earlier"
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.mkdir()
        (temporary / "neurons.csv").write_text("layer,neuron\n")
        raise RuntimeError("killed mid-copy")
    assert list((tmp_path / "history").iterdir()) == []
    with atomic_path(target) as temporary:
        temporary.mkdir()
        (temporary / "neurons.csv").write_text("layer,neuron\n")
    assert [p.name for p in target.iterdir()] == ["neurons.csv"]


def test_the_lock_clears_what_a_killed_writer_left_and_refuses_a_second_writer(
    tmp_path: Path,
) -> None:
    import subprocess
    import sys

    from neuronprobe.errors import NeuronprobeError
    from neuronprobe.rundir import locked

    # A process killed inside atomic_path leaves its temporary behind (here: never cleaned up).
    script = (
        "import os, pathlib; from neuronprobe.rundir import atomic_path\n"
        f"with atomic_path(pathlib.Path({str(tmp_path / 'figures' / 'layers.png')!r})) as t:\n"
        "    t.write_bytes(b'half'); os._exit(9)\n"
    )
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    (left,) = (tmp_path / "figures").iterdir()
    assert left.name.startswith(".layers.png.partial-")
    write_json(tmp_path / "run.json", {"status": "running"})
    with locked(tmp_path):
        assert list((tmp_path / "figures").iterdir()) == []
        assert (tmp_path / "run.json").is_file()  # finished files stay
        # Another process cannot take the lock while this one holds it.
        other = subprocess.run(
            [
                sys.executable,
                "-c",
                f"from neuronprobe.rundir import locked\nwith locked({str(tmp_path)!r}): pass",
            ],
            capture_output=True,
            text=True,
        )
        assert other.returncode == 1 and "another neuronprobe process" in other.stderr
    with locked(tmp_path):  # released
        pass
    with pytest.raises(NeuronprobeError, match="is a file"), locked(tmp_path / "run.json"):
        pass


def test_decoding_csv_is_checked_against_run_json(tmp_path: Path) -> None:
    """decoding.csv must have decode_layers' columns and the rows run.json records; its figure
    is listed with the others."""
    import pandas as pd

    from neuronprobe.decoding import DECODING_COLUMNS
    from neuronprobe.rundir import _COLUMNS, DECODING, figure_files, file_problem

    assert _COLUMNS[DECODING] == DECODING_COLUMNS
    table = pd.DataFrame({column: [0, 1] for column in DECODING_COLUMNS})
    table.to_csv(tmp_path / DECODING, index=False)
    record = {"decoding": {"rows": 2, "figures": ["decoding"]}}
    assert file_problem(tmp_path, DECODING, record) is None
    assert file_problem(tmp_path, DECODING, {"decoding": {"rows": 3}}) == (
        "holding 2 rows, but run.json records 3"
    )
    table.drop(columns="cv_auc").to_csv(tmp_path / DECODING, index=False)
    assert file_problem(tmp_path, DECODING, record) == ("without the column 'cv_auc' in its header")
    assert figure_files(tmp_path, record, ("decoding",)) == [
        "figures/decoding.png",
        "figures/decoding.svg",
    ]
    both = {**record, "statistics": {"figures": ["layers"]}}
    assert figure_files(tmp_path, both)[-2:] == ["figures/decoding.png", "figures/decoding.svg"]
