"""Fixtures of the robustness tests; their helpers are in tests/robustness_support.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from robustness_support import ImageHost
from server_support import OpenAISchemas


@pytest.fixture(scope="module")
def image_host() -> Iterator[ImageHost]:
    host = ImageHost()
    yield host
    host.close()


@pytest.fixture(scope="module")
def schemas() -> OpenAISchemas:
    return OpenAISchemas()
