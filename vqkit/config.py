"""Configuration dataclasses saved as JSON beside the weights they rebuild."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from vqkit.errors import ConfigError


class JsonConfig:
    """Mixin for configuration dataclasses: ``to_dict`` for JSON, ``from_dict`` that refuses
    keys it does not know (a typo in a config file must not be silently ignored)."""

    label: ClassVar[str] = "config"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.label} keys: {', '.join(unknown)}")
        return cls(**data)
