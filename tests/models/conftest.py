"""Fixtures of the model-zoo tests: one lazily filled, session-wide build directory.

``models`` is a repository-root package (not installed with bnfold); pytest's ``pythonpath = ["."]``
(pyproject.toml) makes it importable.
"""

from __future__ import annotations

from pathlib import Path

import pytest

try:
    from models.build import Variant, build_variant
except ImportError:  # torch missing: the zoo cannot be built (pip install -e '.[test]')
    collect_ignore_glob = ["test_models_*.py"]


class ZooCache:
    """Builds each (model, variant) at most once per test session, into one temporary directory."""

    def __init__(self, root: Path):
        self.root = root
        self._built: dict[tuple[str, Variant], Path] = {}

    def get(self, name: str, variant: Variant) -> Path:
        key = (name, variant)
        if key not in self._built:
            self._built[key] = build_variant(name, variant, self.root)
        return self._built[key]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> ZooCache:
    return ZooCache(tmp_path_factory.mktemp("zoo"))
