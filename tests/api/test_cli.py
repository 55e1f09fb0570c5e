"""The ``caldera`` command as a user runs it: one-shot generation and the interactive chat."""

from __future__ import annotations

import shutil
import subprocess
import sys

from support import make_image


def _caldera(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("caldera") or sys.executable
    prefix = [] if exe.endswith("caldera") else ["-m", "caldera.api.cli"]
    return subprocess.run([exe, *prefix, *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


def test_generate_with_image(llava15_dir, tmp_path):
    image = tmp_path / "photo.png"
    make_image(120, 160).save(image)
    result = _caldera("generate", "--model", str(llava15_dir), "--image", str(image),
                      "--prompt", "What is shown in this image?", "--max-tokens", "5",
                      "--kv-cache-memory", "16MiB", "--max-model-len", "2048")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "5 tokens, finish=length" in result.stderr


def test_generate_reports_bad_image_path(llava15_dir, tmp_path):
    result = _caldera("generate", "--model", str(llava15_dir), "--image",
                      str(tmp_path / "missing.png"), "--kv-cache-memory", "16MiB",
                      "--max-model-len", "2048")
    assert result.returncode == 2
    assert "caldera: error:" in result.stderr and "missing.png" in result.stderr
    assert "Traceback" not in result.stderr


def test_interactive_chat(next_mistral_dir, tmp_path):
    image = tmp_path / "photo.png"
    make_image(300, 200).save(image)
    session = f"/image {image}\nWhat is in it?\nAnd again?\n/reset\nHello\n/exit\n"
    result = _caldera("chat", "--model", str(next_mistral_dir), "--max-tokens", "4",
                      "--kv-cache-memory", "32MiB", "--max-model-len", "4096", stdin=session)
    assert result.returncode == 0, result.stderr
    assert "[image attached: 1 pending]" in result.stderr
    replies = [line for line in result.stdout.split("> ") if line.strip()]
    assert len(replies) == 3
