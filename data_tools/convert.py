"""Converters between data formats.

    python -m data_tools.convert coco-clip     captions_train2017.json clip.jsonl  [--image-prefix train2017]
    python -m data_tools.convert coco-align    captions_train2017.json align.json  [--image-prefix train2017] [--all-captions]
    python -m data_tools.convert sharegpt-to-llava  in.json out.json
    python -m data_tools.convert llava-to-sharegpt  in.json out.json

COCO captions JSON is `{"images": [{"id", "file_name"}], "annotations": [{"id", "image_id", "caption"}]}`.
ShareGPT is the flavour LLaMA-Factory writes: `{"messages": [{"role", "content"}], "images": [...]}`.
Conversations go through `vlkit.data.formats.normalize_record`, so a converted file means exactly
what the original meant to vlkit's loaders (e.g. LLaVA's implicit leading `<image>` becomes explicit).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from vlkit.data.formats import normalize_record
from vlkit.errors import DataError

ALIGN_PROMPTS = [
    "Describe the image briefly.",
    "Give a short caption for this image.",
    "What is in this picture?",
    "Write a brief description of the image.",
]
LLAVA_ROLES = {"user": "human", "assistant": "gpt", "system": "system"}


def _read_json(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            if str(path).endswith(".jsonl"):
                return [json.loads(line) for line in f if line.strip()]
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"file not found: {path}") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path} is not valid JSON: {error}") from None


def _write_json(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if str(path).endswith(".jsonl"):
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        else:
            json.dump(rows, f, ensure_ascii=False, indent=1)


def _coco_captions(coco: dict[str, Any], image_prefix: str) -> list[tuple[int, str, list[tuple[Any, str]]]]:
    """[(image id, image path, [(annotation id, caption), ...])] in the file's image order."""
    if not isinstance(coco, dict) or "images" not in coco or "annotations" not in coco:
        raise DataError("not a COCO captions file: expected top-level 'images' and 'annotations'")
    captions: dict[Any, list[tuple[Any, str]]] = defaultdict(list)
    for annotation in coco["annotations"]:
        caption = str(annotation.get("caption", "")).strip()
        if caption:
            captions[annotation["image_id"]].append((annotation.get("id"), caption))
    out = []
    for image in coco["images"]:
        path = f"{image_prefix.rstrip('/')}/{image['file_name']}" if image_prefix else image["file_name"]
        if captions.get(image["id"]):
            out.append((image["id"], path, captions[image["id"]]))
    return out


def coco_to_clip(coco_path: str | os.PathLike, out_path: str | os.PathLike, image_prefix: str = "") -> int:
    """COCO captions -> CLIP pairs JSONL, one row per caption: {"id", "image", "caption", "image_id"}."""
    rows = [
        {"id": str(ann_id if ann_id is not None else f"{image_id}_{k}"), "image": path, "caption": caption,
         "image_id": str(image_id)}
        for image_id, path, captions in _coco_captions(_read_json(coco_path), image_prefix)
        for k, (ann_id, caption) in enumerate(captions)
    ]
    _write_json(rows, out_path)
    return len(rows)


def coco_to_llava_align(
    coco_path: str | os.PathLike, out_path: str | os.PathLike, image_prefix: str = "", all_captions: bool = False
) -> int:
    """COCO captions -> LLaVA align JSON: one caption turn per image (or per caption, with all_captions)."""
    rows = []
    for image_id, path, captions in _coco_captions(_read_json(coco_path), image_prefix):
        for k, (_, caption) in enumerate(captions if all_captions else captions[:1]):
            prompt = ALIGN_PROMPTS[(len(rows)) % len(ALIGN_PROMPTS)]  # varied, but reproducible
            rows.append({
                "id": f"{image_id}" if not all_captions else f"{image_id}_{k}",
                "image": path,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{prompt}"},
                    {"from": "gpt", "value": caption},
                ],
            })
    _write_json(rows, out_path)
    return len(rows)


def _extras(record: dict[str, Any], consumed: tuple[str, ...]) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key not in consumed}


def sharegpt_to_llava(in_path: str | os.PathLike, out_path: str | os.PathLike) -> int:
    """ShareGPT (messages/role/content, images list) -> LLaVA (conversations/from/value, image)."""
    rows = []
    for index, record in enumerate(_read_json(in_path)):
        sample = normalize_record(record, index, "sharegpt")
        row: dict[str, Any] = {"id": sample["id"]}
        if len(sample["images"]) == 1:
            row["image"] = sample["images"][0]
        elif sample["images"]:
            row["image"] = sample["images"]  # multi-image LLaVA variants (e.g. LLaVA-OneVision) use a list
        row["conversations"] = [
            {"from": LLAVA_ROLES.get(m["role"], m["role"]), "value": m["content"]} for m in sample["messages"]
        ]
        rows.append({**row, **_extras(record, ("id", "messages", "conversations", "images", "image"))})
    _write_json(rows, out_path)
    return len(rows)


def llava_to_sharegpt(in_path: str | os.PathLike, out_path: str | os.PathLike) -> int:
    """LLaVA -> ShareGPT as LLaMA-Factory reads it; images without a marker get an explicit `<image>`."""
    rows = []
    for index, record in enumerate(_read_json(in_path)):
        sample = normalize_record(record, index, "llava")
        row = {"id": sample["id"], "messages": sample["messages"], "images": sample["images"]}
        rows.append({**row, **_extras(record, ("id", "messages", "conversations", "images", "image"))})
    _write_json(rows, out_path)
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools.convert", description="Convert data formats.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("coco-clip", "coco-align"):
        command = commands.add_parser(name, help=f"COCO captions JSON -> {'CLIP JSONL' if name == 'coco-clip' else 'LLaVA align JSON'}")
        command.add_argument("input")
        command.add_argument("output")
        command.add_argument("--image-prefix", default="", help="folder prepended to file_name, relative to the image root")
        if name == "coco-align":
            command.add_argument("--all-captions", action="store_true", help="one sample per caption, not per image")
    for name in ("sharegpt-to-llava", "llava-to-sharegpt"):
        command = commands.add_parser(name)
        command.add_argument("input")
        command.add_argument("output")
    args = parser.parse_args(argv)
    try:
        if args.command == "coco-clip":
            count = coco_to_clip(args.input, args.output, args.image_prefix)
        elif args.command == "coco-align":
            count = coco_to_llava_align(args.input, args.output, args.image_prefix, args.all_captions)
        elif args.command == "sharegpt-to-llava":
            count = sharegpt_to_llava(args.input, args.output)
        else:
            count = llava_to_sharegpt(args.input, args.output)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    print(f"wrote {count} samples to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
