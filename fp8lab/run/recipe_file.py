"""Loading a recipe file: a small Python module whose ``config()`` returns a RunConfig.

Invariant: the recipe's module is imported under a private name and only its
``config()`` is called; a file that is missing, unreadable, fails to import, exits,
has no ``config()``, whose ``config()`` raises or returns something else, is a
``ConfigError`` naming the file (and the recipe line that failed). Ctrl-C still
interrupts a recipe that hangs.
"""

from __future__ import annotations

import importlib.util
import traceback
from pathlib import Path

from fp8lab.run.config import ConfigError, RunConfig


def _line(err: BaseException, path: Path) -> str:
    """' at line N' of the innermost frame of ``err`` inside the recipe file, or ''."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if Path(f.filename) == path]
    return f" at line {frames[-1].lineno}" if frames else ""


def load_recipe(path: str | Path) -> RunConfig:
    """Import ``path`` and return its ``config()``."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"recipe file {str(path)!r} is a folder; name a recipe .py file, e.g. recipes/quickstart.py")
    if not path.is_file():
        raise ConfigError(f"recipe file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"_fp8lab_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ConfigError as err:
        raise ConfigError(f"recipe {path}: {err}") from None
    except OSError as err:
        raise ConfigError(f"recipe {path} cannot be read: {err.strerror or err}") from None
    except SystemExit as err:  # a recipe is not a script: exiting would end fp8lab "successfully"
        raise ConfigError(
            f"recipe {path} exited while loading (SystemExit({err.code!r}){_line(err, path)}); "
            "a recipe only defines config()"
        ) from None
    except Exception as err:  # a broken recipe file: say which and how
        raise ConfigError(f"recipe {path} failed to load{_line(err, path)}: {type(err).__name__}: {err}") from None
    if not callable(getattr(module, "config", None)):
        raise ConfigError(f"recipe {path} must define a function config() returning a RunConfig")
    try:
        config = module.config()
    except ConfigError as err:
        raise ConfigError(f"recipe {path}: {err}") from None
    except SystemExit as err:
        raise ConfigError(
            f"recipe {path}: config() exited (SystemExit({err.code!r}){_line(err, path)}); it must return a RunConfig"
        ) from None
    except Exception as err:  # the recipe's own code failed: a user error, shown as one line
        raise ConfigError(f"recipe {path}: config() raised{_line(err, path)}: {type(err).__name__}: {err}") from None
    if not isinstance(config, RunConfig):
        raise ConfigError(f"recipe {path}: config() returned {type(config).__name__}, not a RunConfig")
    return config
