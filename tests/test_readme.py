"""The README's code runs as written, and its tables and synopsis name what the code has."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

README = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def test_readme_python_blocks_run_as_written(
    smollm2: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every ```python block, in order, in one namespace, in a fresh folder: no NameError, and
    the second run of a finished run still has its figures."""
    from matplotlib.figure import Figure

    blocks = _python_blocks()
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    for number, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {number + 1}", "exec"), namespace)
    result = namespace["result"]
    assert isinstance(result.figures["layers"], Figure)
    assert result.record.get("resumed"), "the second call reads the finished run back"
    assert namespace["fits"].beta.shape == (30, 1536)
    decoding = namespace["decoding"]
    assert decoding["layer"].tolist() == [20, 20, 20, 21, 21, 21]
    assert decoding["k"].tolist() == ["1", "10", "all"] * 2
    assert decoding["neurons_used"].tolist() == [1, 10, 1536] * 2
    assert (tmp_path / "runs" / "seed1" / "report.html").is_file()
    assert len(list((tmp_path / "runs" / "seed1" / "history").iterdir())) == 1  # the refit's
    effects = namespace["effects"]
    assert set(effects["layer"]) <= set(range(30)) | {-1} and set(effects["k_label"]) == {"10"}
    assert namespace["redone"].record["interventions"]["random_draws"] == 3


def _config_table() -> dict[str, str]:
    """The README's table of config-file keys: {key: option cell}."""
    section = README.split("The keys, and the options that set them:", 1)[1]
    rows = re.findall(r"^\| `([a-z_.]+)` \| ([^|]*) \|", section.split("\n\n", 2)[1], flags=re.M)
    return dict(rows)


def test_config_table_lists_every_key_and_real_options() -> None:
    from neuronprobe import cli
    from neuronprobe.config import RunConfig
    from neuronprobe.contexts import Contrast

    table = _config_table()
    keys = {field.name for field in dataclasses.fields(RunConfig)}
    keys |= {f"contrast.{field.name}" for field in dataclasses.fields(Contrast)}
    assert set(table) == keys
    cli.build_parser()
    options = {
        option
        for parser in cli._COMMANDS.values()
        for action in parser._actions
        for option in action.option_strings
    }
    for key, cell in table.items():
        for option in re.findall(r"--(?:\[no-\])?[a-z-]+", cell):
            for spelled in {option.replace("[no-]", ""), option.replace("[no-]", "no-")}:
                assert spelled in options, (key, spelled)


def test_synopsis_names_every_option_and_only_real_ones() -> None:
    from neuronprobe import cli

    cli.build_parser()
    synopsis = README.split("## Command line", 1)[1].split("```", 2)[1]
    named = set(re.findall(r"--[a-z][a-z-]*", synopsis.replace("[no-]", "")))
    named |= {
        option.replace("--", "--no-", 1)
        for option in re.findall(r"--\[no-\]([a-z-]+)", synopsis)
        for option in ["--" + option]
    }
    for command in ("run", "probe", "intervene", "decode", "report", "contexts", "activations"):
        parser = cli._COMMANDS[command]
        for action in parser._actions:
            for option in action.option_strings:
                if option.startswith("--") and option not in ("--help",):
                    assert option in named, (command, option)
    real = {
        option
        for parser in cli._COMMANDS.values()
        for action in parser._actions
        for option in action.option_strings
    }
    assert named <= real | {"--version"}, named - real


def test_readme_config_file_example_loads(tmp_path: Path) -> None:
    from neuronprobe.config import RunConfig

    (block,) = re.findall(r"```toml\n(.*?)```", README, flags=re.DOTALL)
    path = tmp_path / "my-run.toml"
    path.write_text(block, encoding="utf-8")
    config = RunConfig.from_file(path)
    assert (config.seed, config.layers, config.correction) == (1, [0, 3, -1], "fdr-bh")
    assert (config.contrast.target, config.contrast.positive_followers) == (" will", (" not",))
    assert config.contrast.excluded_followers == ()
