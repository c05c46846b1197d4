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
