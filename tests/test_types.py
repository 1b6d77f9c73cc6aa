"""The typed public API passes mypy, as configured in pyproject.toml's ``[tool.mypy]`` (the checked
modules, and every function of the public ones annotated)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_public_api_type_checks():
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (it comes with the dev extras: pip install -e '.[dev]')")
    # The files come from the configuration; the cache (.mypy_cache) makes a repeated run take seconds.
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"mypy reports errors:\n{result.stdout}{result.stderr}"
