"""Stage 0: CLIP contrastive pretraining of the vision tower (with a text tower).

`train_clip(recipe)` trains a `transformers.CLIPModel` from a `stage: clip` recipe and writes a
standard HF CLIP folder; `evaluate_clip(...)` measures zero-shot accuracy and retrieval on it.
Submodules: recipe (schema), tokenizer, model, loss, augment, data, train, evaluate.
"""

from vlkit.clip.recipe import ClipRecipe, load_clip_recipe

__all__ = ["ClipRecipe", "load_clip_recipe", "train_clip", "evaluate_clip"]


def __getattr__(name: str):
    # Lazy: importing the recipe schema must not pull in transformers' Trainer.
    if name == "train_clip":
        from vlkit.clip.train import train_clip

        return train_clip
    if name == "evaluate_clip":
        from vlkit.clip.evaluate import evaluate_clip

        return evaluate_clip
    raise AttributeError(name)
