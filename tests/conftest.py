"""Shared fixtures: the project's sample photos (real grocery product photos, MIT) and their cleaned form."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_RAW = REPO / "data" / "sample" / "raw"


@pytest.fixture(scope="session")
def sample_raw() -> Path:
    return SAMPLE_RAW


@pytest.fixture(scope="session")
def cleaned_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample cleaned once at 64 px for the tests of later steps (read-only for them)."""
    from shopvision.components.data.clean import clean

    out = tmp_path_factory.mktemp("sample") / "clean"
    clean(SAMPLE_RAW, out, size=64, workers=2)
    return out
