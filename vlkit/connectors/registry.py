"""Connector registry: `@register_connector("name")` on a class makes it selectable by name.

A recipe picks a connector with `connector: {type: mlp, depth: 2}`; everything but `type` is
passed to the class as keyword options, so a new connector is one new file.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import typing
from collections.abc import Callable
from typing import Any

import torch
from pydantic import TypeAdapter, ValidationError

from vlkit.connectors.base import Connector
from vlkit.errors import ConfigError

CONNECTORS: dict[str, type[Connector]] = {}

logger = logging.getLogger(__name__)


def register_connector(name: str) -> Callable[[type[Connector]], type[Connector]]:
    """Class decorator that registers a connector under `name`."""

    def decorator(cls: type[Connector]) -> type[Connector]:
        if name in CONNECTORS and CONNECTORS[name] is not cls:
            raise ValueError(f"connector '{name}' is registered twice")
        cls.connector_type = name
        CONNECTORS[name] = cls
        return cls

    return decorator


def connector_options(name: str) -> list[str]:
    """The keyword options a connector type accepts (besides the two hidden sizes)."""
    parameters = inspect.signature(CONNECTORS[name].__init__).parameters
    return [p for p in parameters if p not in ("self", "vision_hidden_size", "text_hidden_size")]


def checked_connector_config(connector_config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(type, options) of a connector config, each option converted to the type its class's signature names;
    an unknown type or option, or a value of the wrong type, is a one-line ConfigError (checked without weights,
    so `vlkit train --dry-run` catches it)."""
    options = dict(connector_config)
    name = options.pop("type", None)
    if name not in CONNECTORS:
        known = ", ".join(sorted(CONNECTORS))
        close = difflib.get_close_matches(str(name), CONNECTORS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown connector type '{name}'; known types: {known}.{hint}")
    accepted = connector_options(name)
    unknown = [key for key in options if key not in accepted]
    if unknown:
        raise ConfigError(
            f"connector '{name}' got unknown option(s) {', '.join(unknown)}; it accepts: {', '.join(accepted) or 'none'}"
        )
    hints = typing.get_type_hints(CONNECTORS[name].__init__)
    for key, value in options.items():
        if key in hints:
            try:
                numbers = {int, float} & {hints[key], *typing.get_args(hints[key])}
                if isinstance(value, bool) and numbers and bool not in typing.get_args(hints[key]):
                    # pydantic would read true as 1
                    raise ValidationError.from_exception_data(key, [])
                options[key] = TypeAdapter(hints[key]).validate_python(value)
            except ValidationError:
                expected = getattr(hints[key], "__name__", str(hints[key]))
                raise ConfigError(f"connector '{name}' option {key} must be {expected}, got {value!r}") from None
    return name, options


def build_connector(connector_config: dict[str, Any], vision_hidden_size: int, text_hidden_size: int) -> Connector:
    """Instantiate the connector that `connector_config["type"]` names."""
    name, options = checked_connector_config(connector_config)
    connector = CONNECTORS[name](vision_hidden_size=vision_hidden_size, text_hidden_size=text_hidden_size, **options)
    return connector


def count_trainable_parameters(module: torch.nn.Module) -> int:
    """Number of parameters of `module` that require gradients."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def log_connector_summary(connector: Connector, num_patches: int) -> str:
    """Log (INFO) and return `connector <type>: M tokens for N patches, P trainable params`.

    Calling it when a model is built also checks early that the connector accepts `num_patches`
    (pixel_shuffle raises a ConfigError for a grid it cannot fold).
    """
    line = (
        f"connector {connector.connector_type}: {connector.num_tokens(num_patches)} tokens for "
        f"{num_patches} patches, {count_trainable_parameters(connector):,} trainable params"
    )
    logger.info(line)
    return line
