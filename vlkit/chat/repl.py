"""The three ways to drive a chat session: interactive REPL, lines from a pipe, one `--prompt`.

Owns the loops: reading input (readline editing, history in `$VLKIT_HOME/chat_history`, Tab
completion of commands and image paths), telling commands from messages, printing replies
(streamed token by token in the REPL; one line, or one JSON object, per reply otherwise), and
keeping the session alive through Ctrl-C and one-line errors.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable
from pathlib import Path

from vlkit.chat.commands import COMMANDS, run_command
from vlkit.chat.console import Console
from vlkit.chat.session import ChatSession, Reply
from vlkit.errors import VlkitError, first_line

PROMPT = ">>> "
HISTORY_LENGTH = 2000


def reply_record(message: str, images: list[str], reply: Reply) -> dict:
    """The `--json` object of one reply."""
    return {
        "message": message,
        "images": images,
        "reply": reply.text,
        "finish_reason": reply.finish_reason,
        "prompt_tokens": reply.prompt_tokens,
        "image_tokens": reply.image_tokens,
        "images_in_context": reply.images_in_prompt,
        "new_tokens": reply.new_tokens,
        "first_token_seconds": None if reply.first_token_seconds is None else round(reply.first_token_seconds, 4),
        "seconds": round(reply.seconds, 4),
        "dropped_exchanges": reply.dropped_exchanges,
    }


class Driver:
    """Feeds lines to a session and prints what comes back."""

    def __init__(self, session: ChatSession, console: Console, json_mode: bool, stream: bool) -> None:
        self.session = session
        self.console = console
        self.json_mode = json_mode
        self.stream = stream and not json_mode
        self.failed_messages = 0

    def handle(self, line: str) -> bool:
        """One input line: a command or a message. False when the session should end."""
        line = line.strip()
        if not line:
            return True
        if line.startswith("/") and not line.startswith("//"):
            return run_command(self.session, line, self.console)
        self.message(line[1:] if line.startswith("//") else line)
        return True

    def message(self, text: str) -> Reply | None:
        images = [image.resolved for image in self.session.pending]
        started = [False]

        def show(piece: str) -> None:
            if not started[0]:
                piece = piece.lstrip()
                started[0] = bool(piece)
            if piece:
                self.console.write(piece)

        try:
            reply = self.session.send(text, on_text=show if self.stream else None, on_notice=self.console.notice,
                                      catch_interrupt=self.console.interactive)
        except KeyboardInterrupt:
            # Ctrl-C before generation began (while the prompt was built): nothing to keep.
            if not self.console.interactive:
                raise
            self.finish_line(started[0])
            self.console.notice("[stopped before the reply began; the conversation is unchanged]")
            return None
        except VlkitError as error:
            self.finish_line(started[0])
            self.console.error(str(error))
            self.failed_messages += 1
            return None
        except Exception as error:  # e.g. out of memory: one line, and the session (its history) lives on
            self.finish_line(started[0])
            self.console.error(f"generation failed ({type(error).__name__}: {first_line(error)}); "
                               "the conversation is unchanged")
            self.failed_messages += 1
            return None
        if self.json_mode:
            self.console.write(json.dumps(reply_record(text, images, reply)) + "\n")
        elif self.stream:
            if reply.finish_reason == "interrupted":
                self.console.write(self.console.dim(" [stopped]"))
            elif not reply.text:
                self.console.write(self.console.dim("(empty reply)"))
            self.console.write("\n")
        else:
            # One line per reply, so line N of the output answers message N; --json keeps line breaks.
            self.console.write(" ".join(reply.text.split("\n")) + "\n")
        if self.session.settings.verbose:
            self.console.notice(reply.summary())
        return reply

    def finish_line(self, started: bool) -> None:
        if started:
            self.console.write("\n")


# --- interactive ------------------------------------------------------------------------------------------
def complete_paths(text: str) -> list[str]:
    matches = glob.glob(os.path.expanduser(text) + "*")
    return [match + ("/" if os.path.isdir(match) else "") for match in sorted(matches)]


def setup_readline(history_file: Path):
    """Line editing, persistent history and Tab completion; None where readline is unavailable."""
    try:
        import readline
    except ImportError:  # e.g. Windows without pyreadline
        return None
    try:
        history_file.parent.mkdir(parents=True, exist_ok=True)
        if history_file.is_file():
            readline.read_history_file(history_file)
    except OSError:
        pass
    readline.set_history_length(HISTORY_LENGTH)

    def complete(text: str, state: int) -> str | None:
        buffer = readline.get_line_buffer()
        if buffer.startswith("/") and " " not in buffer:
            options = [f"/{name}" for name in COMMANDS if f"/{name}".startswith(text)]
        elif buffer.startswith(("/image ", "/save ")):
            options = complete_paths(text)
        else:
            options = []
        return options[state] if state < len(options) else None

    readline.set_completer_delims(" \t\n\"'")
    readline.set_completer(complete)
    readline.parse_and_bind("tab: complete")
    return readline


def save_history(readline, history_file: Path) -> None:
    if readline is None:
        return
    try:
        readline.write_history_file(history_file)
    except OSError:
        pass


def prompt_text(session: ChatSession) -> str:
    count = len(session.pending)
    return f"[{count} image{'s' if count != 1 else ''}] {PROMPT}" if count else PROMPT


def interactive(driver: Driver, history_file: Path) -> int:
    readline = setup_readline(history_file)
    console = driver.console
    console.info("type a message, /help for commands; Ctrl-C stops a reply, Ctrl-D or /quit exits")
    try:
        while True:
            try:
                line = input(prompt_text(driver.session))
            except EOFError:
                console.write("\n")
                break
            except KeyboardInterrupt:  # at the prompt: drop the line, like a shell
                console.write("\n")
                continue
            if not driver.handle(line):
                break
    finally:
        save_history(readline, history_file)
    return 0


# --- non-interactive --------------------------------------------------------------------------------------
def lines(driver: Driver, stream: Iterable[str]) -> int:
    """One message or command per line; replies on stdout, everything else on stderr."""
    for line in stream:
        if not driver.handle(line.rstrip("\n")):
            break
    return 1 if driver.failed_messages else 0


def one_shot(driver: Driver, prompt: str) -> int:
    reply = driver.message(prompt)
    return 0 if reply is not None else 1
