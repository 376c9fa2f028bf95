"""Connectors between a vision tower and an LLM; importing this package registers them all."""

from vlkit.connectors import linear, mlp, pixel_shuffle, qformer, resampler, visual_words  # noqa: F401  (registration side effects)
from vlkit.connectors.base import Connector
from vlkit.connectors.registry import CONNECTORS, build_connector, register_connector

__all__ = ["CONNECTORS", "Connector", "build_connector", "register_connector"]
