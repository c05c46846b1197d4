"""Stage 6: the HTML report of a real run says what the run directory holds, in one file.

The run is real (a small random GPT-2 saved with save_pretrained, the real GPT-2 tokenizer, the
real movie reviews), recorded at layers 1 and 3 only, so that a layer's number and its index in
``activations.npy`` differ. One test opens the report in Debian's real Chromium, driven over the
Chrome DevTools Protocol on a pipe (no Python package needed); it is skipped where
``/usr/bin/chromium`` is missing, except on CI (``CI`` set), where that is a failure.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import os
import re
import select
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from neuronprobe import RunConfig, run
from neuronprobe.decoding import decode_layers
from neuronprobe.errors import NeuronprobeError
from neuronprobe.figures import control_figure, decoding_figure, save_figure
from neuronprobe.report import SECTIONS, example_contexts, top_neurons, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
LAYERS = [1, 3]
TOP, EXAMPLES = 4, 3


@pytest.fixture(scope="module")
def tiny_run(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    config = RunConfig(model=str(tiny_gpt2_dir), min_per_class=40, seed=3, layers=LAYERS)
    return run(config, tmp_path_factory.mktemp("runs") / "tiny", progress=False)


def ensure_decoding(directory: Path) -> None:
    """The decoding stage's files (decoding.csv from the real decode_layers on the run's
    activations, its figure, run.json's entry) where the run wrote none, so that the page has
    every section of report.SECTIONS."""
    if (directory / "decoding.csv").is_file():
        return
    record = json.loads((directory / "run.json").read_text())
    labels = pd.read_parquet(directory / "contexts.parquet")["label"].to_numpy(dtype=bool)
    activations = np.load(directory / "activations.npy", mmap_mode="r")
    table = decode_layers(
        activations, labels, k=(1, 5, None), layers=record["activations"]["layers"]
    )
    table.to_csv(directory / "decoding.csv", index=False)
    model_auc = record.get("behavior", {}).get("auc")
    save_figure(decoding_figure(table, model_auc=model_auc), directory / "figures" / "decoding")
    record["decoding"] = {"file": "decoding.csv", "rows": len(table), "figures": ["decoding"]}
    (directory / "run.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def report(tiny_run: Any) -> tuple[Path, str]:
    ensure_decoding(tiny_run.directory)
    path = write_report(tiny_run.directory, top=TOP, examples=EXAMPLES)
    return path, path.read_text(encoding="utf-8")


def section(page: str, anchor: str) -> str:
    """The HTML of one ``<section id=anchor>``."""
    start = page.index(f'<section id="{anchor}">')
    return page[start : page.index("</section>", start)]


def test_report_is_one_self_contained_file(tiny_run: Any, report: tuple[Path, str]) -> None:
    path, page = report
    assert path == tiny_run.directory / "report.html" and path.is_file()
    assert not list(tiny_run.directory.glob(".report.html*"))  # written atomically
    # Every figure of the run directory (the shuffled-label control and the decoding among
    # them), as a PNG data URI.
    figures = sorted((tiny_run.directory / "figures").glob("*.png"))
    assert len(figures) == 5 and (tiny_run.directory / "figures" / "control.png") in figures
    assert (tiny_run.directory / "figures" / "decoding.png") in figures
    embedded = DATA_URI.findall(page)
    assert page.count("data:image/png;base64,") == len(embedded) == len(figures)
    from matplotlib.image import imread

    for data in embedded:
        png = base64.b64decode(data, validate=True)
        assert png.startswith(PNG_SIGNATURE) and len(png) > len(PNG_SIGNATURE)
        height, width = imread(io.BytesIO(png), format="png").shape[:2]
        assert height > 100 and width > 100
    for figure in figures:  # the stored figures themselves, byte for byte
        assert base64.b64encode(figure.read_bytes()).decode() in embedded
    # Nothing outside the file: no URL, no script, no external source or link.
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower()
    assert set(re.findall(r'src="([a-z]+):', page)) == {"data"}
    assert all(href.startswith("#") for href in re.findall(r'href="([^"]*)"', page))
    assert "Content-Security-Policy" in page


def test_report_says_what_was_asked_on_what(report: tuple[Path, str], tiny_run: Any) -> None:
    _, page = report
    record = tiny_run.record
    question = section(page, "question")
    contrast = record["contrast"]
    assert f"<code>{contrast['target_id']}</code>" in question  # 460, " can" in GPT-2
    assert f"<code>{contrast['positive_ids']}</code>" in question  # [[470]], "'t"
    assert f"<code>{contrast['excluded_ids']}</code>" in question
    data = section(page, "data")
    assert record["model"]["weights_sha256"] in data
    assert record["model"]["architecture"] in data
    assert record["corpus"]["sha256"] in data
    counts = record["counts"]
    for key in (
        "documents_scanned",
        "found_positive",
        "found_negative",
        "duplicates_dropped_positive",
        "duplicates_dropped_negative",
        "kept_per_class",
    ):
        assert re.search(rf"<td>{counts[key]:,}</td>", data), key
    assert html.escape("duplicates dropped, “can't”") in data
    rerun = section(page, "rerun")
    assert f"neuronprobe run --config {tiny_run.directory}/run.json" in rerun
    assert f"neuronprobe probe --out {tiny_run.directory}" in rerun
    for package, version in record["versions"].items():
        assert f"<th>{package}</th><td>{version}</td>" in rerun


def test_report_answers_first_with_the_control(report: tuple[Path, str], tiny_run: Any) -> None:
    _, page = report
    neurons, layers = tiny_run.neurons, tiny_run.layers
    answer = section(page, "answer")
    assert f"<b>{int(neurons['significant'].sum()):,} of {len(neurons):,} neurons" in answer
    assert f"<b>{int(layers['significant_shuffled'].sum()):,}</b> of {len(neurons):,}" in answer
    if neurons["significant"].any():
        ranked = layers.sort_values(["percent_significant", "layer"], ascending=[False, True])
        best = ranked.iloc[0]
        assert f"{int(best.layer)} ({best.percent_significant:.1f}%)" in answer
    else:  # the random tiny model: nothing passes, and the report says so
        assert "this run gives no evidence that single neurons carry the distinction" in answer
    caveats = section(page, "caveats")
    assert f"<b>{int(neurons['separated'].sum()):,}</b> of {len(neurons):,} neurons separate" in (
        caveats
    )
    assert "Bonferroni per layer" in caveats and "0.05 / 256 neurons" in caveats


def test_laminar_table_has_one_row_per_layer(report: tuple[Path, str], tiny_run: Any) -> None:
    _, page = report
    table = section(page, "layers")
    body = table[table.index("<tbody>") : table.index("</tbody>")]
    rows = re.findall(r"<tr>(.*?)</tr>", body)
    assert len(rows) == len(LAYERS)
    for row, layer in zip(rows, tiny_run.layers.itertuples(), strict=True):
        cells = re.findall(r"<td class=num>(.*?)</td>", row)
        assert cells[0] == str(layer.layer) and cells[2] == f"{layer.significant:,}"
        assert cells[3] == f"{layer.percent_significant:.1f}%"


def test_top_neurons_and_their_extreme_contexts(report: tuple[Path, str], tiny_run: Any) -> None:
    _, page = report
    directory = tiny_run.directory
    neurons = tiny_run.neurons
    test = tiny_run.record["statistics"]["test"]
    chosen = top_neurons(neurons, TOP, test=test)
    if chosen.empty:  # a random model may have none: the report then shows the closest ones
        chosen = top_neurons(neurons, TOP, significant_only=False, test=test)
    assert len(chosen) == TOP
    contexts = pd.read_parquet(directory / "contexts.parquet")
    activations = np.load(directory / "activations.npy", mmap_mode="r")
    shown = section(page, "neurons")
    blocks = shown.split('<div class="neuron" id="neuron-')[1:]
    assert [block.split('"')[0] for block in blocks] == [
        f"{row.layer}-{row.neuron}" for row in chosen.itertuples()
    ]
    for block, row in zip(blocks, chosen.itertuples(), strict=True):
        # activations.npy is indexed by the layer's position among the recorded layers.
        values = activations[LAYERS.index(row.layer), :, row.neuron]
        order = np.argsort(values, kind="stable")
        expected = np.concatenate([order[::-1][:EXAMPLES], order[:EXAMPLES]])
        found = re.findall(r"<tr><td class=num>(-?\d+\.\d{3})</td>", block)
        assert found == [f"{values[i]:.3f}" for i in expected]
        assert block.count("<mark>") == 2 * EXAMPLES
        for i in expected:
            assert f"<code>{contexts['document_id'].iloc[i]}</code>" in block
    assert shown.count('<span class="ctx">') == 2 * EXAMPLES * TOP


def test_report_of_a_real_model_names_its_significant_neurons(
    smollm2: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # SmolLM2 on 60 contexts per class, three layers, Benjamini-Hochberg on the likelihood-ratio
    # test: a few dozen neurons pass, none with shuffled labels.
    config = RunConfig(min_per_class=60, layers=[0, 3, 9], correction="fdr-bh", test="lr")
    result = run(config, tmp_path_factory.mktemp("runs") / "smollm2", progress=False)
    neurons = result.neurons
    significant = int(neurons["significant"].sum())
    assert significant > 0
    page = write_report(result.directory, top=5, examples=2).read_text(encoding="utf-8")
    answer = section(page, "answer")
    assert f"<b>{significant:,} of {len(neurons):,} neurons" in answer
    ranked = result.layers.sort_values(["percent_significant", "layer"], ascending=[False, True])
    top_layer = ranked.iloc[0]
    assert f"<b>{int(top_layer.layer)} ({top_layer.percent_significant:.1f}%)" in answer
    assert f"<b>{int(neurons['significant_shuffled'].sum())}</b> of" in answer
    best = neurons[neurons["significant"]].sort_values("test_acc", ascending=False).iloc[0]
    assert f"reaches {best.test_acc:.1f}%" in answer
    shown = section(page, "neurons")
    assert "No neuron is significant" not in shown
    chosen = top_neurons(neurons, 5, test="lr")
    assert chosen["significant"].all() and len(chosen) == min(5, significant)
    body = shown[shown.index("<tbody>") : shown.index("</tbody>")]
    rows = re.findall(r"<tr>(.*?)</tr>", body)
    assert len(rows) == len(chosen)
    for row, neuron in zip(rows, chosen.itertuples(), strict=True):
        cells = re.findall(r"<td class=num>(.*?)</td>", row)
        assert cells[1:3] == [str(neuron.layer), str(neuron.neuron)]
        assert f"{neuron.test_acc:.1f}%" in cells
    # The examples of a layer-3 neuron come from index 1 of activations.npy.
    activations = np.load(result.directory / "activations.npy", mmap_mode="r")
    for neuron in chosen.itertuples():
        block = shown.split(f'id="neuron-{neuron.layer}-{neuron.neuron}"')[1]
        block = block.split('<div class="neuron"')[0]
        values = activations[[0, 3, 9].index(neuron.layer), :, neuron.neuron]
        found = re.findall(r"<tr><td class=num>(-?\d+\.\d{3})</td>", block)
        assert found[0] == f"{values.max():.3f}" and found[2] == f"{values.min():.3f}"
    assert "Benjamini-Hochberg" in section(page, "caveats")
    assert "http://" not in page and "https://" not in page


def test_example_contexts_are_the_true_extremes(tiny_run: Any) -> None:
    directory = tiny_run.directory
    contexts = pd.read_parquet(directory / "contexts.parquet")
    activations = np.load(directory / "activations.npy", mmap_mode="r")
    for layer_index, neuron in [(0, 0), (1, 17), (1, 255)]:
        values = np.asarray(activations[layer_index, :, neuron])
        found = example_contexts(contexts, activations, layer_index, neuron, 5)
        assert found["end"].tolist() == ["highest"] * 5 + ["lowest"] * 5
        highest = found[found["end"] == "highest"]
        lowest = found[found["end"] == "lowest"]
        assert highest["context"].iloc[0] == int(np.argmax(values))
        assert lowest["context"].iloc[0] == int(np.argmin(values))
        np.testing.assert_array_equal(highest["activation"], np.sort(values)[::-1][:5])
        np.testing.assert_array_equal(lowest["activation"], np.sort(values)[:5])
        np.testing.assert_array_equal(highest["context"], np.argsort(-values, kind="stable")[:5])
        np.testing.assert_array_equal(lowest["context"], np.argsort(values, kind="stable")[:5])
        rows = contexts.iloc[found["context"]]
        assert found["text"].tolist() == rows["text"].tolist()
        assert found["class"].tolist() == rows["class"].tolist()
        assert found["document_id"].tolist() == rows["document_id"].tolist()
        assert found["rank"].tolist() == [1, 2, 3, 4, 5] * 2
    # Ties go to the earlier context; k is capped at the number of contexts.
    flat = np.zeros((1, 4, 1), dtype=np.float32)
    table = pd.DataFrame({"text": list("abcd"), "class": "x", "document_id": list("pqrs")})
    both = example_contexts(table, flat, 0, 0, 10)
    assert both["context"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    with pytest.raises(ValueError, match="3 contexts but the table has 4"):
        example_contexts(table, np.zeros((1, 3, 1)), 0, 0, 1)


def test_top_neurons_order() -> None:
    table = pd.DataFrame(
        {
            "layer": [0, 0, 0, 1, 1, 1, 1],
            "neuron": [0, 1, 2, 0, 1, 2, 3],
            "beta": [0.5, -2.0, 1.0, 3.0, -0.1, 9.0, 1.0],
            "pvalue": [1e-3, 1e-5, 1e-5, 2e-5, 1e-8, np.nan, 0.5],
            "pvalue_lr": [1e-3, 1e-5, 2e-6, 1e-5, 1e-8, 0.9, 0.5],
            "pvalue_adj": [4e-3, 4e-5, 4e-5, 4e-5, 4e-8, np.nan, 1.0],
            "significant": [True, True, True, True, True, False, False],
        }
    )

    def order(**kwargs: Any) -> list[tuple[int, int]]:
        rows = top_neurons(table, kwargs.pop("n", 10), **kwargs)
        return list(zip(rows["layer"], rows["neuron"], strict=True))

    # pvalue_adj first; its three-way tie at 4e-5 by the larger |beta| ...
    assert order() == [(1, 1), (1, 0), (0, 1), (0, 2), (0, 0)]
    # ... or, given the deciding test, by its raw p-value first.
    assert order(test="lr") == [(1, 1), (0, 2), (1, 0), (0, 1), (0, 0)]
    assert order(test="wald") == [(1, 1), (0, 1), (0, 2), (1, 0), (0, 0)]
    assert order(n=2) == [(1, 1), (1, 0)]
    # Without the significance filter NaN p-values come last.
    assert order(significant_only=False)[-2:] == [(1, 3), (1, 2)]
    assert top_neurons(table, 3).index.tolist() == [4, 3, 1]  # the table's own rows
    with pytest.raises(ValueError, match="test must be"):
        top_neurons(table, 3, test="t")


def test_control_figure_shows_real_and_shuffled(tiny_run: Any) -> None:
    layers = tiny_run.layers
    figure = control_figure(layers)
    real, shuffled = figure.axes[0].containers
    np.testing.assert_allclose([bar.get_height() for bar in real], layers["percent_significant"])
    np.testing.assert_allclose(
        [bar.get_height() for bar in shuffled], layers["percent_significant_shuffled"]
    )
    assert f"{int(layers['significant_shuffled'].sum())} with shuffled labels" in (
        figure.axes[0].get_title()
    )
    with pytest.raises(ValueError, match="no shuffled-label control"):
        control_figure(layers.drop(columns=["significant_shuffled"]))


def test_same_run_gives_the_same_report(tiny_run: Any, report: tuple[Path, str]) -> None:
    _, page = report
    again = write_report(tiny_run.directory, top=TOP, examples=EXAMPLES)
    assert again.read_text(encoding="utf-8") == page


def test_corpus_text_is_shown_as_text_never_as_markup_or_link(
    tiny_run: Any, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_run.directory, copy)
    contexts = pd.read_parquet(copy / "contexts.parquet")
    # Put a URL and markup into every context, keeping each context's final " can".
    hostile = 'see https://example.com/a?b=1&c=<script>alert("x")</script> http://x.org I can'
    contexts["text"] = hostile
    contexts["next_text"] = "<b>"
    contexts.to_parquet(copy / "contexts.parquet", index=False)
    record = json.loads((copy / "run.json").read_text())
    record["corpus"]["file"] = "https://example.com/corpus.csv"
    (copy / "run.json").write_text(json.dumps(record))
    page = write_report(copy, top=1, examples=1).read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "https:&#47;&#47;example.com/a?b=1&amp;c=&lt;script&gt;" in page
    assert "&lt;/script&gt; http:&#47;&#47;x.org I <mark>can</mark>" in page
    assert ">&lt;b&gt;</span>" in page


def test_markup_and_template_syntax_in_the_data_are_shown_as_text(
    tiny_run: Any, tmp_path: Path
) -> None:
    """The page is a Jinja2 template: text from the corpus or run.json that holds a script, a
    Jinja expression or a Jinja statement is shown as those characters, never run or rendered."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_run.directory, copy)
    contexts = pd.read_parquet(copy / "contexts.parquet")
    hostile = "<script>alert(1)</script> {{ 7 * 7 }} {% if true %}yes{% endif %} {# c #} I can"
    contexts["text"] = hostile
    contexts["document_id"] = "{{ config }}<i>"
    contexts.to_parquet(copy / "contexts.parquet", index=False)
    record = json.loads((copy / "run.json").read_text())
    record["contrast"]["description"] = "{% raw %}<b>bold</b>{{ 6 * 7 }}"
    record["model"]["name"] = "{{ 1 + 1 }}</title><script>x</script>"
    (copy / "run.json").write_text(json.dumps(record))
    page = write_report(copy, top=2, examples=2).read_text(encoding="utf-8")
    assert "<script" not in page.lower() and "}}<i>" not in page and "<b>bold" not in page
    shown = (
        "&lt;script&gt;alert(1)&lt;/script&gt; {{ 7 * 7 }} {% if true %}yes{% endif %} {# c #} "
        "I <mark>can</mark>"
    )
    assert page.count(f'<span class="ctx">{shown}') == 2 * 2 * 2  # 2 neurons x 2 ends x 2
    assert page.count("<code>{{ config }}&lt;i&gt;</code>") == 2 * 2 * 2
    assert "<i>{% raw %}&lt;b&gt;bold&lt;/b&gt;{{ 6 * 7 }}</i>" in section(page, "question")
    title = "neuronprobe: which neurons of {{ 1 + 1 }}&lt;/title&gt;&lt;script&gt;x&lt;/script&gt;"
    assert f"<title>{title}" in page and f"<h1>{title}" in page


def test_a_section_is_a_partial_and_a_function(
    tiny_run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """report.SECTIONS is the page's plan: a new partial and its function appear where they are
    listed, in the body and the contents, with no edit to the skeleton; None leaves one out."""
    import jinja2

    from neuronprobe import report

    (tmp_path / "sections").mkdir()
    (tmp_path / "sections" / "extra.html.j2").write_text(
        "<p>{{ data.sentence }} of {{ facts.total|count }} neurons.</p>\n", encoding="utf-8"
    )
    environment = report._environment()
    assert environment.autoescape is True
    extended = environment.overlay(
        loader=jinja2.ChoiceLoader([environment.loader, jinja2.FileSystemLoader(tmp_path)])
    )
    monkeypatch.setattr(report, "_environment", lambda: extended)
    sections = (
        report.SECTIONS[0],
        report.Section(
            "extra", "An extra section", lambda run, facts, options: {"sentence": "<b>"}
        ),
        report.Section("absent", "Never shown", lambda run, facts, options: None),
        *report.SECTIONS[1:],
    )
    monkeypatch.setattr(report, "SECTIONS", sections)
    copy = tmp_path / "copy"  # the module's run keeps its report for the tests after this one
    shutil.copytree(tiny_run.directory, copy)
    page = write_report(copy, top=1, examples=1).read_text(encoding="utf-8")
    # A section whose run has nothing for it (no interventions.parquet, no decoding.csv) is
    # left out too.
    record = json.loads((copy / "run.json").read_text())
    has = {
        "interventions": (copy / "interventions.parquet").is_file(),
        "decoding": (copy / "decoding.csv").is_file() or "skipped" in record.get("decoding", {}),
    }
    absent = {"absent"} | {anchor for anchor, present in has.items() if not present}
    shown = [s.anchor for s in sections if s.anchor not in absent]
    assert re.findall(r'<section id="([a-z]+)">', page) == shown
    assert re.findall(r'<li><a href="#([a-z]+)">', page) == shown
    assert section(page, "extra") == (
        '<section id="extra"><h2>An extra section</h2>\n<p>&lt;b&gt; of 512 neurons.</p>\n'
    )
    assert "absent" not in page and "Never shown" not in page


def test_the_templates_are_package_data() -> None:
    """A wheel carries the templates: pyproject's package-data globs match every file of
    src/neuronprobe/templates (a template missing from them would break pip-installed reports)."""
    import tomllib

    root = Path(__file__).parents[1]
    package = root / "src" / "neuronprobe"
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["neuronprobe"]
    covered = {path for pattern in globs for path in package.glob(pattern)}
    files = {path for path in (package / "templates").rglob("*") if path.is_file()}
    assert files and files == covered
    assert {p.name for p in (package / "templates" / "sections").glob("*.j2")} == {
        f"{s.anchor}.html.j2" for s in SECTIONS
    }


def test_a_directory_without_results_is_refused(tiny_run: Any, tmp_path: Path) -> None:
    with pytest.raises(NeuronprobeError, match="no run.json"):
        write_report(tmp_path)
    shutil.copy(tiny_run.directory / "run.json", tmp_path / "run.json")
    with pytest.raises(NeuronprobeError, match="has no neurons.parquet"):
        write_report(tmp_path)
    assert not (tmp_path / "report.html").exists()


# ----------------------------------------------------------------------------------------------
# The report in a real browser
# ----------------------------------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # as root, as on CI containers
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-pipe",
]


class DevTools:
    """The Chrome DevTools Protocol over ``--remote-debugging-pipe``: Chromium reads JSON
    commands from its fd 3 and writes answers and events to its fd 4, each ended by a NUL."""

    def __init__(self, chromium: Path, profile: Path, log: Path) -> None:
        import fcntl

        to_chromium, self._commands = os.pipe()
        self._answers, from_chromium = os.pipe()
        # Above 4, so that placing them at 3 and 4 in the child cannot overwrite one another.
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_chromium, from_chromium)]
        os.close(to_chromium)
        os.close(from_chromium)
        actions = [
            (os.POSIX_SPAWN_DUP2, ends[0], 3),
            (os.POSIX_SPAWN_DUP2, ends[1], 4),
            (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ]
        argv = [str(chromium), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"]
        self.pid = os.posix_spawn(
            str(chromium), argv, os.environ, file_actions=actions, setsid=True
        )
        for fd in ends:
            os.close(fd)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """Send one command and return its result; events that arrive meanwhile are kept."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._receive(deadline - time.monotonic())
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return dict(answer.get("result", {}))
            self.events.append(answer)

    def wait_for(self, method: str, timeout: float = 30.0) -> dict[str, Any]:
        """Wait for an event; return it."""
        deadline = time.monotonic() + timeout
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._receive(deadline - time.monotonic())
            self.events.append(event)
            if event.get("method") == method:
                return event

    def _receive(self, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._answers], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._answers, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return dict(json.loads(message))

    def close(self) -> None:
        """Close the browser; kill its process group if it does not exit in time."""
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            self.send("Browser.close", timeout=5.0)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if os.waitpid(self.pid, os.WNOHANG)[0]:
                break
            time.sleep(0.05)
        else:
            os.killpg(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self._commands)
        os.close(self._answers)


RENDERED = """
Promise.all(Array.from(document.images).map(img => img.decode().catch(() => null).then(() => ({
    width: img.naturalWidth, height: img.naturalHeight, complete: img.complete,
    scheme: img.src.split(':')[0]}))))
  .then(images => ({images, marks: document.querySelectorAll('mark').length,
                    sections: document.querySelectorAll('section').length,
                    title: document.title}))
"""


def chromium_or_skip() -> Path:
    if CHROMIUM.is_file():
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing on CI: install Debian's chromium package")
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")


def test_report_renders_in_a_real_browser(report: tuple[Path, str], tmp_path: Path) -> None:
    chromium = chromium_or_skip()
    path, page = report
    log = tmp_path / "chromium.log"
    browser = DevTools(chromium, tmp_path / "profile", log)
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Runtime", "Log", "Page", "Network"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Page.navigate", {"url": path.as_uri()}, session)
        browser.wait_for("Page.loadEventFired")
        rendered = browser.send(
            "Runtime.evaluate",
            {"expression": RENDERED, "awaitPromise": True, "returnByValue": True},
            session,
        )["result"]["value"]
    finally:
        browser.close()
    problems = [
        event
        for event in browser.events
        if event.get("method") == "Runtime.exceptionThrown"
        or (
            event.get("method") == "Runtime.consoleAPICalled"
            and event["params"]["type"] in ("error", "assert")
        )
        or (
            event.get("method") == "Log.entryAdded" and event["params"]["entry"]["level"] == "error"
        )
        or event.get("method") == "Network.loadingFailed"
    ]
    assert not problems, (problems, log.read_text(errors="replace")[-2000:])
    requested = {
        event["params"]["request"]["url"].split(":")[0]
        for event in browser.events
        if event.get("method") == "Network.requestWillBeSent"
    }
    assert requested <= {"file", "data"}  # the page itself; nothing from any network
    images = rendered["images"]
    assert len(images) == page.count("data:image/png;base64,") == 5
    for image in images:
        assert image["complete"] and image["scheme"] == "data"
        assert image["width"] > 0 and image["height"] > 0
    assert rendered["marks"] == page.count("<mark>") > 0
    # Every section of report.SECTIONS; interventions.parquet is there, without rows (this
    # random model has no significant neuron to change), and its section says so; decoding.csv
    # is there too.
    assert rendered["sections"] == len(SECTIONS) == page.count("<section id=") == 10
    assert rendered["title"].startswith("neuronprobe: which neurons of")


def test_report_asks_a_contrast_with_negative_followers(
    tiny_gpt2_dir: Path, tmp_path: Path
) -> None:
    """ "I'm" against "I am": the question names the negative followers and their token ids,
    and says nothing about exclusions (there are none), never an empty "other than"."""
    from neuronprobe.contexts import Contrast

    contrast = Contrast.from_toml(
        Path(__file__).parents[1] / "examples" / "contrasts" / "im-i-am.toml"
    )
    config = RunConfig(model=str(tiny_gpt2_dir), min_per_class=10, layers=[3], contrast=contrast)
    result = run(config, tmp_path / "im", progress=False)
    page = (result.directory / "report.html").read_text(encoding="utf-8")
    question = section(page, "question")
    assert result.record["contrast"]["negative_ids"] == [[716]]  # " am" in GPT-2
    assert f"followers that make a context “{html.escape('I am')}”" in question
    assert "<code>[[716]]</code>" in question and "<code>&#x27; am&#x27;</code>" in question
    assert "excluded" not in question and "other than" not in page
    assert f"“{html.escape('I am')}”" in page.split("<h1>", 1)[1].split("</h1>", 1)[0]
