"""`load_recipe`: a recipe file of any stage, read, overridden and validated into its schema.

Above both schemas (`vlkit.config` for align/instruct, `vlkit.clip.recipe` for clip), so neither
imports the other.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from vlkit.clip.recipe import ClipRecipe
from vlkit.config import VlmRecipe, apply_overrides, read_yaml, validate_tree
from vlkit.errors import ConfigError

STAGES = ("clip", "align", "instruct")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> VlmRecipe | ClipRecipe:
    """Read, override and validate a recipe of any stage (`VlmRecipe` or `ClipRecipe`)."""
    tree = apply_overrides(read_yaml(path), overrides)
    stage = tree.get("stage")
    if stage == "clip":
        return validate_tree(tree, ClipRecipe)
    if stage not in STAGES:
        close = difflib.get_close_matches(str(stage), list(STAGES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"recipe key 'stage' must be clip, align or instruct, got {stage!r}{hint}")
    return validate_tree(tree, VlmRecipe)
