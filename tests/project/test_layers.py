"""The import rules (import-linter contracts in pyproject.toml): the platform knows no plugin
(`gateway` imports neither `alerts` nor `analytics`), the plugins do not import each other, the
core is pure (no database, network or runtime) and the log knows no consumer, client or API."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.gateway import ROOT

LINT = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("gateway", "alerts", "analytics", "devices")


def lint(where: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(where)}
    return subprocess.run([str(LINT), "--no-cache"], cwd=where, env=env, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip


def test_the_platform_imports_no_plugin_and_plugins_not_each_other() -> None:
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "4 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "source", "contract", "chain"),
    [
        # A lazy import inside a function counts too.
        ("gateway/sneaky.py", "def f():\n    from alerts.engine import AlertEngine\n",
         "the platform never imports a plugin", "gateway.sneaky -> alerts.engine"),
        ("gateway/core/sneaky.py", "def f():\n    import sqlalchemy\n",
         "the core is pure", "gateway.core.sneaky -> sqlalchemy"),
        ("gateway/core/sneaky.py", "import httpx\n", "the core is pure", "gateway.core.sneaky -> httpx"),
        ("gateway/core/sneaky.py", "from psycopg import sql\n", "the core is pure", "gateway.core.sneaky -> psycopg"),
        ("gateway/log/sneaky.py", "from gateway.runtime import BaseConsumer\n",
         "the log knows no consumer", "gateway.log.sneaky -> gateway.runtime"),
    ],
)  # fmt: skip
def test_a_module_breaking_an_import_rule_fails_the_lint(
    tmp_path: Path, module: str, source: str, contract: str, chain: str
) -> None:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    (tmp_path / module).write_text(source)
    done = lint(tmp_path)
    assert done.returncode != 0
    broken = [line for line in done.stdout.splitlines() if line.endswith(" BROKEN")]
    assert len(broken) == 1, done.stdout[-3000:]
    assert broken[0].startswith(contract)
    assert chain in done.stdout
