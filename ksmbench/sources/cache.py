"""The one directory everything fetched or built is cached under."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$KSMBENCH_CACHE``, else ``~/.cache/ksmbench``."""
    env = os.environ.get("KSMBENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ksmbench"
