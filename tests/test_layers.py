"""The platform knows no plugin: `gateway` imports neither `alerts` nor `analytics`, and the
plugins do not import each other (import-linter contracts in pyproject.toml)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("gateway", "alerts", "analytics", "devices")


def lint(where: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(where)}
    return subprocess.run([str(LINT), "--no-cache"], cwd=where, env=env, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip


def test_the_platform_imports_no_plugin_and_plugins_not_each_other() -> None:
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "2 kept, 0 broken" in done.stdout


def test_a_platform_module_importing_a_plugin_breaks_the_contract(tmp_path: Path) -> None:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    # A lazy import inside a function counts too.
    (tmp_path / "gateway" / "sneaky.py").write_text("def f():\n    from alerts.engine import AlertEngine\n")
    done = lint(tmp_path)
    assert done.returncode != 0
    assert "the platform never imports a plugin BROKEN" in done.stdout
    assert "gateway.sneaky -> alerts.engine" in done.stdout
