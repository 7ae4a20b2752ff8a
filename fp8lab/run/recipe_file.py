"""Loading a recipe file: a small Python module whose ``config()`` returns a RunConfig.

Invariant: the recipe's module is imported under a private name and only its
``config()`` is called; a file without one, or one returning something else, is a
``ConfigError`` naming the file.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fp8lab.run.config import ConfigError, RunConfig


def load_recipe(path: str | Path) -> RunConfig:
    """Import ``path`` and return its ``config()``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"_fp8lab_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ConfigError as err:
        raise ConfigError(f"recipe {path}: {err}") from None
    except Exception as err:  # a broken recipe file: say which and how
        raise ConfigError(f"recipe {path} failed to load: {type(err).__name__}: {err}") from None
    if not callable(getattr(module, "config", None)):
        raise ConfigError(f"recipe {path} must define a function config() returning a RunConfig")
    try:
        config = module.config()
    except (ConfigError, ValueError) as err:
        raise ConfigError(f"recipe {path}: {err}") from None
    if not isinstance(config, RunConfig):
        raise ConfigError(f"recipe {path}: config() returned {type(config).__name__}, not a RunConfig")
    return config
