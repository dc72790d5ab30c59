"""Where npidbench keeps things on disk: the feature cache, generated data and results."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def cache_root() -> Path:
    """The user's npidbench cache folder (``NPIDBENCH_CACHE_HOME``, else XDG, else ~/.cache)."""
    explicit = os.environ.get("NPIDBENCH_CACHE_HOME")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "npidbench"


def feature_cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The feature cache: ``--cache DIR``, else ``NPIDBENCH_CACHE``, else under cache_root()."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("NPIDBENCH_CACHE")
    return Path(env).expanduser() if env else cache_root() / "features"


def synthetic_data_dir() -> Path:
    """Where the embedded synthetic suite is generated on first use (``NPIDBENCH_DATA``)."""
    env = os.environ.get("NPIDBENCH_DATA")
    return Path(env).expanduser() if env else cache_root() / "data"


def results_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Result records: ``--results DIR``, else ``NPIDBENCH_RESULTS``, else ./results."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("NPIDBENCH_RESULTS")
    return Path(env).expanduser() if env else Path("results")


def preset_dir(kind: str) -> Path:
    """The folder of shipped TOML presets: ``tasks`` (benchmarks) or ``pretrain`` (recipes).

    A wheel carries them as the data package ``npidbench.presets.<kind>``; an editable install
    or a plain checkout reads the top-level folder of the repository directly.
    """
    try:
        spec = importlib.util.find_spec(f"npidbench.presets.{kind}")
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parent.parent / kind
