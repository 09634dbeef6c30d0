"""Aggregate types of a job: classes resolved from import paths, with policies."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from aggregates.aggregate import Aggregate
from aggregates.lifespan import Lifespan, RuleLifespan
from aggregates.snapshot import EveryNEvents
from pipeline.config import AggregateConfig, ConfigError


@dataclass(frozen=True)
class AggregateSpec:
    """An aggregate class with the lifespan and snapshot policy it runs under."""

    name: str
    cls: type[Aggregate]
    lifespan: Lifespan
    snapshot_policy: EveryNEvents


class AggregateRegistry:
    """Look up aggregate types by name and by the command types they handle."""

    def __init__(self, specs: list[AggregateSpec]) -> None:
        self.specs = {spec.name: spec for spec in specs}
        self._by_command: dict[str, AggregateSpec] = {}
        for spec in specs:
            for command_type in spec.cls.command_schemas:
                other = self._by_command.get(command_type)
                if other is not None:
                    msg = (
                        f"command type {command_type!r} is handled by both "
                        f"aggregates.{other.name} and aggregates.{spec.name}; "
                        "a command type must belong to one aggregate type"
                    )
                    raise ConfigError(msg)
                self._by_command[command_type] = spec

    @classmethod
    def from_config(cls, aggregates: dict[str, AggregateConfig]) -> AggregateRegistry:
        """Resolve every configured aggregate type.

        An invalid setting raises ConfigError, which names the setting.
        """
        return cls([_spec(name, config) for name, config in aggregates.items()])

    def get(self, name: str) -> AggregateSpec:
        """Return the spec of aggregate type ``name``; KeyError names the known ones."""
        try:
            return self.specs[name]
        except KeyError:
            msg = (
                f"unknown aggregate type {name!r}; "
                f"configured: {', '.join(sorted(self.specs))}"
            )
            raise KeyError(msg) from None

    def for_command(self, command_type: str) -> AggregateSpec | None:
        """Return the spec of the aggregate type that handles ``command_type``."""
        return self._by_command.get(command_type)


def import_object(path: str, setting: str) -> Any:
    """Import 'package.module:name' or 'package.module.name'.

    A failed import raises ConfigError, which names ``setting``.
    """
    module_name, _, attribute = path.partition(":")
    if not attribute:
        module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        msg = (
            f"{setting} = {path!r} is invalid: "
            "expected an import path 'package.module:name'"
        )
        raise ConfigError(msg)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        msg = f"{setting} = {path!r} is invalid: cannot import {module_name}: {error}"
        raise ConfigError(msg) from error
    try:
        return getattr(module, attribute)
    except AttributeError:
        msg = (
            f"{setting} = {path!r} is invalid: "
            f"{module_name} has no attribute {attribute!r}"
        )
        raise ConfigError(msg) from None


def _spec(name: str, config: AggregateConfig) -> AggregateSpec:
    setting = f"aggregates.{name}"
    cls = import_object(config.class_path, f"{setting}.class")
    if not isinstance(cls, type) or not issubclass(cls, Aggregate):
        msg = (
            f"{setting}.class = {config.class_path!r} is invalid: "
            "expected an Aggregate subclass"
        )
        raise ConfigError(msg)
    if cls.aggregate_type != name:
        msg = (
            f"{setting}.class = {config.class_path!r} is invalid: "
            f"its aggregate_type is {cls.aggregate_type!r}, "
            f"so the table must be [aggregates.{cls.aggregate_type}]"
        )
        raise ConfigError(msg)
    policy = EveryNEvents(config.snapshot_every, config.snapshot_version)
    return AggregateSpec(name, cls, _lifespan(config, setting), policy)


def _lifespan(config: AggregateConfig, setting: str) -> Lifespan:
    if config.lifespan_class:
        lifespan_cls = import_object(config.lifespan_class, f"{setting}.lifespan_class")
        lifespan = lifespan_cls() if isinstance(lifespan_cls, type) else lifespan_cls
        for hook in ("after_event", "after_command", "after_error"):
            if not callable(getattr(lifespan, hook, None)):
                msg = (
                    f"{setting}.lifespan_class = {config.lifespan_class!r} is invalid: "
                    f"it has no method {hook}"
                )
                raise ConfigError(msg)
        return lifespan  # type: ignore[no-any-return]
    try:
        return RuleLifespan.from_config(
            {
                "after_event": config.after_event,
                "after_command": config.after_command,
                "after_error": config.after_error,
            },
            setting,
        )
    except ValueError as error:
        raise ConfigError(str(error)) from error
