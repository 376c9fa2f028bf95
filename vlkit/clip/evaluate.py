"""Evaluation of a CLIP folder: zero-shot classification and image<->text retrieval.

Zero-shot: rows with a non-null `label`; class names x prompt templates from a labels file
(`{"classes": [...], "templates": ["a photo of a {}.", ...]}`, default `zeroshot_labels.json`
next to the data file), or per class the prompts of its optional `"prompts": {class: [text, ...]}`
(a text tower trained from scratch knows only its captions' wording: a template word it never saw
in training moves every class embedding, so the prompts should read like the captions); each class
embedding is the mean of its normalised prompt embeddings, renormalised (CLIP's prompt
ensembling). Reports top-1/top-5, per-class accuracy and a confusion-matrix PNG.

Retrieval: all rows. Identical caption strings count as one text, and an image's positives are
all its captions; a caption's positives are all images carrying it (datasets like the shapes world
repeat captions, so "the one image this caption was written for" would be ill-posed). Reports
R@1/5/10 and the mean (1-based) rank of the first positive, both directions.

Writes `metrics.json` and `confusion_matrix.png` into `out_dir`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, PreTrainedModel

from vlkit.clip.data import captions_of, load_pairs
from vlkit.clip.model import image_embeds, text_embeds
from vlkit.data.images import load_image
from vlkit.errors import DataError, ModelLoadError

logger = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)


# What the CLIP stage writes: a CLIPModel, or a VisionTextDualEncoderModel around a CNN tower.
CLIP_MODEL_TYPES = ("clip", "vision-text-dual-encoder")


def is_clip_folder(path: str | Path) -> bool:
    """True if `path` holds a two-tower model the CLIP stage writes (`config.json` model_type in CLIP_MODEL_TYPES)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") in CLIP_MODEL_TYPES
    except (json.JSONDecodeError, OSError):
        return False


def load_clip_folder(model_dir: str | Path) -> tuple[PreTrainedModel, Any, Any]:
    """(model in eval mode, tokenizer, image processor) from a HF CLIP (or dual encoder) folder."""
    try:
        model = AutoModel.from_pretrained(model_dir).eval()  # CLIPModel or VisionTextDualEncoderModel
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        image_processor = AutoImageProcessor.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load a CLIP model from '{model_dir}': {str(error).splitlines()[0]}") from None
    return model, tokenizer, image_processor


@torch.no_grad()
def embed_texts(model: PreTrainedModel, tokenizer, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Normalised text embeddings [len(texts), D]."""
    max_length = model.config.text_config.max_position_embeddings
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        features = text_embeds(model, batch["input_ids"], batch["attention_mask"])
        chunks.append(torch.nn.functional.normalize(features, dim=-1))
    return torch.cat(chunks)


@torch.no_grad()
def embed_images(model: PreTrainedModel, image_processor, paths: list[str], image_root: str | Path, batch_size: int = 64) -> torch.Tensor:
    """Normalised image embeddings [len(paths), D]."""
    chunks = []
    for start in tqdm(range(0, len(paths), batch_size), desc="images", leave=False):
        images = [load_image(path, image_root) for path in paths[start : start + batch_size]]
        pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
        chunks.append(torch.nn.functional.normalize(image_embeds(model, pixels), dim=-1))
    return torch.cat(chunks)


def class_prompts(spec: dict[str, Any]) -> list[list[str]]:
    """Each class's prompt texts: `spec["prompts"][class]` where given, else its filled `templates`."""
    templates = list(spec.get("templates") or ["{}"])
    given = spec.get("prompts") or {}
    return [list(given.get(name) or [template.format(name) for template in templates]) for name in spec["classes"]]


def class_embeddings(model: PreTrainedModel, tokenizer, classes: list[str], templates: list[str] | None = None,
                     prompts: list[list[str]] | None = None) -> torch.Tensor:
    """Prompt-ensembled class embeddings [C, D]: mean of normalised prompt embeddings, renormalised.

    `prompts` (one list per class, any lengths) replaces `templates` (the same ones for every class)."""
    if prompts is None:
        prompts = [[template.format(name) for template in templates or ["{}"]] for name in classes]
    embeds = embed_texts(model, tokenizer, [text for texts in prompts for text in texts])  # [sum of lengths, D]
    per_class = torch.split(embeds, [len(texts) for texts in prompts])
    return torch.nn.functional.normalize(torch.stack([chunk.mean(dim=0) for chunk in per_class]), dim=-1)


def zero_shot(image_embeds: torch.Tensor, class_embeds: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    """Top-1/top-5 accuracy, predictions and the confusion matrix [C, C] (rows = true class)."""
    scores = image_embeds @ class_embeds.T  # [N, C]
    k = min(5, scores.shape[1])
    top = scores.topk(k, dim=1).indices  # [N, k]
    predictions = top[:, 0]
    confusion = torch.zeros(class_embeds.shape[0], class_embeds.shape[0], dtype=torch.long)
    confusion.index_put_((targets, predictions), torch.ones_like(targets), accumulate=True)
    return {
        "top1": float((predictions == targets).float().mean()),
        "top5": float((top == targets[:, None]).any(dim=1).float().mean()),
        "predictions": predictions,
        "confusion": confusion,
    }


def _first_positive_ranks(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """1-based rank of the best-ranked positive per query. scores, positives: [Q, G]."""
    order = scores.argsort(dim=1, descending=True)  # [Q, G]
    hits = positives.gather(1, order)  # [Q, G], True where the ranked item is a positive
    return hits.float().argmax(dim=1) + 1


def retrieval(image_embeds: torch.Tensor, text_embeds: torch.Tensor, positives: torch.Tensor) -> dict[str, float]:
    """R@k and mean rank, image->text and text->image. positives: bool [images, texts]."""
    scores = image_embeds @ text_embeds.T  # [I, T]
    metrics: dict[str, float] = {}
    for direction, s, p in (("i2t", scores, positives), ("t2i", scores.T, positives.T)):
        ranks = _first_positive_ranks(s, p)
        for k in RECALL_KS:
            metrics[f"{direction}_R@{k}"] = float((ranks <= k).float().mean())
        metrics[f"{direction}_mean_rank"] = float(ranks.float().mean())
        metrics[f"{direction}_median_rank"] = float(ranks.float().median())
    return metrics


def plot_confusion(confusion: torch.Tensor, classes: list[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix as a PNG (rows = true class, columns = predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = confusion.float()
    rows = rows / rows.sum(dim=1, keepdim=True).clamp(min=1)
    side = max(6.0, 0.22 * len(classes))
    fig, ax = plt.subplots(figsize=(side, side))
    image = ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=6)
    ax.set_yticks(range(len(classes)), classes, fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _default_labels_file(data_file: Path) -> Path | None:
    candidate = data_file.parent / "zeroshot_labels.json"
    return candidate if candidate.is_file() else None


def retrieval_metrics(model, tokenizer, rows: list[dict[str, Any]], image_embeds: torch.Tensor, caption_column: str) -> dict[str, Any]:
    """Retrieval over all rows; identical captions merge into one text."""
    texts: dict[str, int] = {}
    row_texts = [[texts.setdefault(caption, len(texts)) for caption in captions_of(row, caption_column)] for row in rows]
    positives = torch.zeros(len(rows), len(texts), dtype=torch.bool)
    for row_index, text_indices in enumerate(row_texts):
        positives[row_index, text_indices] = True
    text_embeds = embed_texts(model, tokenizer, list(texts))
    return {"num_texts": len(texts), **retrieval(image_embeds, text_embeds, positives)}


def zero_shot_metrics(
    model, tokenizer, rows: list[dict[str, Any]], image_embeds: torch.Tensor, labels_path: Path, confusion_png: Path, title: str
) -> dict[str, Any] | None:
    """Zero-shot over rows with a label of the labels file's classes (+ held-out classes, confusion PNG); None if none."""
    if not labels_path.is_file():
        raise DataError(f"zero-shot labels file not found: {labels_path}")
    spec = json.loads(labels_path.read_text())
    classes, prompts = list(spec["classes"]), class_prompts(spec)
    index = {name: i for i, name in enumerate(classes)}
    labelled = [(i, row["label"]) for i, row in enumerate(rows) if row.get("label") is not None]
    known = [(i, index[label]) for i, label in labelled if label in index]
    if not known:
        return None
    rows_idx = torch.tensor([i for i, _ in known])
    targets = torch.tensor([c for _, c in known])
    result = zero_shot(image_embeds[rows_idx], class_embeddings(model, tokenizer, classes, prompts=prompts), targets)
    seen = sorted(set(targets.tolist()))
    metrics: dict[str, Any] = {
        "top1": result["top1"],
        "top5": result["top5"],
        "num_images": len(known),
        "num_unknown_labels": len(labelled) - len(known),
        "num_classes": len(classes),
        "num_prompts": sum(len(texts) for texts in prompts),
        "per_class_top1": {classes[c]: float(result["confusion"][c, c] / result["confusion"][c].sum()) for c in seen},
    }
    heldout = set(spec.get("heldout_classes") or [])
    if heldout:
        mask = torch.tensor([classes[c] in heldout for c in targets.tolist()])
        if mask.any():
            predictions = result["predictions"][mask]
            metrics["heldout_classes_top1"] = float((predictions == targets[mask]).float().mean())
            metrics["heldout_classes_num_images"] = int(mask.sum())
    plot_confusion(result["confusion"], classes, confusion_png, f"{title}: top-1 {result['top1']:.3f}")
    metrics["confusion_matrix_png"] = str(confusion_png)
    return metrics


def evaluate_clip(
    model_dir: str | Path,
    data_file: str | Path,
    image_root: str | Path,
    out_dir: str | Path,
    labels_file: str | Path | None = None,
    batch_size: int = 64,
    max_samples: int | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
) -> dict[str, Any]:
    """Zero-shot + retrieval metrics of a CLIP folder on one CLIP-pairs file; writes JSON + PNG."""
    started = time.time()
    data_file, out_dir = Path(data_file), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer, image_processor = load_clip_folder(model_dir)
    rows = load_pairs(data_file, image_column, caption_column)[:max_samples]
    image_embeds = embed_images(model, image_processor, [row[image_column] for row in rows], image_root, batch_size)

    metrics: dict[str, Any] = {"model": str(model_dir), "data": str(data_file), "num_images": len(rows)}
    metrics["retrieval"] = retrieval_metrics(model, tokenizer, rows, image_embeds, caption_column)
    labels_path = Path(labels_file) if labels_file else _default_labels_file(data_file)
    if labels_path is not None:
        zero_shot_result = zero_shot_metrics(model, tokenizer, rows, image_embeds, labels_path,
                                             out_dir / "confusion_matrix.png", f"zero-shot on {data_file.name}")
        if zero_shot_result is not None:
            metrics["zero_shot"] = zero_shot_result
    metrics["wall_time_s"] = round(time.time() - started, 2)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def summary_line(metrics: dict[str, Any]) -> str:
    """One line with the headline figures."""
    parts = []
    if "zero_shot" in metrics:
        z = metrics["zero_shot"]
        parts.append(f"zero-shot top-1 {z['top1']:.4f} top-5 {z['top5']:.4f} ({z['num_images']} images, {z['num_classes']} classes)")
    r = metrics["retrieval"]
    parts.append(
        "i2t R@1/5/10 {:.3f}/{:.3f}/{:.3f} mean rank {:.2f}; t2i R@1/5/10 {:.3f}/{:.3f}/{:.3f} mean rank {:.2f}".format(
            r["i2t_R@1"], r["i2t_R@5"], r["i2t_R@10"], r["i2t_mean_rank"],
            r["t2i_R@1"], r["t2i_R@5"], r["t2i_R@10"], r["t2i_mean_rank"],
        )
    )
    return "; ".join(parts)


def run(args) -> int:
    """`vlkit eval CLIP_FOLDER --data FILE --images DIR [--out DIR] [--labels FILE] [--batch-size N] [--max-samples N]`."""
    out_dir = Path(args.out) if getattr(args, "out", None) else Path(args.model) / "eval" / Path(args.data).stem
    metrics = evaluate_clip(
        args.model,
        args.data,
        args.images,
        out_dir,
        labels_file=getattr(args, "labels", None),
        batch_size=getattr(args, "batch_size", None) or 64,
        max_samples=getattr(args, "max_samples", None),
    )
    print(summary_line(metrics))
    print(f"wrote {out_dir / 'metrics.json'}")
    return 0
