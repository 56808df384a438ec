"""Run configuration: dataclass defaults < YAML file < ``--key value`` flags.

A recipe is a dict of sections (``model``, ``data``, ``train``, ...). Every key of the YAML file and of the flags
must exist in the defaults; an unknown key is an error that names it and the closest valid key. Flags address a
key as ``--section.key value`` or, when the name is unique across sections, as ``--key value``. Values are parsed
as YAML scalars, so ``--train.lr 3e-4``, ``--data.files [a.txt,b.txt]`` and ``--train.precision fp32`` work.
Keys that older recipes used (``bf16: true``) are read under their new name (:data:`RENAMED`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, check_field_types

FREE_SECTIONS = {"model"}  # validated by the encoder config itself (it names unknown fields)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``3e-5`` (no dot) as a string; YAML 1.2 and every user read it as a number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.VERBOSE),
    list("-+0123456789."))


def parse_scalar(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


def _check_type(default: Any, value: Any, where: str, dotted: str) -> Any:
    """A value for a key whose default is a bool / number must be one (ints are fine where floats are)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, (int, float)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        return value
    if not ok:
        kind = "true or false" if isinstance(default, bool) else "a number"
        raise ConfigError(f"{where}: '{dotted}' must be {kind}, got {value!r}")
    return value


def _bf16_to_precision(value: Any, where: str, dotted: str) -> Any:
    """The old ``bf16`` flag: true meant "the fast precision" (bf16 was only recommended where it is native), so it
    reads as ``auto``; false as ``fp32``. Lists (a report's ``bf16: [false, true]``) translate element-wise."""
    if isinstance(value, list):
        return [_bf16_to_precision(v, where, dotted) for v in value]
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: '{dotted}' must be true or false, got {value!r} (it is read as "
                          f"'precision'; write 'precision: auto | fp32 | bf16' instead)")
    return "auto" if value else "fp32"


# old key -> (its new name in the same section, how an old value translates). Old recipes keep working.
RENAMED = {"bf16": ("precision", _bf16_to_precision)}


def _rename(key: str, value: Any, where: str, dotted: str) -> tuple[str, Any]:
    if key in RENAMED:
        new, translate = RENAMED[key]
        return new, translate(value, where, dotted)
    return key, value


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _merge(base: dict[str, Any], override: dict[str, Any], where: str, path: str = "") -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key not in out:
            key, value = _rename(key, value, where, f"{path}{key}")
        dotted = f"{path}{key}"
        if key not in out and path.rstrip(".") not in FREE_SECTIONS:
            raise ConfigError(f"{where}: unknown key '{dotted}'" + _suggest(dotted, _all_keys(base, path)))
        if isinstance(out.get(key), dict) and isinstance(value, dict):
            out[key] = _merge(out[key], value, where, dotted + ".")
        else:
            out[key] = _check_type(out.get(key), value, where, dotted)
    return out


def _all_keys(d: dict[str, Any], path: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        keys.append(path + k)
        if isinstance(v, dict):
            keys.extend(_all_keys(v, f"{path}{k}."))
    return keys


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = parse_scalar(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def parse_flags(flags: list[str], defaults: dict[str, Any]) -> dict[str, Any]:
    """``["--train.lr", "1e-3", "--max_steps", "10"]`` -> nested dict, resolving unique leaf names."""
    leaves: dict[str, list[str]] = {}
    for dotted in _all_keys(defaults):
        leaves.setdefault(dotted.rsplit(".", 1)[-1], []).append(dotted)
    out: dict[str, Any] = {}
    i = 0
    while i < len(flags):
        flag = flags[i]
        if not flag.startswith("--"):
            raise ConfigError(f"unexpected argument '{flag}' (settings are given as --key value)")
        key = flag[2:].replace("-", "_")
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        elif i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            raw = flags[i + 1]
            i += 2
        else:
            raw = "true"
            i += 1
        *_, leaf = key.rsplit(".", 1)
        value = parse_scalar(raw)
        if leaf in RENAMED and leaf not in leaves:
            new, value = _rename(leaf, value, "command line", f"--{key}")
            key = key[: -len(leaf)] + new
        if "." not in key:
            matches = leaves.get(key, [])
            if len(matches) > 1:
                raise ConfigError(f"--{key} is ambiguous: use one of {', '.join('--' + m for m in matches)}")
            if not matches:
                raise ConfigError(f"unknown flag --{key}" + _suggest(key, list(leaves) + _all_keys(defaults)))
            key = matches[0]
        section = out
        *parents, leaf = key.split(".")
        for p in parents:
            section = section.setdefault(p, {})
        section[leaf] = value
    return out


def resolve(defaults: dict[str, Any], config_file: str | Path | None = None,
            flags: list[str] | None = None) -> dict[str, Any]:
    """defaults < YAML < flags, with unknown keys rejected at each layer."""
    merged = copy.deepcopy(defaults)
    if config_file:
        merged = _merge(merged, load_yaml(config_file), str(config_file))
    if flags:
        merged = _merge(merged, parse_flags(flags, defaults), "command line")
    return merged


def build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Instantiate a dataclass from a section, naming unknown fields."""
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in valid:
            raise ConfigError(f"{where}: unknown key '{key}'" + _suggest(key, valid))
    # Keys whose default is None or a list escape the merge-time check; the dataclass annotation does not.
    check_field_types(cls, values, where)
    return cls(**values)


def defaults_of(cls: type) -> dict[str, Any]:
    return dataclasses.asdict(cls())


def save_yaml(data: dict[str, Any], path: str | Path) -> None:
    """Write atomically: a resume compares the recipe with this record, so it is never left half-written."""
    from .checkpoint import atomic_write

    atomic_write(Path(path), lambda tmp: tmp.write_text(yaml.safe_dump(data, sort_keys=False)))
