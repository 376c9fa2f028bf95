"""Stage 0's parts: CLIP contrastive pretraining of the vision tower (with a text tower).

Submodules: recipe (schema), tokenizer, model, loss, augment, data, evaluate. Training itself is a
stage like the others and lives in `vlkit.train.clip` (`train_clip(recipe)` writes a standard HF
CLIP folder); `evaluate_clip(...)` measures zero-shot accuracy and retrieval on one.
"""

from vlkit.clip.recipe import ClipRecipe, load_clip_recipe

__all__ = ["ClipRecipe", "load_clip_recipe", "evaluate_clip"]


def __getattr__(name: str):
    # Lazy: importing the recipe schema must not pull in the evaluation's plotting.
    if name == "evaluate_clip":
        from vlkit.clip.evaluate import evaluate_clip

        return evaluate_clip
    raise AttributeError(name)
