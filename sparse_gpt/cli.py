"""Command-line config parsing shared by train.py and the benchmarks.

    --config PATH[:PRESET]      a Python file with get_config(preset) (default: the presets
                                in sparse_gpt/config.py, preset tiny)
    --config.SECTION.KEY=VALUE  override one field; the value is parsed to the field's type
    --workdir DIR               run folder

Errors name the problem and the fix (an unknown key lists the keys of its section).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from typing import Sequence

import ml_collections

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.py")


class ConfigError(ValueError):
    """A bad --config path, preset or override."""


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads ``PATH[:PRESET]`` by calling ``get_config(PRESET)`` of the file at PATH."""
    path, _, preset = spec.partition(":")
    path = path or DEFAULT_CONFIG
    if not os.path.isfile(path):
        raise ConfigError(f"Config file {path!r} does not exist; pass --config PATH[:PRESET], "
                          f"e.g. --config {os.path.relpath(DEFAULT_CONFIG)}:tiny.")
    if not path.endswith(".py"):
        raise ConfigError(f"--config {path}: not a Python file; pass a config file defining "
                          f"get_config(preset), e.g. --config {os.path.relpath(DEFAULT_CONFIG)}"
                          ":tiny.")
    module_spec = importlib.util.spec_from_file_location("_sparse_gpt_config", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # a config is code: any error in it is the file's, not ours
        where = f" line {e.lineno}" if isinstance(e, SyntaxError) and e.lineno else ""
        raise ConfigError(f"--config {path}{where} does not load ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); fix that file or pass "
                          "another.") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(preset) function.")
    return module.get_config(preset) if preset else module.get_config()


def _parse_value(key: str, text: str, current):
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("1", "true", "yes"):
            return True
        if lowered in ("0", "false", "no"):
            return False
        raise ConfigError(f"--config.{key}={text!r}: expected true or false.")
    try:
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
    except ValueError:
        raise ConfigError(f"--config.{key}={text!r}: expected a {type(current).__name__}.")
    return text


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Sets ``config.<key>`` (dotted) from its command-line text."""
    *parents, leaf = key.split(".")
    node = config
    for i, name in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            where = ".".join(parents[:i]) or "the config"
            raise ConfigError(f"Unknown config key {key!r}: {where} has no section {name!r} "
                              f"(sections: {', '.join(sorted(node.keys()))}).")
        node = node[name]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise ConfigError(f"Unknown config key {key!r}. Keys of {'.'.join(parents) or 'config'}"
                          f": {', '.join(sorted(node.keys()))}.")
    if isinstance(node[leaf], ml_collections.ConfigDict):
        raise ConfigError(f"--config.{key} is a section; override one of its keys, e.g. "
                          f"--config.{key}.{next(iter(node[leaf].keys()))}=...")
    with node.unlocked():
        node[leaf] = _parse_value(key, text, node[leaf])


def parse_args(argv: Sequence[str], description: str = "", default_config: str | None = None
               ) -> tuple[ml_collections.ConfigDict, argparse.Namespace]:
    """Parses ``argv`` (without the program name) into (config, other args).

    ``default_config``: the ``PATH[:PRESET]`` used without ``--config`` (default: the
    ``tiny`` preset of sparse_gpt/config.py).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config or f"{DEFAULT_CONFIG}:tiny",
                        help="config file and preset, PATH[:PRESET] (default: %(default)s)")
    parser.add_argument("--workdir", default=None, help="run folder (default: "
                        "runs/<preset>-<method>)")
    args, rest = parser.parse_known_args(list(argv))
    config = load_config(args.config)
    for item in rest:
        if not item.startswith("--config.") or "=" not in item:
            raise ConfigError(f"Unexpected argument {item!r}; overrides look like "
                              "--config.train.num_steps=100.")
        key, _, value = item[len("--config."):].partition("=")
        apply_override(config, key, value)
    return config, args
