"""`vlkit chat MODEL`: a multimodal REPL with images at any turn, and a scriptable line mode.

    vlkit chat runs/tiny-instruct --image cat.png          interactive (stdin is a terminal)
    printf '/image a.png\\nWhat is this?\\n' | vlkit chat M   one reply per input message, on stdout
    vlkit chat M --image x.png --prompt "What is this?"     answer once and exit (--json: one object)

Owns the start-up order: load the model (`vlkit.loading.load_any`), print what was loaded, build
the session, attach `--image`s, then pick the mode. The parts: `session` (conversation, settings,
context fitting), `stream` (threaded generation that Ctrl-C stops), `commands` (the `/` commands),
`console` (where output goes), `repl` (the loops).
"""

from __future__ import annotations

import signal
import sys

__all__ = ["run"]


def run(args) -> int:
    """CLI entry: `vlkit chat` (arguments defined in vlkit.cli)."""
    from vlkit.chat.console import Console
    from vlkit.chat.repl import Driver, interactive, lines, one_shot
    from vlkit.chat.session import ChatError, ChatSession, Settings, load_attachments
    from vlkit.errors import first_line
    from vlkit.llm import vlkit_home
    from vlkit.loading import load_any

    settings = Settings(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                        repetition_penalty=getattr(args, "repetition_penalty", 1.0))
    if (settings.temperature < 0 or not 0 < settings.top_p <= 1 or settings.max_new_tokens < 1
            or settings.repetition_penalty <= 0):
        raise ChatError("--temperature must be >= 0, --top-p in (0, 1], --max-new-tokens >= 1, "
                        "--repetition-penalty > 0")
    one_shot_mode = args.prompt is not None
    is_interactive = not one_shot_mode and sys.stdin.isatty()
    console = Console(interactive=is_interactive)
    attached, errors = load_attachments(args.image)  # before the model: a typo costs no load time
    if errors and one_shot_mode:
        raise ChatError(errors[0])  # a script asked for this image: answering without it would mislead
    console.info(f"loading {args.model} ...")
    loaded = load_any(args.model, device=args.device, dtype=args.dtype, load_4bit=args.load_4bit)
    console.info(loaded.describe())
    try:
        loaded.render([{"role": "user", "content": "hi"}])
    except Exception as error:  # e.g. a base LLM's tokenizer without a chat template
        raise ChatError(f"cannot write a chat prompt for {args.model}: {first_line(error)}") from None
    session = ChatSession(loaded, system=args.system, settings=settings)
    session.pending = attached
    for error in errors:
        console.error(error)
    if attached:
        console.info(f"attached {', '.join(a.path for a in attached)} to your first message")
    # Stream to a terminal; a pipe gets whole replies, one per line.
    driver = Driver(session, console, json_mode=args.json, stream=is_interactive or (one_shot_mode and sys.stdout.isatty()))
    if one_shot_mode:
        return one_shot(driver, args.prompt)
    if is_interactive:
        # Ctrl-C is how a reply is stopped. A process started in the background by a shell script,
        # or by a tool that ignores SIGINT, inherits it ignored; at a terminal, take it back.
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        return interactive(driver, vlkit_home() / "chat_history")
    return lines(driver, sys.stdin)
