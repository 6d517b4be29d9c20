"""The HTML report (``write_report`` and ``source-callback report``) on a real record."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import struct
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import zarr
from models import TinyClassifier, loader, make_dataset, trainer

from source_callback import SourceCallback, analyze, load_analysis
from source_callback.cli import main
from source_callback.errors import AnalysisError
from source_callback.report import default_renderer, write_report
from source_callback.report.plots import (
    HISTOGRAM_BINS,
    score_histograms_figure,
    streamed_histogram,
)
from source_callback.report.render import MAX_TEXT
from source_callback.store.writer import StoreWriter

FEATURES = 16  # 4 x 4 "images", so that the default renderer draws them
PRETRAIN = make_dataset(48, features=FEATURES)
FINETUNE = make_dataset(40, features=FEATURES, seed=1)
QUERIES = make_dataset(5, features=FEATURES, seed=2)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHROMIUM = Path("/usr/bin/chromium")


def _two_groups(params: Any) -> torch.optim.Optimizer:
    w1, b1, w2, b2 = params
    return torch.optim.SGD([{"params": [w1, b1]}, {"params": [w2, b2], "lr": 0.02}], lr=0.05)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SGD + momentum with a step schedule (48 examples, 12 steps), then plain SGD with two
    param groups (40 examples, 5 steps); analyzed on 5 queries with 2 segments per stage."""
    root = tmp_path_factory.mktemp("report")
    path = root / "run.zarr"
    pl.seed_everything(0, verbose=False)
    model = TinyClassifier(
        features=FEATURES,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=4, gamma=0.5),
    )
    callback = SourceCallback(path, stage="pretrain", checkpoints_per_stage=2)
    trainer([callback], root, max_epochs=2).fit(model, loader(PRETRAIN))
    model.optimizer_factory, model.scheduler_factory = _two_groups, None
    callback.next_stage("finetune")
    trainer([callback], root, max_epochs=1).fit(model, loader(FINETUNE))
    analyze(
        path,
        model=TinyClassifier(features=FEATURES),
        task="classification",
        train={"pretrain": PRETRAIN, "finetune": FINETUNE},
        queries=QUERIES,
        segments=2,
        verbose=False,
    )
    return path


@pytest.fixture(scope="module")
def full_report(store: Path) -> str:
    """With the analysis and the training data: queries 0 and 4, top 3."""
    out = write_report(
        store,
        store.parent / "full.html",
        analysis="default",
        examples={"pretrain": PRETRAIN, "finetune": FINETUNE},
        queries=[0, 4],
        top=3,
    )
    return out.read_text(encoding="utf-8")


# -- checks of the page ------------------------------------------------------------------


def image_sources(page: str) -> list[str]:
    return re.findall(r'<img [^>]*src="([^"]*)"', page)


def png_size(uri: str) -> tuple[int, int]:
    """Width and height of a PNG data URI, from its signature and IHDR chunk."""
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix), uri[:60]
    data = base64.b64decode(uri[len(prefix) :], validate=True)
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def assert_self_contained(page: str) -> None:
    for value in re.findall(r'(?:src|href)="([^"]*)"', page):
        assert value.startswith(("data:image/png;base64,", "#")), value[:60]
    for forbidden in ("<script", "<link", "url(", "@import", "<iframe"):
        assert forbidden not in page


def section_ids(page: str) -> list[str]:
    return re.findall(r'<section id="([^"]+)">', page)


def stage_row(page: str, name: str) -> str:
    return next(row for row in page.split("<tr>") if f"<td>{name}</td>" in row)


def test_run_report_without_analysis(store: Path, tmp_path: Path) -> None:
    out = write_report(store, tmp_path / "run.html")
    assert out == tmp_path / "run.html"
    page = out.read_text(encoding="utf-8")
    assert section_ids(page) == ["run", "stages", "training"]
    assert "<h3>Learning rate</h3>" in page and "<h3>Loss</h3>" in page
    assert "<td>stored analyses</td><td>default</td>" in page  # listed, not shown
    pretrain = stage_row(page, "pretrain")
    for cell in (
        "0..11",
        ">12<",
        ">48<",
        "SGD (sgd-momentum, wd none)",
        "8 x 1 x 1",
        "3: 0, 6, 12",
    ):
        assert cell in pretrain, cell
    finetune = stage_row(page, "finetune")
    for cell in ("12..16", ">5<", ">40<", "SGD (sgd, wd none)", "3: 12, 14, 17"):
        assert cell in finetune, cell
    sizes = [png_size(uri) for uri in image_sources(page)]
    assert len(sizes) == 2 and all(w > 100 and h > 100 for w, h in sizes)
    assert_self_contained(page)


def test_report_with_analysis_and_examples(store: Path, full_report: str) -> None:
    page = full_report
    assert section_ids(page) == ["run", "stages", "training", "analysis", "top-examples"]
    for heading in ("Stage effects", "Score distributions"):
        assert f"<h3>{heading}</h3>" in page
    assert "shaded: the analysis&#x27;s segments" in page
    assert "<h3>Query 0</h3>" in page and "<h3>Query 4</h3>" in page
    assert "<h3>Query 1</h3>" not in page
    result = load_analysis(store)
    for query in (0, 4):
        helpful, harmful = result.top(query, k=3)
        for item in helpful + harmful:
            cells = f'<td class="number">{item.index}</td><td class="number">{item.score:+.3e}</td>'
            assert f"<td>{item.stage}</td>{cells}" in page
    figures = re.findall(r'<img class="figure" src="([^"]*)"', page)
    examples = re.findall(r'<img class="example" src="([^"]*)"', page)
    assert len(figures) == 4  # learning rate, loss, stage effects, score histograms
    assert len(examples) == 2 * 2 * 3  # queries x (helpful, harmful) x top
    assert all(png_size(uri) == (4, 4) for uri in examples)
    assert all(min(png_size(uri)) > 100 for uri in figures)
    assert len(image_sources(page)) == len(figures) + len(examples)
    assert_self_contained(page)


def test_custom_renderer(store: Path, tmp_path: Path) -> None:
    def renderer(stage: str, index: int, item: Any) -> str:
        return f'<span class="mine">{stage}/{index}/{int(item[1])}</span>'

    page = write_report(
        store,
        tmp_path / "custom.html",
        analysis="default",
        examples={"pretrain": PRETRAIN},  # none for the other stage: its examples are not shown
        renderer=renderer,
        top=4,
    ).read_text(encoding="utf-8")
    assert page.count("<h3>Query ") == 3  # the first three by default
    assert 'class="example"' not in page
    result = load_analysis(store)
    listed = [item for q in range(3) for side in result.top(q, k=4) for item in side]
    for item in listed:
        label = int(PRETRAIN[item.index][1]) if item.stage == "pretrain" else None
        shown = f'<span class="mine">{item.stage}/{item.index}/{label}</span>' in page
        assert shown == (item.stage == "pretrain")
    assert page.count('<span class="mine">') == sum(i.stage == "pretrain" for i in listed)


def test_report_of_an_analysis_result(store: Path, tmp_path: Path) -> None:
    result = load_analysis(store)
    page = write_report(store, tmp_path / "r.html", analysis=result, queries=[3], top=1)
    text = page.read_text(encoding="utf-8")
    assert "<p>5 queries.</p>" in text and "Stored as" not in text
    assert section_ids(text)[-2:] == ["analysis", "top-examples"]


def test_report_of_an_analysis_holding_non_finite_values(store: Path, tmp_path: Path) -> None:
    """An analysis stored before analyze refused non-finite values, its query 1 NaN throughout:
    no NaN or infinity is shown as a number, and the page says what it leaves out."""
    result = load_analysis(store)
    result.scores = {name: np.asarray(array[...]) for name, array in result.scores.items()}
    for values in result.scores.values():
        values[1] = np.nan
    result.stage_effects[1] = np.nan
    result.last_stage_exact[1] = np.inf
    page = write_report(store, tmp_path / "nan.html", analysis=result, queries=[0, 1], top=2)
    text = re.sub(r"<img [^>]*>", "", page.read_text(encoding="utf-8"))
    assert not re.search(r"[+-](nan|inf)\b", text, re.IGNORECASE)
    assert text.count("n/a (1 of 5 not finite)</td>") == 2  # each stage's mean effect
    assert "exact change for the last stage (mean n/a (1 of 5 not finite))" in text
    assert "Stage effects: pretrain n/a (not finite), finetune n/a (not finite)" in text
    assert (
        "This analysis holds NaN or infinite values, shown as n/a (not finite): 88 scores "
        "(pretrain 48, finetune 40) are left out of the histograms; the stage effects of "
        "queries 1 are not all drawn."
    ) in text
    assert text.count(">n/a (not finite)</td>") == 4  # query 1's top examples


def test_report_of_an_empty_store(tmp_path: Path) -> None:
    StoreWriter.open(str(tmp_path / "empty.zarr"))
    page = write_report(tmp_path / "empty.zarr", tmp_path / "empty.html").read_text()
    assert section_ids(page) == ["run", "stages"]
    assert "No stage recorded." in page
    assert image_sources(page) == []


def test_bad_arguments(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.html"
    with pytest.raises(ValueError, match="out of range: the analysis has 5 queries"):
        write_report(store, out, analysis="default", queries=[5])
    with pytest.raises(ValueError, match="pass analysis= too"):
        write_report(store, out, examples={"pretrain": PRETRAIN})
    with pytest.raises(ValueError, match="top must be at least 1"):
        write_report(store, out, top=0)
    with pytest.raises(KeyError, match="no stage 'sft'"):
        write_report(store, out, analysis="default", examples={"sft": PRETRAIN})
    with pytest.raises(AnalysisError, match="has 47 examples but the stage was trained on 48"):
        write_report(store, out, analysis="default", examples={"pretrain": make_dataset(47)})
    with pytest.raises(KeyError, match="no analysis 'other'"):
        write_report(store, out, analysis="other")
    assert not out.exists()


# -- the default renderer ----------------------------------------------------------------


def _histogram_case(case: str) -> np.ndarray:
    """``[3, 2500]`` scores: three blocks of 1,000 training examples when stored as below."""
    values = np.random.default_rng(3).standard_t(3, (3, 2500))
    values[1, 2400] += 50.0  # the range is set by the last block
    if case == "constant":
        values[:] = 0.25
    elif case == "empty":
        values = values[:, :0]
    elif case == "non-finite":
        values[0, :40] = np.nan
        values[1, 1500:1510] = np.inf
        values[2, -1] = -np.inf
    return values


@pytest.mark.parametrize("case", ["spread", "constant", "empty", "non-finite"])
def test_score_histograms_stream_equal_numpy(case: str, tmp_path: Path) -> None:
    """Two passes over stored blocks give np.histogram of all finite scores, and the same
    figure as the scores in memory."""
    values = _histogram_case(case)
    stored = zarr.create_array(
        tmp_path / "scores.zarr", shape=values.shape, chunks=(2, 1000), dtype="float64"
    )
    stored[...] = values
    finite = values[np.isfinite(values)]
    expected_counts, expected_edges = np.histogram(finite, HISTOGRAM_BINS)
    for scores in (stored, values):
        counts, edges, size = streamed_histogram(scores)
        np.testing.assert_array_equal(edges, expected_edges)
        np.testing.assert_array_equal(counts, expected_counts)
        assert size == finite.size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no positive count to log-scale (empty)
        figures = [
            score_histograms_figure({"s": s, "t": -values}, ["s", "t"]) for s in (stored, values)
        ]
    assert figures[0] == figures[1]
    png, left_out = figures[0]
    assert png.startswith(PNG_SIGNATURE)
    assert left_out == {"s": values.size - finite.size, "t": values.size - finite.size}


def rendered_png_sizes(fragment: str) -> list[tuple[int, int]]:
    return [png_size(uri) for uri in image_sources(fragment)]


def test_default_renderer_draws_images() -> None:
    assert rendered_png_sizes(default_renderer("s", 0, torch.rand(28 * 28))) == [(28, 28)]
    assert rendered_png_sizes(default_renderer("s", 0, torch.rand(1, 5, 7))) == [(7, 5)]
    assert rendered_png_sizes(default_renderer("s", 0, np.random.rand(3, 4, 6))) == [(6, 4)]
    assert rendered_png_sizes(default_renderer("s", 0, np.zeros((6, 4, 3), np.uint8))) == [(4, 6)]
    pair = default_renderer("stage", 7, (torch.rand(16), torch.tensor(3)))
    assert rendered_png_sizes(pair) == [(4, 4)]
    assert 'alt="stage #7"' in pair and '<span class="text">3</span>' in pair


def test_default_renderer_writes_text_escaped() -> None:
    tokens = default_renderer("s", 0, torch.tensor([101, 2023, 102]))
    assert tokens == '<span class="text">[101, 2023, 102]</span>'
    assert default_renderer("s", 0, torch.rand(6)).startswith('<span class="text">[0.')
    text = default_renderer("s", 0, "<script>alert(1)</script> & co")
    assert text == '<span class="text">&lt;script&gt;alert(1)&lt;/script&gt; &amp; co</span>'
    item = {"input_ids": torch.arange(500), "<label>": 1}
    rendered = default_renderer("s", 0, item)
    assert rendered.startswith('input_ids: <span class="text">[0, 1, 2')
    assert rendered.endswith('&lt;label&gt;: <span class="text">1</span>')
    ids = re.search(r'<span class="text">(\[0, 1.*?)</span>', rendered).group(1)
    assert len(ids) == MAX_TEXT and ids.endswith("…")


# -- the command line --------------------------------------------------------------------


def report(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["report", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_report_shows_indices_and_scores(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli.html"
    args = (str(store), "--analysis", "default", "--out", str(out), "--queries", "1", "2")
    code, stdout, err = report(capsys, *args, "--top", "2")
    assert (code, stdout, err) == (0, f"wrote {out}\n", "")
    page = out.read_text(encoding="utf-8")
    assert section_ids(page)[-2:] == ["analysis", "top-examples"]
    assert "<h3>Query 1</h3>" in page and "<h3>Query 2</h3>" in page
    assert page.count("<h3>Query ") == 2
    assert "--data MODULE:FUNCTION" in page  # says how to show the examples
    assert 'class="example"' not in page
    assert all(png_size(uri) for uri in image_sources(page))


def test_cli_report_with_data(
    store: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "report_test_data.py").write_text(
        "from models import make_dataset\n\n\n"
        "def datasets():\n"
        f"    return {{'pretrain': make_dataset(48, features={FEATURES}),\n"
        f"            'finetune': make_dataset(40, features={FEATURES}, seed=1)}}\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "report_test_data", raising=False)
    path_before = list(sys.path)
    out = tmp_path / "data.html"
    args = (str(store), "--analysis", "default", "--out", str(out), "--top", "1")
    code, _, err = report(capsys, *args, "--data", "report_test_data:datasets")
    sys.modules.pop("report_test_data", None)
    assert (code, err) == (0, "")
    assert sys.path == path_before
    examples = re.findall(r'<img class="example" src="([^"]*)"', out.read_text(encoding="utf-8"))
    assert len(examples) == 3 * 2 * 1
    code, _, err = report(capsys, *args, "--data", "report_test_data:absent")
    assert code == 1 and "has no function or class 'absent'" in err


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("{absent}",), 1, "source-callback: error: no store at "),
        (("{store}", "--analysis", "other"), 1, "source-callback: error: no analysis 'other' in "),
        (("{store}", "--analysis", "default", "--queries", "9"), 1, "query 9 is out of range"),
        (("{store}", "--analysis", "default", "--out", "{tmp}/no/r.html"), 1, "no directory "),
        (("{store}", "--analysis", "default", "--data", "no_such_module_q:f"), 1, "cannot import"),
        (("{store}", "--queries", "1"), 2, "--queries and --data need --analysis NAME"),
        (("{store}", "--analysis", "default", "--data", "nocolon"), 2, "MODULE:FUNCTION"),
        (("{store}", "--top", "0"), 2, "expected a positive integer"),
        (("{store}", "--analysis"), 2, "expected one argument"),
        (("{store}", "-o", "novalue"), 2, "KEY=VALUE"),
    ],
)
def test_cli_report_errors(
    store: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: tuple[str, ...],
    code: int,
    message: str,
) -> None:
    values = {"store": str(store), "absent": str(tmp_path / "absent.zarr"), "tmp": str(tmp_path)}
    filled = [a.format(**values) for a in args]
    result, out, err = report(capsys, "--out", str(tmp_path / "r.html"), *filled)
    assert (result, out) == (code, "")
    assert message in err
    assert "Traceback" not in err
    if code == 1:
        assert err.count("\n") == 1  # one line
    assert not (tmp_path / "r.html").exists()


def test_cli_report_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--help"]) == 0
    help_text = capsys.readouterr().out
    for option in ("--analysis", "--out", "--queries", "--top", "--data", "--storage-option"):
        assert option in help_text
    assert main(["--help"]) == 0
    assert "report" in capsys.readouterr().out


# -- in a browser ------------------------------------------------------------------------

# Injected before the page's own <head> content (so before its content security policy): it
# records errors, policy violations and console errors, and after the load event writes the
# state of every image into the DOM, which --dump-dom prints.
MONITOR = """<script>
var problems = [];
var consoleError = console.error;
console.error = function () {
  problems.push("console.error: " + Array.from(arguments).join(" "));
  consoleError.apply(console, arguments);
};
addEventListener("error", function (e) {
  problems.push("error: " + (e.message || (e.target && e.target.outerHTML.slice(0, 80))));
}, true);
document.addEventListener("securitypolicyviolation", function (e) {
  problems.push("blocked: " + e.blockedURI);
});
addEventListener("load", function () {
  var images = Array.from(document.images);
  var check = document.createElement("pre");
  check.id = "browser-check";
  check.textContent = JSON.stringify({
    images: images.length,
    broken: images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
      .map(function (i) { return i.alt; }),
    problems: problems,
  });
  document.body.appendChild(check);
});
</script>"""


def open_in_chromium(page: str, tmp_path: Path) -> tuple[dict[str, Any], list[str]]:
    """Load ``page`` in headless Chromium: the monitor's findings and the console log lines."""
    path = tmp_path / "checked.html"
    path.write_text(page.replace("<head>", "<head>" + MONITOR, 1), encoding="utf-8")
    result = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            path.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    found = re.search(r'<pre id="browser-check">(.*?)</pre>', result.stdout, re.DOTALL)
    assert found, f"no result from Chromium (exit {result.returncode}): {result.stderr[-3000:]}"
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    return json.loads(html.unescape(found.group(1))), console


#: ``.ci/run`` sets this once it has installed Chromium, so that in CI the browser tests run (and
#: fail if Chromium cannot start) instead of skipping.
REQUIRE_BROWSER = os.environ.get("SOURCE_CALLBACK_REQUIRE_BROWSER") == "1"

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists() and not REQUIRE_BROWSER,
    reason="headless Chromium not installed (/usr/bin/chromium, Debian package 'chromium')",
)


@needs_chromium
def test_every_image_renders_in_chromium(full_report: str, tmp_path: Path) -> None:
    check, console = open_in_chromium(full_report, tmp_path)
    assert check["images"] == len(image_sources(full_report)) == 4 + 12
    assert check["broken"] == []
    assert check["problems"] == []
    assert console == []


@needs_chromium
def test_the_browser_check_sees_broken_and_external_images(
    full_report: str, tmp_path: Path
) -> None:
    broken = full_report.replace(
        "</body>",
        '<img src="data:image/png;base64,AAAA" alt="bad png">'
        '<img src="http://127.0.0.1:9/x.png" alt="external"></body>',
    )
    check, console = open_in_chromium(broken, tmp_path)
    assert check["images"] == 4 + 12 + 2
    assert sorted(check["broken"]) == ["bad png", "external"]
    assert "blocked: http://127.0.0.1:9/x.png" in check["problems"]
    assert any("Content Security Policy" in line for line in console)
