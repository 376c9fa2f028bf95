"""Linear probes: where does a trained model lose what its images show (e.g. colour, shape, count)?

    python -m vlkit.probe runs/demo/instruct                 # a run dir, checkpoint or vlkit folder
    python -m vlkit.probe runs/demo/clip --layer -2          # a CLIP folder: its vision tower only
    python -m vlkit.probe MODEL --data data/shapes --n-train 3000 --out probe.json
    python -m vlkit.probe MODEL --train labels_train.jsonl --test labels_test.jsonl --images DIR

(`python bench/probe.py ...` is the same command from a checkout.) The demo runs it on its instruct
run; it lives in the package so that an installed vlkit runs the demo without a checkout.

The labels are JSON lines, one image each: `{"image": PATH, TASK: LABEL, ...}`. Every other key is a
task; a null label leaves the image out of that task. `--data DIR` reads DIR/probe_train.jsonl and
scores on DIR/probe_val.jsonl + DIR/probe_test.jsonl: the files the shapes world's generator
(`python -m data_tools.shapes`) writes, with colour, shape and position of single-shape images, the
count of every image, and the shape and colour at each position (`shape_at_left`, ...: binding).
Image paths are relative to `--images` (default: the labels file's folder).

A linear classifier is trained (AdamW, full batch) on the flattened, standardised features of the
train images and scored on the test images, for each task, probed on (a) the vision tower's
features, as the connector receives them ([N, Dv] per image: the model's feature layer and
selection), and (b) the connector's output ([M, Dt] per image). A task the tower's features solve
and the connector's output does not was lost in the connector; one the tower does not solve was
never learned by it. `chance` is the test share of the most common class.

For a VLM the report also says how the image tokens sit among the LLM's words (`image_tokens`):
their mean norm against the mean norm of the LLM's word embeddings, and the mean cosine between
two test images' tokens at the same index. A cosine near 1 means the connector gives nearly the
same token for every image and the images differ only in a small remainder the LLM must learn to
read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from vlkit.errors import DataError, ModelLoadError

SPLIT_FILES = ("probe_train.jsonl", ("probe_val.jsonl", "probe_test.jsonl"))  # what `--data DIR` reads


def read_labels(path: str | Path, image_root: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """The rows of a labels file, image paths resolved against image_root (default: the file's folder)."""
    from vlkit.data.formats import json_lines

    path = Path(path)
    if not path.is_file():
        raise DataError(f"probe labels file not found: {path} (JSON lines of {{\"image\": PATH, TASK: LABEL, ...}}; "
                        "python -m data_tools.shapes writes probe_{split}.jsonl)")
    root = Path(image_root) if image_root is not None else path.parent
    rows = []
    for number, row in json_lines(path):
        if not isinstance(row, dict) or not isinstance(row.get("image"), str):
            raise DataError(f"{path}:{number}: a row needs an \"image\" path")
        labels = {task: label for task, label in row.items() if task not in ("image", "id")}
        if any(label is not None and not isinstance(label, (str, int)) for label in labels.values()):
            raise DataError(f"{path}:{number}: labels must be strings, integers or null")
        rows.append({"image": str(root / row["image"]),
                     **{task: None if label is None else str(label) for task, label in labels.items()}})
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise DataError(f"{path}: no labelled images")
    return rows


def tasks_of(rows: list[dict]) -> list[str]:
    """Task names in first-seen order."""
    return list(dict.fromkeys(task for row in rows for task in row if task != "image"))


FeatureFn = Callable[[torch.Tensor], torch.Tensor]  # pixel_values [I, 3, H, W] -> features [I, ...]


def feature_sources(model_path: str, layer: int) -> tuple[dict[str, FeatureFn], object, dict]:
    """{"tower": fn[, "connector": fn]}, the image processor, and for a VLM the LLM's side of its
    image tokens ({"hidden_size": Dt, "word_norm": mean norm of the input embeddings}; {} for CLIP)."""
    from vlkit.clip.evaluate import is_clip_folder

    if is_clip_folder(model_path):
        from vlkit.features import tower_features
        from vlkit.vision import load_vision_tower, num_prefix_tokens

        tower, image_processor = load_vision_tower(model_path)
        tower.eval()
        prefix = num_prefix_tokens(tower.config)
        return {"tower": lambda pixels: tower_features(tower, pixels, layer, "default", prefix)}, image_processor, {}
    from vlkit.loading import load_any
    from vlkit.modeling import VlkitForConditionalGeneration

    loaded = load_any(model_path, device="cpu", dtype="float32")
    model = loaded.model
    if not isinstance(model, VlkitForConditionalGeneration):
        raise ModelLoadError(f"{model_path} is a {loaded.kind} model; the probe needs a vlkit run, checkpoint, "
                             "vlkit-format folder or CLIP folder")
    features = {"tower": model.get_vision_features,
                "connector": lambda pixels: model.connector(model.get_vision_features(pixels))}
    words = model.get_input_embeddings().weight.detach().float()
    llm_side = {"hidden_size": words.shape[1], "word_norm": words.norm(dim=-1).mean().item()}
    return features, loaded.processor.image_processor, llm_side


@torch.no_grad()
def extract(fn: FeatureFn, image_processor, paths: list[str], batch_size: int = 64) -> torch.Tensor:
    """Flattened features [len(paths), D] in float32."""
    from vlkit.data.images import load_image

    chunks = []
    for start in range(0, len(paths), batch_size):
        images = [load_image(path) for path in paths[start : start + batch_size]]
        pixels = image_processor(images, return_tensors="pt")["pixel_values"]
        chunks.append(fn(pixels).float().flatten(1))
    return torch.cat(chunks)


def image_token_stats(tokens: torch.Tensor, word_norm: float) -> dict:
    """[I, M, Dt] image tokens -> their mean norm, the LLM's word norm, and the mean cosine between two
    different images' tokens at the same index (1: every image gives the same tokens)."""
    images = tokens.shape[0]
    unit = torch.nn.functional.normalize(tokens.float(), dim=-1)  # [I, M, Dt]
    # Sum over pairs i != j of u_i . u_j = |sum of u|^2 - I (each u_i . u_i = 1): no I x I matrix.
    between = (unit.sum(dim=0).square().sum(dim=-1) - images) / max(images * (images - 1), 1)  # [M]
    return {"images": images, "token_norm": round(tokens.float().norm(dim=-1).mean().item(), 3),
            "word_norm": round(word_norm, 3), "cosine_between_images": round(between.mean().item(), 3)}


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 classes: int, steps: int = 300, seed: int = 0) -> tuple[float, float]:
    """(train accuracy, test accuracy) of a linear classifier on standardised features."""
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    torch.manual_seed(seed)
    head = torch.nn.Linear(train_x.shape[1], classes)
    # Weight decay keeps the probe from memorising a few thousand images with thousands of features.
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(train_x), train_y).backward()
        optimizer.step()
    with torch.no_grad():
        return ((head(train_x).argmax(1) == train_y).float().mean().item(),
                (head(test_x).argmax(1) == test_y).float().mean().item())


def probe(model_path: str, train_file: str | Path, test_files: list[str | Path], image_root: str | Path | None = None,
          n_train: int = 3000, n_test: int | None = None, steps: int = 300, layer: int = -2) -> dict:
    """Probe accuracies per task and feature source (see the module docstring)."""
    train = read_labels(train_file, image_root, n_train)
    test = [row for path in test_files for row in read_labels(path, image_root)][:n_test]
    sources, image_processor, llm_side = feature_sources(model_path, layer)
    report: dict = {"model": str(model_path), "train": str(train_file), "test": [str(path) for path in test_files],
                    "steps": steps, "tasks": {}}
    features = {name: (extract(fn, image_processor, [f["image"] for f in train]),
                       extract(fn, image_processor, [f["image"] for f in test])) for name, fn in sources.items()}
    report["feature_shapes"] = {name: int(train_x.shape[1]) for name, (train_x, _) in features.items()}
    if "connector" in features:
        test_tokens = features["connector"][1]
        report["image_tokens"] = image_token_stats(test_tokens.view(len(test_tokens), -1, llm_side["hidden_size"]),
                                                   llm_side["word_norm"])
    for task in tasks_of(train):
        train_rows = [i for i, f in enumerate(train) if f.get(task) is not None]
        test_rows = [i for i, f in enumerate(test) if f.get(task) is not None]
        if not train_rows or not test_rows:
            continue
        names = sorted({train[i][task] for i in train_rows} | {test[i][task] for i in test_rows})
        train_y = torch.tensor([names.index(train[i][task]) for i in train_rows])
        test_y = torch.tensor([names.index(test[i][task]) for i in test_rows])
        row = {"classes": len(names), "n_train": len(train_rows), "n_test": len(test_rows),
               "chance": Counter(test_y.tolist()).most_common(1)[0][1] / len(test_rows)}
        for name, (train_x, test_x) in features.items():
            train_acc, test_acc = linear_probe(train_x[train_rows], train_y, test_x[test_rows], test_y, len(names), steps)
            row[name] = {"train": round(train_acc, 3), "test": round(test_acc, 3)}
        report["tasks"][task] = row
    if not report["tasks"]:
        raise DataError(f"no task has labels in both {train_file} and the test files")
    return report


def data_dir_files(data_dir: str | Path) -> tuple[Path, list[Path]]:
    """(train file, test files) that `--data DIR` stands for."""
    train_name, test_names = SPLIT_FILES
    return Path(data_dir) / train_name, [Path(data_dir) / name for name in test_names]


def markdown(report: dict) -> str:
    sources = list(report["feature_shapes"])
    header = "| task | classes | train / test images | " + " | ".join(
        f"{name} ({report['feature_shapes'][name]} features): test (train)" for name in sources) + " | chance |"
    lines = [header, "|" + "---|" * (len(sources) + 4)]
    for task, row in report["tasks"].items():
        cells = [f"{row[name]['test']:.3f} ({row[name]['train']:.3f})" for name in sources]
        lines.append(f"| {task} | {row['classes']} | {row['n_train']} / {row['n_test']} | "
                     + " | ".join(cells) + f" | {row['chance']:.3f} |")
    if report.get("image_tokens"):
        stats = report["image_tokens"]
        lines += ["", f"Image tokens (connector output, {stats['images']} test images): mean norm {stats['token_norm']:.2f} "
                  f"(the LLM's word embeddings: {stats['word_norm']:.2f}); mean cosine between two images' tokens "
                  f"{stats['cosine_between_images']:.3f} (1: the same token for every image)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a vlkit run dir, checkpoint, vlkit-format folder, or a CLIP folder")
    parser.add_argument("--data", default="data/shapes",
                        help="a folder with probe_train.jsonl, probe_val.jsonl and probe_test.jsonl (the shapes world)")
    parser.add_argument("--train", default=None, help="labels to fit the probes on (instead of --data)")
    parser.add_argument("--test", nargs="+", default=None, help="labels to score the probes on (with --train)")
    parser.add_argument("--images", default=None, help="image root of the labels files (default: each file's folder)")
    parser.add_argument("--n-train", type=int, default=3000, help="train images to fit the probes on")
    parser.add_argument("--n-test", type=int, default=None, help="test images to score (default: all)")
    parser.add_argument("--steps", type=int, default=300, help="AdamW steps per probe (full batch)")
    parser.add_argument("--layer", type=int, default=-2, help="tower hidden state of a CLIP folder (a VLM uses its own)")
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    parser.add_argument("--toy", action="store_true", help="a few images and steps (tests)")
    args = parser.parse_args(argv)
    if (args.train is None) != (args.test is None):
        parser.error("--train and --test go together")
    if args.toy:
        args.n_train, args.n_test, args.steps = min(args.n_train, 24), args.n_test or 16, min(args.steps, 20)
    train_file, test_files = (args.train, args.test) if args.train else data_dir_files(args.data)
    started = time.perf_counter()
    try:
        report = probe(args.model, train_file, test_files, args.images, args.n_train, args.n_test, args.steps, args.layer)
    except (DataError, ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(markdown(report))
    print(f"linear probes on {args.model}: {report['seconds']} s")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
