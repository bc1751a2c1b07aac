"""Where the project's real data sets live (``shared/data`` beside the checkout), if present."""

from __future__ import annotations

from pathlib import Path

import pytest


def _find_shared_data() -> Path | None:
    for parent in Path(__file__).resolve().parents:
        if (parent / "shared" / "data").is_dir():
            return parent / "shared" / "data"
    return None


SHARED = _find_shared_data()
needs_shared = pytest.mark.skipif(SHARED is None, reason="shared/data not available")
