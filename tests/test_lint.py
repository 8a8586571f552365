"""ruff and mypy (configured in pyproject.toml: [tool.ruff], [tool.mypy]) report nothing on the package.

Run inside the test command so that CI's closing line stays pytest's and a finding fails the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("tool", [["ruff", "check", "differad_rl", "integrations"], ["mypy"]], ids=["ruff", "mypy"])
def test_no_findings(tool):
    pytest.importorskip(tool[0])
    done = subprocess.run([sys.executable, "-m", *tool], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
