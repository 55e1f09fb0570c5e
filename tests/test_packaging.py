"""The wheel holds every module: an editable install hides a package missing from
pyproject's list, so build the wheel and import each module from it."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE_FOLDERS = ("api", "benchmarks", "deploy", "engine", "kernels", "scheduler", "worker")


def _source_modules() -> list[str]:
    modules = ["caldera"]
    for folder in CODE_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules.append(".".join(("caldera", *parts)))
    return modules


def test_wheel_contains_and_imports_every_module(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(ROOT)],
        check=True,
    )
    wheel = next((tmp_path / "dist").glob("caldera-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = _source_modules()
    for module in modules:
        parts = module.split(".")
        as_file = "/".join(parts) + ".py"
        as_package = "/".join(parts) + "/__init__.py"
        assert as_file in names or as_package in names, f"{module} is missing from the wheel"
    assert "caldera/engine/templates/mistral.jinja" in names
    assert "caldera/kernels/csrc/cpu_attention.cpp" in names
    assert {"caldera/api/static/index.html", "caldera/api/static/js/app.js"} <= names

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True)
    script = (
        "import importlib, sys\n"
        f"mods = {modules!r}\n"
        "for m in mods: importlib.import_module(m)\n"
        f"assert sys.modules['caldera'].__file__.startswith({str(target)!r})\n"
        "assert 'torch' in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path)
