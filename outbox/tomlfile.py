"""Reading a TOML file with one-line errors: the configuration file, mapping files. Standard library only."""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from outbox.errors import ConfigError


def load_file(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
