"""The `vlkit` command line: train | chat | export | eval | data.

Each subcommand's work lives in its own module, which exposes `run(args) -> int`; this file only
parses arguments, imports that module only when it runs (importing the vlkit package itself loads torch
and transformers, which `vlkit --help` waits for: a few seconds) and turns a
`VlkitError` into one printed line and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

from vlkit.errors import VlkitError

# subcommand -> module with `run(args)`
COMMAND_MODULES = {
    "train": "vlkit.train.run",
    "chat": "vlkit.chat",
    "export": "vlkit.export",
    "eval": "vlkit.evaluate",
    "data validate": "vlkit.data.validate",
}


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (argparse prints the one-line error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlkit", description="Build, train, chat with and export vision-language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="run a YAML recipe")
    train.add_argument("recipe", help="recipe YAML file")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=10")
    train.add_argument("--dry-run", action="store_true", help="check the recipe, its data files, bases and output dir, print the plan; load no weights")

    chat = commands.add_parser("chat", help="chat with a model, with images at any turn")
    chat.add_argument("model", help="vlkit run dir, exported folder or hub id")
    chat.add_argument("--image", action="append", default=[], help="image to attach to the first message (repeatable)")
    chat.add_argument("--prompt", help="answer this one message and exit")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--json", action="store_true", help="print one JSON object per reply")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sampling")
    chat.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, with --temperature (default: 1.0)")
    chat.add_argument("--max-new-tokens", type=positive_int, default=256, help="default: 256")
    chat.add_argument("--repetition-penalty", type=float, default=1.0, help="above 1 discourages repeats (default: 1.0)")
    chat.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps")
    chat.add_argument("--dtype", default="auto",
                      help="auto (float32 on CPU, bfloat16 or float16 on a GPU; a run dir keeps its own) | float32 | "
                           "bfloat16 | float16")
    chat.add_argument("--load-4bit", action="store_true", help="load the LLM in 4-bit NF4 (bitsandbytes)")

    export = commands.add_parser("export", help="write a standalone Hugging Face model folder")
    export.add_argument("source", help="run dir or checkpoint")
    export.add_argument("out_dir")
    export.add_argument("--format", default="auto", help="auto | llava | vlkit")
    export.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    export.add_argument("--max-shard-size", default="2GB")
    export.add_argument("--push-to-hub", metavar="REPO_ID")
    export.add_argument("--private", action="store_true")
    export.add_argument("--overwrite", action="store_true",
                        help="replace OUT_DIR if it holds an earlier vlkit export (config.json + a model card tagged vlkit)")

    evaluate = commands.add_parser("eval", help="evaluate a VLM (VQA, captions) or a CLIP folder (zero-shot, retrieval)")
    evaluate.add_argument("model", help="a run folder, a checkpoint, an export, or a CLIP folder")
    evaluate.add_argument("--data", required=True, help="conversations (LLaVA / ShareGPT JSON) or CLIP pairs (JSONL)")
    evaluate.add_argument("--images", required=True, help="the folder the data file's image paths start from")
    evaluate.add_argument("--out", help="where the report goes (default: MODEL/eval/DATA_NAME for a run or CLIP "
                                        "folder, eval/MODEL_NAME/DATA_NAME for an export)")
    evaluate.add_argument("--labels", help="zero-shot class names + templates (CLIP models; VLMs ignore it)")
    evaluate.add_argument("--batch-size", type=positive_int, default=16, help="default: 16")
    evaluate.add_argument("--scorer", default="auto",
                          help="auto | exact_match | yes_no | multiple_choice | module:factory "
                               "(the shapes world: data_tools.shapes_scoring:scorer_for)")
    evaluate.add_argument("--max-samples", type=positive_int, help="only the first N samples (default: all)")
    evaluate.add_argument("--no-image-baseline", action="store_true", help="also answer without the image")

    data = commands.add_parser("data", help="data tools")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    validate = data_commands.add_parser("validate", help="check a data file before training")
    validate.add_argument("file")
    validate.add_argument("--images", required=True, help="image root")
    validate.add_argument("--model", help="model whose processor measures sample lengths")
    validate.add_argument("--format", default="auto", help="auto | llava | sharegpt | clip")
    validate.add_argument("--max-bad-fraction", type=float, default=None,
                          help="pass when at most this share of samples is bad (default: none may be)")
    validate.add_argument("--max-length", type=positive_int, default=None,
                          help="token limit per sample (default: the --model LLM's)")
    validate.add_argument("--show", type=int, default=3, help="examples shown per problem")
    return parser


def quiet_library_noise() -> None:
    """Keep the console for vlkit's own output: library warnings that need no action are hidden."""
    # bitsandbytes warns on import that it cannot fetch an optional CPU kernel from a hub.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # peft reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    from transformers import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()  # "Loading weights" bars; vlkit shows its own progress


def close_progress_bars() -> None:
    """Close the progress bars an error interrupted (the training bar, a dataset map's), so the error line
    starts a line of its own instead of trailing the last bar drawn."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):  # tqdm's registry of open bars
        bar.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_library_noise()
    command = args.command if args.command != "data" else f"data {args.data_command}"
    try:
        module = importlib.import_module(COMMAND_MODULES[command])
        return int(module.run(args) or 0)
    except VlkitError as error:
        message = str(error).strip()
        if message.startswith("Caught "):
            # Raised in a dataloader worker: torch puts the worker's traceback in the message;
            # its last line is our one-line reason.
            message = message.splitlines()[-1].split(": ", 1)[-1]
        close_progress_bars()
        print(f"error: {message}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
