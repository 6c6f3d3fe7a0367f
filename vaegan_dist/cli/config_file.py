"""Settings from a YAML or JSON file (`vaegan-train --config FILE`): a mapping of TrainConfig's field names, and
optionally `preset`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from vaegan_dist.config import ConfigError


def refuse_repeats(keys: list[Any]) -> None:
    """A key given twice in one mapping is an error (not: the last one wins)."""
    if duplicate := next((key for i, key in enumerate(keys) if key in keys[:i]), None):
        raise ConfigError(f"setting {duplicate!r} is given twice: keep one")


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing repeated keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        refuse_repeats([self.construct_object(key, deep=deep) for key, _ in node.value])
        return super().construct_mapping(node, deep)


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook, refusing repeated keys."""
    refuse_repeats([key for key, _ in pairs])
    return dict(pairs)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The settings in a YAML or JSON file (by its suffix, .json; anything else is read as YAML)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not text: give a YAML or JSON file") from None
    try:
        values = (json.loads(text, object_pairs_hook=unique_keys) if path.suffix == ".json"
                  else yaml.load(text, Loader=UniqueKeyLoader))
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"config file {path} does not parse: {str(err).splitlines()[0]}") from None
    except ConfigError as err:
        raise ConfigError(f"config file {path}: {err}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of setting names to values")
    return values
