"""The `/` commands of `vlkit chat`, one small function each, in one registry.

Owns parsing a command line and applying it to a `ChatSession`. Every command prints through the
`Console` and never raises for a user mistake: a bad argument, a missing image or an unknown
command is one line, and the session goes on. `run_command` returns False only for /quit.
"""

from __future__ import annotations

import dataclasses
import difflib
import shlex
from collections.abc import Callable
from dataclasses import dataclass

from vlkit.chat.console import Console
from vlkit.chat.session import SETTING_PARSERS, ChatError, ChatSession, plural


@dataclass
class Command:
    name: str
    usage: str
    help: str
    run: Callable[[ChatSession, str, Console], bool | None]  # (session, argument text, console) -> False quits


COMMANDS: dict[str, Command] = {}
ALIASES = {"exit": "quit", "clear": "reset", "img": "image", "?": "help"}


def command(name: str, usage: str, help: str):
    def register(function):
        COMMANDS[name] = Command(name, usage, help, function)
        return function

    return register


def split_arguments(text: str) -> list[str]:
    """Shell-style words, so paths with spaces can be quoted."""
    try:
        return shlex.split(text)
    except ValueError as error:
        raise ChatError(f"cannot read the arguments ({error}); quote paths that contain spaces") from None


def image_list(images) -> str:
    return ", ".join(image.path for image in images)


@command("image", "/image PATH [PATH...]", "attach images to your next message (any turn, several at once)")
def attach_images(session: ChatSession, text: str, console: Console) -> None:
    paths = split_arguments(text)
    if not paths:
        raise ChatError("usage: /image PATH [PATH...]")
    attached, errors = session.attach(paths)
    for error in errors:
        console.error(error)
    if attached:
        console.info(f"attached {image_list(attached)}: {plural(len(session.pending), 'image')} for your next message")


@command("images", "/images", "list the images attached and those in the conversation")
def list_images(session: ChatSession, text: str, console: Console) -> None:
    in_context = session.images_in_context()
    per_image = session.loaded.image_seq_length
    console.info(f"next message: {image_list(session.pending) if session.pending else 'no images attached'}")
    console.info(f"in context: {plural(len(in_context), 'image')}, {plural(len(in_context) * per_image, 'image token')}")
    user_turns = [turn for turn in session.context_turns() if turn.role == "user"]
    for number, turn in enumerate(user_turns, start=1):
        if turn.images:
            console.info(f"  message {number}: {image_list(turn.images)}")
    if session.context_start:
        console.info(f"({plural(session.context_start // 2, 'older exchange')} dropped from the context)")


@command("reset", "/reset", "forget the conversation and attached images (keeps /system and /set)")
def reset(session: ChatSession, text: str, console: Console) -> None:
    session.reset()
    console.info("conversation cleared")


@command("system", "/system [TEXT | -]", "set the system prompt; '-' removes it; no text shows it")
def system(session: ChatSession, text: str, console: Console) -> None:
    text = text.strip()
    if not text:
        console.info(f"system prompt: {session.system!r}" if session.system else "no system prompt (the template's default)")
        return
    session.system = None if text == "-" else text
    console.info("system prompt removed" if session.system is None else "system prompt set")


def setting_name(name: str) -> str:
    key = name.replace("-", "_").lower()
    if key not in SETTING_PARSERS:
        close = difflib.get_close_matches(key, SETTING_PARSERS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ChatError(f"unknown setting '{name}'; {hint}settings: {', '.join(SETTING_PARSERS)}")
    return key


@command("set", "/set [NAME VALUE]", "set temperature, top_p, max_new_tokens, repetition_penalty or verbose "
         "(on/off); alone: list them")
def set_setting(session: ChatSession, text: str, console: Console) -> None:
    words = text.split()
    if not words:
        console.info("  ".join(f"{k}={v}" for k, v in dataclasses.asdict(session.settings).items()))
        return
    if len(words) != 2:
        raise ChatError("usage: /set NAME VALUE, e.g. /set temperature 0.7")
    name = setting_name(words[0])
    try:
        value = SETTING_PARSERS[name](words[1])
    except ValueError as error:
        raise ChatError(f"bad value '{words[1]}' for {name}: {error}") from None
    setattr(session.settings, name, value)
    console.info(f"{name} = {value}")


@command("save", "/save FILE", "write the transcript as JSON (turns, image paths, settings)")
def save(session: ChatSession, text: str, console: Console) -> None:
    words = split_arguments(text)
    if len(words) != 1:
        raise ChatError("usage: /save FILE")
    path = session.save(words[0])
    console.info(f"saved {len(session.turns)} turns to {path}")


@command("help", "/help", "list the commands")
def show_help(session: ChatSession, text: str, console: Console) -> None:
    for item in COMMANDS.values():
        console.info(f"  {item.usage:<24} {item.help}")
    console.info("  a message may place attached images with <image> markers; //text sends a message starting with /")
    console.info("  Ctrl-C stops a reply (it is kept), Ctrl-D or /quit ends the session")


@command("quit", "/quit", "end the session")
def quit_session(session: ChatSession, text: str, console: Console) -> bool:
    return False


def run_command(session: ChatSession, line: str, console: Console) -> bool:
    """Run one `/command args` line; False when the session should end."""
    name, _, rest = line[1:].partition(" ")
    name = ALIASES.get(name.lower(), name.lower())
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"did you mean /{close[0]}? " if close else ""
        console.error(f"unknown command /{line[1:].split(' ')[0]}; {hint}/help lists the commands")
        return True
    try:
        return COMMANDS[name].run(session, rest, console) is not False
    except ChatError as error:
        console.error(str(error))
        return True
