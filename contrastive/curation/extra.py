"""The `curation` extra (pyarrow, faiss-cpu, py3langid, pyahocorasick): imported on first use, so a missing
library is one line naming the extra instead of an ImportError deep in a command."""

from __future__ import annotations

import importlib
from types import ModuleType

from contrastive.errors import ConfigError

_PACKAGES = {"pyarrow": "pyarrow", "pyarrow.parquet": "pyarrow", "faiss": "faiss-cpu", "py3langid": "py3langid",
             "ahocorasick": "pyahocorasick"}


def require(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ConfigError(f"{_PACKAGES[module]} is missing: install the curation extra "
                          f"(pip install 'contrastive[curation]'): {error}") from None
