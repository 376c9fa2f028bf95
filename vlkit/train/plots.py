"""Loss curves as PNG, from a Trainer's log history (every stage's `loss.png`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_loss(
    log_history: list[dict[str, Any]], path: str | Path, title: str = "loss", secondary: str | None = None
) -> None:
    """Train (and eval) loss against step; `secondary` names a logged value drawn on a right-hand axis
    (e.g. CLIP's `logit_scale`) when every train-loss entry has it."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    evaluation = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    extra = [(entry["step"], entry.get(secondary)) for entry in log_history if "loss" in entry] if secondary else []
    figure, axis = plt.subplots(figsize=(6, 3.5))
    if train:
        axis.plot(*zip(*train), label="train", marker="." if len(train) < 30 else None)
    if evaluation:
        axis.plot(*zip(*evaluation), label="eval", marker="o")
    if extra and all(value is not None for _, value in extra):
        twin = axis.twinx()
        twin.plot(*zip(*extra), color="tab:orange", alpha=0.7)
        twin.set_ylabel(secondary, color="tab:orange")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    if train or evaluation:
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
