"""The scheduler package is pure Python: importing it must not import torch."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_scheduler_does_not_import_torch():
    code = (
        "import sys\n"
        "import caldera.scheduler\n"
        "import caldera.scheduler.scheduler\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
