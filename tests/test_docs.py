"""The documentation site builds with `mkdocs build --strict`, as README.md says.

Strict mode turns every warning into a failure: a broken link or anchor, a page missing from
the nav, a docstring the API reference cannot parse. The build reads only local files.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Objects the API reference documents (docs/api.md), by the anchor mkdocstrings gives them.
DOCUMENTED = [
    "source_callback.SourceCallback",
    "source_callback.SourceTrainerCallback",
    "source_callback.analyze",
    "source_callback.AnalysisOptions",
    "source_callback.load_analysis",
    "source_callback.AnalysisResult",
    "source_callback.Task",
    "source_callback.LanguageModelingTask",
    "source_callback.open_run",
    "source_callback.Run",
    "source_callback.Checkpoint",
    "source_callback.Stage",
    "source_callback.report.write_report",
    "source_callback.evaluation.linear_datamodeling_score",
    "source_callback.ManifestMismatchError",
]


def test_docs_build_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's banner, not a warning
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = result.stdout + result.stderr
    assert "No module named mkdocs" not in output, 'install the docs: pip install -e ".[docs]"'
    assert result.returncode == 0, output

    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in DOCUMENTED:
        assert f'id="{name}"' in api, f"{name} is missing from the API reference"
    assert "SourceCallback" in api and "analyze" in api
    # Docstring parameters were parsed (numpy style), and Sphinx roles rendered as code.
    assert "checkpoints_per_stage" in api and "storage_options" in api
    assert not re.search(r":(class|func|meth|data):", api), "a Sphinx role was left in the API"

    for page in ("index.html", "getting-started/index.html", "concepts/index.html"):
        assert (site / page).is_file(), page
    # The pages load nothing from outside the site (no web fonts, no CDN scripts).
    for html in site.rglob("*.html"):
        text = html.read_text(encoding="utf-8")
        external = re.findall(r'<(?:script|link)[^>]+(?:src|href)="(https?://[^"]+)"', text)
        assert not external, f"{html.relative_to(site)} loads {external}"
