"""The docs site builds with no broken link, its reference pages come from the code, and every
setting, CLI option and metric has a description to show there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import Settings
from tests.support.gateway import ROOT

sys.path.insert(0, str(ROOT / "docs"))
import hooks

# What a page must not say: how the project was developed (history lives in git and CHANGELOG.md).
DIARY = re.compile(
    r"earlier (run|version)s?|this day|slow day|stage \d|not met|since then|"
    r"development machine|20\d\d-\d\d-\d\d(?!T)",
    re.IGNORECASE,
)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def test_the_site_builds_strictly_with_the_generated_reference_pages(site: Path) -> None:
    config = (site / "reference" / "configuration" / "index.html").read_text()
    for name in Settings.model_fields:
        assert f"IOTGW_{name.upper()}" in config, name
    cli = (site / "reference" / "cli" / "index.html").read_text()
    for name, _, _ in hooks.commands():
        assert name in cli, name
    metrics = (site / "reference" / "metrics" / "index.html").read_text()
    for name, *_ in hooks.metric_families():
        assert name in metrics, name
    assert "<!-- generated:" not in config + cli + metrics


def test_every_setting_option_and_metric_has_a_description() -> None:
    assert [n for n, f in Settings.model_fields.items() if not (f.description or "").strip()] == []
    bare = [
        f"{name} {a.option_strings or a.dest}"
        for name, _, parser in hooks.commands()
        for a in hooks.options(parser)
        if not (a.help or "").strip()
    ]
    assert bare == []
    assert [name for name, about, _ in hooks.commands() if not about.strip()] == []
    assert [name for name, _, doc, _ in hooks.metric_families() if not doc.strip()] == []


def test_the_readme_is_a_front_page_and_no_page_is_a_diary() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    found = [f"{p.relative_to(ROOT)}: {m.group(0)!r}" for p in pages for m in DIARY.finditer(p.read_text())]
    assert found == []
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).exists(), link
