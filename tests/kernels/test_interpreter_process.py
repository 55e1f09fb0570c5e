"""Runs the CPU (interpreter) kernel cases in a fresh process when this one cannot: that is
when triton was imported in compiled mode before the kernel tests' conftest switched the
interpreter on (see conftest.py). Skipped otherwise, since the cases then ran in-process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

KERNEL_TESTS = Path(__file__).parent


def test_interpreter_cases_in_a_fresh_process(interpreter_elsewhere):
    if not interpreter_elsewhere:
        pytest.skip("the interpreter cases ran in this process")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(KERNEL_TESTS)],
        cwd=KERNEL_TESTS.parents[1],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
