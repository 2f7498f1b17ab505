"""Layered TOML configuration: embedded defaults, then each file in order, then overrides.

Each component describes its settings as a pydantic model with ``extra="forbid"``;
:func:`load_config` merges the layers and validates once, so a typo in a key is an
error naming the key and the file instead of a silently ignored setting.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from edgefleet.device.core.errors import ConfigError

__all__ = ["StrictModel", "deep_merge", "dump_toml", "load_config", "read_toml",
           "registry_is_https"]


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


M = TypeVar("M", bound=BaseModel)


def registry_is_https(metadata_url: str, targets_url: str) -> bool:
    """Whether the set registry URLs are https://; ValueError if only one of them is.

    Shared by the device's ``[updates]`` and the fleet settings that write it.
    """
    https = [u.lower().startswith("https://") for u in (metadata_url, targets_url) if u]
    if any(https) and not all(https):
        raise ValueError("metadata_url and targets_url must both be https:// (a plain "
                         "targets URL shows which model version is fetched)")
    return any(https)


def read_toml(path: Path) -> dict[str, Any]:
    """Read one TOML file; a missing file or bad syntax is a :class:`ConfigError`."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("file not found", path=str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", path=str(path)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text: {exc}", path=str(path)) from None
    except RecursionError:
        raise ConfigError("invalid TOML: nested too deeply", path=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path=str(path)) from None


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``top`` over ``base``; tables merge key by key, other values replace."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _validate(model: type[M], data: Mapping[str, Any], source: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise ConfigError(msg + more, path=source, key=key) from None


def load_config(
    model: type[M],
    files: Iterable[Path | str] = (),
    overrides: Mapping[str, Any] | None = None,
) -> M:
    """Build ``model`` from its defaults, each TOML file in order, then ``overrides``.

    Every file is validated on its own first, so an error names the file that caused it.
    """
    merged: dict[str, Any] = {}
    for f in files:
        path = Path(f)
        layer = read_toml(path)
        merged = deep_merge(merged, layer)
        _validate(model, merged, str(path))
    if overrides:
        merged = deep_merge(merged, overrides)
    return _validate(model, merged, "overrides" if overrides else "defaults")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # JSON string escapes are valid TOML basic strings
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dump_toml(data: Mapping[str, Any], _prefix: str = "") -> str:
    """Write generated configs (``agent.toml``, ``fleet.toml``): scalars, lists, tables.

    The standard library reads TOML but cannot write it; this covers what we generate.
    ``None`` values are left out (TOML has no null; the model's default applies).
    """
    def key(k: str) -> str:
        return k if k.replace("-", "_").isidentifier() else json.dumps(k)

    lines = [f"{key(k)} = {_toml_value(v)}"
             for k, v in data.items() if v is not None and not isinstance(v, Mapping)]
    for k, v in data.items():
        if isinstance(v, Mapping):
            name = f"{_prefix}{key(k)}"
            body = dump_toml(v, f"{name}.")
            lines += ["", f"[{name}]", body] if body.strip() else ["", f"[{name}]"]
    return "\n".join(lines).strip("\n") + "\n" if _prefix == "" else "\n".join(lines)
