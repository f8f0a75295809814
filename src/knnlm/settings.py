"""The base of every run's settings object: frozen, checked once where it is built, written
whole into results and rebuilt from them.

A settings dataclass checks its fields in ``__post_init__`` and raises :class:`SettingError`
naming the field; whoever built it names that field as its user spelled it: the Python API
as the argument (``knn_temperature``), the CLI as the flag (``--knn-temperature``), through
:func:`build`. Example::

    @dataclass(frozen=True)
    class MySettings(Settings):
        rate: float = 0.5

        def __post_init__(self):
            require(0 <= self.rate <= 1, "rate", f"must be in [0, 1], got {self.rate}")

    s = build(MySettings, {"rate": "--my-rate"}, rate=2.0)  # KnnlmError: --my-rate must be ...
    MySettings.from_dict(s.to_dict()) == s
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import PurePath
from typing import Any, TypeVar

from knnlm.errors import KnnlmError

T = TypeVar("T", bound="Settings")


class SettingError(KnnlmError):
    """A setting out of range: ``field`` is the dataclass field, ``detail`` the rest of the
    line (``"must be in [0, 1], got 2.0"``; ``<<other_field>>`` in it names another field the
    same way); the message names the fields as ``names`` does (default: as the fields)."""

    def __init__(self, field: str, detail: str, names: Callable[[str], str] = str):
        self.field, self.detail = field, detail
        other = re.sub(r"<<(\w+)>>", lambda m: names(m.group(1)), detail)
        super().__init__(f"{names(field)} {other}")


def require(ok: bool, field: str, detail: str) -> None:
    """Raise :class:`SettingError` for ``field`` unless ``ok``."""
    if not ok:
        raise SettingError(field, detail)


class Settings:
    """Mixin of the frozen settings dataclasses: ``to_dict`` (``dataclasses.asdict`` with paths
    as text: what results JSON holds) and ``from_dict`` (its inverse; unknown keys are ignored, so a results
    dict with more in it rebuilds the settings)."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[T], d: Mapping[str, Any]) -> T:
        known = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name not in d:
                continue
            sub = _settings_type(cls, f.name)
            v = d[f.name]
            known[f.name] = sub.from_dict(v) if sub is not None and isinstance(v, Mapping) else v
        return cls(**known)


def _plain(v: Any) -> Any:
    """A field as JSON holds it: nested settings as their own ``to_dict``, paths as text."""
    if isinstance(v, Settings):
        return v.to_dict()
    return str(v) if isinstance(v, PurePath) else v


def _settings_type(cls: type, name: str) -> type[Settings] | None:
    """The Settings class of a nested field (its default's or default factory's type)."""
    for f in dataclasses.fields(cls):
        if f.name != name:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kind = type(default)
        return kind if isinstance(default, Settings) else None
    return None


def build(cls: Callable[..., T], names: Mapping[str, str] | Callable[[str], str], **kw: Any) -> T:
    """``cls(**kw)``, with a :class:`SettingError` renamed for the user: ``names`` maps a field
    to the argument or flag that set it (a mapping, missing fields keep their own name, or a
    function of the field)."""
    try:
        return cls(**kw)
    except SettingError as e:
        named = names if callable(names) else lambda f: names.get(f, f)  # type: ignore[union-attr]
        raise SettingError(e.field, e.detail, named) from None


def flag(overrides: Mapping[str, str] | None = None) -> Callable[[str], str]:
    """The CLI's naming: ``knn_weight`` -> ``--knn-weight`` unless ``overrides`` says else."""
    over = dict(overrides or {})
    return lambda field: over.get(field, "--" + field.replace("_", "-"))
