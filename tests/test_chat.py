"""`vlkit chat` and `load_any`: a REPL driven through a pseudo-terminal, the line and --json modes,
--prompt, context overflow, Ctrl-C, and loading vlkit and llava folders.

Nothing is trained: the tiny random VLM is saved with save_pretrained and loaded back the way
users load exports. It answers gibberish (mostly newlines), so the tests check structure: prompt
and image-token counts, which turns and images the conversation holds, what goes to which stream.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import signal
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pexpect
import pytest
import torch
from chat_that_waits import WAIT_MARK, WAITING
from conftest import (
    HANG_GUARD_S,
    IMAGE_SIZE,
    PATCH_SIZE,
    make_tokenizer,
    random_image,
    tiny_clip_vision_config,
    tiny_llama_config,
)
from pexpect.fdpexpect import fdspawn

from vlkit.chat.commands import run_command
from vlkit.chat.console import Console
from vlkit.chat.session import ChatError, ChatSession, Settings
from vlkit.cli import main
from vlkit.errors import ModelLoadError
from vlkit.loading import content_parts, load_any

REPO = Path(__file__).resolve().parents[1]
CTRL_C = "\x03"  # the terminal's interrupt character: the line discipline sends SIGINT
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2  # mlp connector: one token per patch


@pytest.fixture(scope="module")
def vlm_dir(tiny_vlm, tmp_path_factory) -> str:
    """The tiny VLM as `save_pretrained` writes it (model_type vlkit)."""
    model, processor = tiny_vlm
    folder = tmp_path_factory.mktemp("chat_vlm")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("chat_images")
    for seed, name in enumerate(["a.png", "b.png", "c.png"]):
        random_image(seed).save(folder / name)
    (folder / "corrupt.png").write_bytes(b"\x89PNG but not really")
    return folder


@pytest.fixture(scope="module")
def loaded(vlm_dir):
    return load_any(vlm_dir)


def quiet_console() -> tuple[Console, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    return Console(interactive=False, out=out, err=err), out, err


# --- load_any ---------------------------------------------------------------------------------------------
def test_load_any_reads_a_save_pretrained_vlkit_folder(loaded, vlm_dir):
    assert loaded.kind == "vlkit" and loaded.device.type == "cpu"
    assert type(loaded.model).__name__ == "VlkitForConditionalGeneration" and not loaded.model.training
    assert loaded.image_seq_length == TOKENS_PER_IMAGE and loaded.context_length == 512
    text = loaded.describe()
    for expected in ("vision tower  CLIPVisionModel", f"connector     mlp (depth 2): {TOKENS_PER_IMAGE} tokens per image",
                     "LLM           LlamaForCausalLM", "context 512", "device        cpu, float32"):
        assert expected in text, (expected, text)
    # The measured prompt length matches what the processor really builds, image tokens included.
    messages = [{"role": "user", "content": "<image>\n<image>\nCompare them."}]
    inputs = loaded.prompt_inputs([messages], [[random_image(1), random_image(2)]])
    assert loaded.count_prompt_tokens(messages) == inputs["input_ids"].shape[1]
    assert int((inputs["input_ids"] == loaded.image_token_id).sum()) == 2 * TOKENS_PER_IMAGE


LLAVA_TEMPLATE = (  # like llava-hf templates: content is always a list of parts
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> str:
    """A stock LlavaForConditionalGeneration + LlavaProcessor folder, as `export --format llava` writes."""
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    folder = tmp_path_factory.mktemp("chat_llava")
    tokenizer = make_tokenizer()
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    config = LlavaConfig(
        vision_config=tiny_clip_vision_config().to_dict(), text_config=tiny_llama_config(len(tokenizer)).to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=TOKENS_PER_IMAGE,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )
    torch.manual_seed(6)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                   vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE,
                   num_additional_image_tokens=1).save_pretrained(folder)
    return str(folder)


def test_load_any_reads_a_llava_folder_and_chats_with_images_at_two_turns(llava_dir, image_dir):
    loaded = load_any(llava_dir)
    assert loaded.kind == "llava" and type(loaded.model).__name__ == "LlavaForConditionalGeneration"
    assert loaded.image_seq_length == TOKENS_PER_IMAGE
    assert "llava projector (mlp, depth 2, gelu)" in loaded.describe()
    session = ChatSession(loaded, settings=Settings(max_new_tokens=3))
    session.attach([str(image_dir / "a.png")])
    first = session.send("What is this?")
    session.attach([str(image_dir / "b.png")])
    second = session.send("And this one?")
    assert (first.images_in_prompt, first.image_tokens) == (1, TOKENS_PER_IMAGE)
    assert (second.images_in_prompt, second.image_tokens) == (2, 2 * TOKENS_PER_IMAGE)
    assert second.prompt_tokens == loaded.count_prompt_tokens(session.messages(session.turns[:-1]))
    # Stock Llava templates get content parts: the string markers became {"type": "image"}.
    rendered = loaded.render(session.messages(session.turns[:-1]))
    assert rendered.count("<image>") == 2 and rendered.endswith("<|im_start|>assistant\n")


def test_content_parts_keep_marker_positions():
    assert content_parts("<image>\nWhat is it?", "<image>") == [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    assert content_parts("Left <image> right", "<image>") == [
        {"type": "text", "text": "Left "}, {"type": "image"}, {"type": "text", "text": " right"}]


def test_load_any_errors_are_one_line(tmp_path, tiny_llm_dir):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    unfinished = tmp_path / "run" / "checkpoints" / "checkpoint-3"
    unfinished.mkdir(parents=True)
    (unfinished / "manifest.json").write_text("{}")
    (unfinished / "trainer_state.json").write_text("{}")
    cases = {
        str(tmp_path / "missing" / "model"): "not a local folder",
        str(tmp_path / "file.txt"): "is a file",
        str(tmp_path / "empty"): "neither a vlkit run",
        tiny_llm_dir: "holds a 'llama' model, not a vision-language model",
        str(tmp_path / "run"): "unfinished run; use its newest checkpoint: " + str(unfinished),
        "nobody-vlkit-test/no-such-model": "not a local folder",
    }
    for source, message in cases.items():
        with pytest.raises(ModelLoadError) as error:
            load_any(source)
        assert message in str(error.value) and "\n" not in str(error.value), (source, str(error.value))
    with pytest.raises(ModelLoadError, match="unknown dtype 'float8'"):
        load_any(str(tmp_path / "empty"), dtype="float8")


# --- the session ------------------------------------------------------------------------------------------
def test_images_follow_markers_and_a_mismatch_keeps_the_pending_images(loaded, image_dir):
    session = ChatSession(loaded, settings=Settings(max_new_tokens=2))
    session.attach([str(image_dir / "a.png"), str(image_dir / "b.png")])
    with pytest.raises(ChatError, match="1 <image> marker"):
        session.send("Only <image> here")
    assert len(session.pending) == 2 and session.turns == []
    reply = session.send("Left <image> and right <image>: which is brighter?")
    assert session.turns[0].content == "Left <image> and right <image>: which is brighter?"
    assert reply.image_tokens == 2 * TOKENS_PER_IMAGE and session.pending == []
    with pytest.raises(ChatError, match="/image PATH attaches one"):
        session.send("a stray <image> marker")


def test_context_overflow_drops_the_oldest_exchanges_with_their_images(loaded, image_dir):
    # 512 positions, 200 kept for the reply: about 312 for the prompt, so a few 2-image turns fill it.
    session = ChatSession(loaded, settings=Settings(max_new_tokens=200))
    session.settings.max_new_tokens = 200
    notices = []
    for turn in range(6):
        session.attach([str(image_dir / "a.png"), str(image_dir / "b.png")])
        reply = session.send(f"turn {turn}: describe both images in detail please", on_notice=notices.append)
        assert reply.prompt_tokens <= 512 - 200
        assert reply.finish_reason in ("stop", "length")
        assert reply.images_in_prompt == len(session.images_in_context())
    assert notices and all(n.startswith("context full: dropped the oldest") for n in notices)
    assert session.context_start > 0 and session.context_start % 2 == 0
    assert session.turns[session.context_start].role == "user"
    assert len(session.turns) == 12  # the transcript keeps every turn
    transcript = session.transcript()
    assert transcript["dropped_from_context"] == session.context_start and len(transcript["turns"]) == 12
    # A message too long on its own is refused; nothing changes.
    before = (len(session.turns), session.context_start)
    with pytest.raises(ChatError, match="more than the .* the context leaves"):
        session.send("word " * 400)
    assert (len(session.turns), session.context_start) == before


def test_ctrl_c_stops_the_reply_and_keeps_it(loaded):
    session = ChatSession(loaded, settings=Settings(max_new_tokens=300))

    def press_ctrl_c(piece: str) -> None:
        raise KeyboardInterrupt  # what the main thread gets while it waits for tokens

    reply = session.send("tell me a long story", on_text=press_ctrl_c)
    assert reply.finish_reason == "interrupted" and reply.new_tokens < 300
    assert session.turns[-1].role == "assistant" and session.turns[-1].interrupted
    assert session.transcript()["turns"][-1]["interrupted"] is True
    # Without catching (scripts), Ctrl-C propagates and the conversation is unchanged.
    with pytest.raises(KeyboardInterrupt):
        session.send("again", on_text=press_ctrl_c, catch_interrupt=False)
    assert len(session.turns) == 2


def test_commands_report_mistakes_in_one_line(loaded, image_dir, tmp_path):
    session = ChatSession(loaded)
    console, out, err = quiet_console()
    for line in ("/bogus", "/set temprature 1", "/set top_p 2", "/set max_new_tokens", "/image",
                 f"/image {image_dir / 'corrupt.png'}", '/image "unclosed', f"/save {tmp_path / 'no' / 'dir.json'}"):
        assert run_command(session, line, console) is True
    lines = err.getvalue().splitlines()
    assert len(lines) == 8 and all(line.startswith("error: ") for line in lines), lines
    assert "did you mean temperature?" in lines[1] and "image does not decode" in lines[5]
    assert out.getvalue() == ""  # non-interactive: stdout is for replies only
    assert run_command(session, "/set top-p 0.5", console) and session.settings.top_p == 0.5
    assert run_command(session, "/system Answer in French.", console) and session.system == "Answer in French."
    assert run_command(session, "/system -", console) and session.system is None
    assert run_command(session, "/quit", console) is False


# --- the CLI, in process: line mode, --json, --prompt -------------------------------------------------------
def run_chat(monkeypatch, capsys, args: list[str], stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))  # not a terminal
    code = main(["chat", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_line_mode_prints_one_reply_per_message_line(monkeypatch, capsys, vlm_dir, image_dir):
    monkeypatch.chdir(image_dir)
    script = "\n".join([
        "/image a.png", "What is this?", "", "/image b.png c.png missing.png", "/images", "And these?",
        "/bogus", "//slash is a message", "/quit", "never read",
    ]) + "\n"
    code, out, err = run_chat(monkeypatch, capsys, [vlm_dir, "--max-new-tokens", "4"], script)
    assert code == 0
    assert out.count("\n") == 3  # three messages, three reply lines; nothing else on stdout
    assert "vision tower" in err and "image not found" in err and "unknown command /bogus" in err
    assert "in context: 1 image," in err and "next message: b.png, c.png" in err


def test_json_mode_prints_one_object_per_reply(monkeypatch, capsys, vlm_dir, image_dir):
    script = f"First question\n/image {image_dir / 'b.png'} {image_dir / 'c.png'}\nSecond question\n"
    code, out, err = run_chat(monkeypatch, capsys,
                              [vlm_dir, "--json", "--image", str(image_dir / "a.png"), "--max-new-tokens", "3"], script)
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["message"] for r in records] == ["First question", "Second question"]
    assert records[0]["images"] == [str(image_dir / "a.png")]
    assert records[1]["images"] == [str(image_dir / "b.png"), str(image_dir / "c.png")]
    assert [r["images_in_context"] for r in records] == [1, 3]
    assert [r["image_tokens"] for r in records] == [TOKENS_PER_IMAGE, 3 * TOKENS_PER_IMAGE]
    assert records[1]["prompt_tokens"] > records[0]["prompt_tokens"]
    assert all(r["new_tokens"] == 3 and r["finish_reason"] == "length" for r in records)
    assert isinstance(records[0]["reply"], str) and records[0]["first_token_seconds"] is not None


def test_prompt_answers_once_and_exits(monkeypatch, capsys, vlm_dir, image_dir):
    code, out, err = run_chat(monkeypatch, capsys, [vlm_dir, "--image", str(image_dir / "a.png"),
                                                    "--prompt", "What is this?", "--max-new-tokens", "3", "--json"],
                              "this stdin is ignored\n")
    assert code == 0
    (record,) = [json.loads(line) for line in out.splitlines()]
    assert record["message"] == "What is this?" and record["image_tokens"] == TOKENS_PER_IMAGE
    # A script's --image that cannot be read is an error, not an answer without the image.
    code, out, err = run_chat(monkeypatch, capsys, [vlm_dir, "--image", str(image_dir / "corrupt.png"),
                                                    "--prompt", "What is this?"])
    assert code != 0 and out == "" and "image does not decode" in err.splitlines()[-1]
    assert "loading" not in err  # refused before the model was loaded


# --- the REPL through a pseudo-terminal --------------------------------------------------------------------
def spawn_in_pty(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[fdspawn, subprocess.Popen]:
    """Start argv on a new pseudo-terminal that is its controlling terminal (so Ctrl-C is a SIGINT).

    subprocess + `setsid --ctty` runs no Python between fork and exec. pexpect.spawn does (pty.fork,
    then Python set-up in the child), and forking the multi-threaded pytest process that way left the
    child silent for minutes in two full-suite runs.
    """
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
    # Start it with SIGINT ignored, as a test runner launched in the background passes it on: the REPL
    # must still stop a reply on Ctrl-C (it did not, in such a run).
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        process = subprocess.Popen(["setsid", "--ctty", *argv], stdin=slave, stdout=slave, stderr=slave,
                                   cwd=cwd, env=env, close_fds=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    os.close(slave)
    return fdspawn(master, encoding="utf-8", timeout=HANG_GUARD_S), process


def test_repl_in_a_pseudo_terminal(vlm_dir, image_dir, tmp_path):
    env = {**os.environ, "TERM": "dumb", "VLKIT_HOME": str(tmp_path / "home"), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO)}
    prompt = ">>> "
    # chat_that_waits: `vlkit chat` whose reply to WAIT_MARK only starts once Ctrl-C has stopped it.
    child, process = spawn_in_pty([sys.executable, str(REPO / "tests" / "chat_that_waits.py"), "chat", vlm_dir,
                                   "--max-new-tokens", "6"], env, image_dir)
    child.expect_exact(prompt)

    def do(line: str, *expected: str) -> str:
        child.sendline(line)
        for pattern in expected:
            child.expect_exact(pattern)
        child.expect_exact(prompt)
        return child.before

    assert f"{TOKENS_PER_IMAGE} tokens per image" in child.before and "vision tower" in child.before
    do("/set verbose on", "verbose = True")
    do("/image a.png", "attached a.png: 1 image for your next message", "[1 image]")
    do("What is in this picture?", f"(1 image, {TOKENS_PER_IMAGE} image tokens)")
    do("/image b.png c.png", "2 images for your next message", "[2 images]")
    do("And what about these two?", f"(3 images, {3 * TOKENS_PER_IMAGE} image tokens)")
    do("/image nowhere.png", "error: image not found")
    do("/image corrupt.png", "error: image does not decode")
    do("/frobnicate", "error: unknown command /frobnicate")
    do("/images", f"in context: 3 images, {3 * TOKENS_PER_IMAGE} image tokens", "message 2: b.png, c.png")
    do(f"/save {tmp_path / 'chat.json'}", "saved 4 turns")
    # Ctrl-C at the prompt drops the line; Ctrl-C during a reply stops it and keeps the session.
    child.send("half a line")
    child.expect_exact("half a line")  # readline echoed it: it is waiting for more, as after a person typed
    child.send(CTRL_C)
    child.expect_exact(prompt)
    child.sendline(f"Now a very long answer, please. {WAIT_MARK}")
    child.expect_exact(WAITING)  # the reply has begun, and it cannot end before Ctrl-C
    child.send(CTRL_C)
    child.expect_exact("[stopped]")
    child.expect(r"\| interrupted")
    child.expect_exact(prompt)
    do("/reset", "conversation cleared")
    do("/images", "in context: 0 images")
    do("/set max_new_tokens 3")
    do("Still alive?", "(0 images, 0 image tokens)")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    assert process.wait(timeout=HANG_GUARD_S) == 0
    child.close()

    transcript = json.loads((tmp_path / "chat.json").read_text())
    users = [turn for turn in transcript["turns"] if turn["role"] == "user"]
    assert [[Path(p).name for p in turn["images"]] for turn in users] == [["a.png"], ["b.png", "c.png"]]
    assert users[1]["content"].count("<image>") == 2 and transcript["settings"]["verbose"] is True
    history = (tmp_path / "home" / "chat_history").read_text()
    assert "/image b.png c.png" in history  # readline history persists across sessions


def test_load_4bit_quantizes_the_llm_only_and_still_answers(vlm_dir, image_dir):
    from bitsandbytes.nn import Linear4bit

    loaded = load_any(vlm_dir, load_4bit=True)
    assert "(LLM in 4-bit)" in loaded.describe()
    assert any(isinstance(m, Linear4bit) for m in loaded.model.language_model.modules())
    assert not any(isinstance(m, Linear4bit) for m in loaded.model.vision_tower.modules())
    assert not any(isinstance(m, Linear4bit) for m in loaded.model.connector.modules())
    session = ChatSession(loaded, settings=Settings(max_new_tokens=2))
    session.attach([str(image_dir / "a.png")])
    assert session.send("What is this?").image_tokens == TOKENS_PER_IMAGE


def test_repetition_penalty_is_a_flag_as_it_is_a_setting(monkeypatch, capsys, vlm_dir):
    """--repetition-penalty sets what `/set repetition_penalty` sets; a value out of range stops before loading."""
    from transformers import GenerationMixin

    code, out, err = run_chat(monkeypatch, capsys, [vlm_dir, "--prompt", "Hi", "--max-new-tokens", "2",
                                                    "--repetition-penalty", "0"])
    assert code != 0 and "--repetition-penalty > 0" in err.splitlines()[-1] and "loading" not in err
    asked, generate = [], GenerationMixin.generate

    def recording_generate(self, *args, **kwargs):
        asked.append(kwargs.get("repetition_penalty"))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", recording_generate)
    code, out, err = run_chat(monkeypatch, capsys, [vlm_dir, "--prompt", "Hi", "--max-new-tokens", "2",
                                                    "--repetition-penalty", "1.3"])
    assert code == 0 and asked == [1.3]


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float16)],
                         ids=["ampere", "before-ampere"])
def test_dtype_auto_on_a_gpu_is_bf16_only_where_it_computes_it(native, expected, monkeypatch):
    """`--dtype auto`: bf16 on a GPU that computes it, float16 on one that only emulates it (torch counts both)."""
    from vlkit.loading import resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    assert resolve_dtype("auto", torch.device("cuda")) is expected
