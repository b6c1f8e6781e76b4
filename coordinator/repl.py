"""The interactive chat of `run-pipeline --chat`: a conversation, its commands, and the terminal.

Ctrl-C during a reply stops the reply between steps (never inside one, where the pipeline has a
message in flight) and returns to the prompt. The text shown so far stays in the conversation
as the assistant's turn, so the next turn sees what the user saw; a reply stopped before any
text drops the user's turn with it (readline's history still has the line). Two Ctrl-C in a
row (the one that stopped a reply counts), Ctrl-D or /bye end the chat.

With stdin not a terminal (lines from a pipe or a file) no one can /clear a conversation that
reached the context size: the first turn that fails ends the chat with status 1, the rest of the
input unread (each later turn sent the same history again and printed the same partial text).
Nor is anyone at a prompt to press Ctrl-C twice: one Ctrl-C, during a reply or while a line is
awaited, ends the chat as it ends a run without --chat (the reply's text so far kept; the
KeyboardInterrupt goes on to the command, which prints its one line and exits 130).
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass, field

from layerstream.coordinator.args import PROG
from layerstream.coordinator.chat_sizes import MAX_OUTPUT
from layerstream.coordinator.stdio import print_stream
from layerstream.coordinator.turn import Rates, Turn, counted
from layerstream.errors import ConfigError, ContextFullError, LayerstreamError, PromptTooLongError
from layerstream.proto.signals import Stopped

HELP = """commands:
  /bye          end the chat (as Ctrl-D)
  /clear        forget the conversation (the system message stays)
  /system TEXT  set the system message (/system alone removes it)
  /help         this list
  //TEXT        send /TEXT as a message (a message that begins with /)
Ctrl-C stops a reply; twice in a row, it ends the chat."""
ERROR = f"{PROG}: error: "  # the command's own error lines begin so (cli._die)


@dataclass
class Conversation:
    """The messages so far and the slash commands that change them."""

    system: str | None = None
    turns: list[dict] = field(default_factory=list)

    def messages(self, user: str | None = None) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns + ([{"role": "user", "content": user}] if user is not None else [])

    def add(self, user: str, reply: str) -> None:
        self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]

    def command(self, line: str) -> tuple[str, str]:
        """A slash command: ("quit", ""), or ("say", what to tell the user)."""
        name, _, rest = line.strip().partition(" ")
        if name == "/bye":
            return "quit", ""
        if name == "/clear":
            n = len(self.turns) // 2
            self.turns.clear()
            return "say", f"conversation cleared ({counted(n, 'turn')} forgotten)"
        if name == "/system":
            self.system = rest.strip() or None
            return "say", "system message set" if self.system else "system message removed"
        if name in ("/help", "/?"):
            return "say", HELP
        return "say", f"unknown command {name}; /help lists the commands, and /{name} sends it as a message"


class LineReader:
    """Lines from stdin: through readline (editing, history) when a person types at a terminal; the
    prompt only where a person sees it, never into piped output."""

    def __init__(self, stdin=None, stdout=None, stderr=None):
        self.stdin, self.stdout, self.stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
        self.person = is_terminal(self.stdin)
        # input() edits with readline only when stdin and stdout are both terminals, and writes
        # its prompt to stdout: so only then
        self.use_input = self.person and is_terminal(self.stdout) and self.stdin is sys.stdin and self.stdout is sys.stdout
        if self.use_input:
            try:
                import readline  # noqa: F401 - loading it gives input() line editing and history
            except ImportError:  # a Python built without it: plain lines
                pass

    def read(self, prompt: str) -> str | None:
        """One line without its newline; None at the end of input (Ctrl-D). A Ctrl-C raises
        KeyboardInterrupt, with `typed` set to the text it threw away."""
        self.typed = ""
        if self.use_input:
            try:
                return input(prompt)
            except EOFError:
                return None
            except KeyboardInterrupt:
                self.typed = _line_buffer()
                raise
        if self.person and is_terminal(self.stderr):
            self.stderr.write(prompt)
            self.stderr.flush()
        line = self.stdin.readline()
        return line.rstrip("\r\n") if line else None


def _line_buffer() -> str:
    try:
        import readline

        return readline.get_line_buffer()
    except ImportError:
        return ""


def is_terminal(stream) -> bool:
    """Whether `stream` is a terminal (False for a closed or replaced one)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _StopOnCtrlC:
    """While a reply runs: the first Ctrl-C asks it to stop after the current step, a second one
    interrupts at once (a step that hangs never traps the user)."""

    def __init__(self):
        self.pressed = False

    def __enter__(self):
        try:
            self.old = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread: Ctrl-C keeps its default
            self.old = None
        return self

    def _on_sigint(self, signum, frame):
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)


def chat(engine, params, system: str | None = None, *, rates_each: bool = False, total: Rates | None = None,
         reader: LineReader | None = None, out=None, err=None) -> int:
    """The chat loop; returns the exit status (0 for /bye and Ctrl-D, 130 for two Ctrl-C at a person's
    prompt, 1 where a turn failed with stdin not a terminal). With stdin not a terminal a Ctrl-C
    raises KeyboardInterrupt on, as in a run without --chat."""
    out, err = out or sys.stdout, err or sys.stderr
    reader = reader or LineReader(stdout=out, stderr=err)
    conv = Conversation(system)
    total = total if total is not None else Rates()
    why = _system_too_long(engine, system)
    if why:  # (refused before a line is read, where it was blamed on the first message)
        err.write(f"{ERROR}{why}\n")
        return 1
    if reader.person:
        err.write("Chat with the model; /help lists the commands, Ctrl-D or /bye ends it.\n")
    ctrl_c = False  # the last thing the user did was a Ctrl-C
    while True:
        try:
            line = reader.read("> ")
        except KeyboardInterrupt as e:
            if not reader.person or isinstance(e, Stopped):  # (SIGTERM, SIGHUP: the command stops, 143 or 129)
                raise
            if getattr(reader, "typed", ""):  # a line thrown away, as a shell does: never a quit
                ctrl_c = False
                err.write("\n")
                continue
            if ctrl_c:
                err.write("\n")
                return 130
            ctrl_c = True
            err.write("\n(Ctrl-C again, Ctrl-D or /bye to quit)\n")
            continue
        if line is None:
            if reader.person:
                err.write("\n")
            return 0
        ctrl_c = False
        if not line.strip():
            continue
        if n := line.count("\ufffd"):  # (bytes that were not UTF-8, replaced as read: as a one-shot prompt warns)
            err.write(f"{PROG}: warning: the line: not UTF-8 text ({counted(n, 'character')} replaced)\n")
        if line.lstrip().startswith("//"):  # (a message that begins with /: one / dropped)
            line = line.lstrip()[1:]
        elif line.lstrip().startswith("/"):
            name, _, rest = line.strip().partition(" ")  # (a /system too long is refused as it is set)
            why = _system_too_long(engine, rest.strip()) if name == "/system" else None
            if why:
                err.write(f"{ERROR}{why}" + ("; the chat ends here\n" if not reader.person else
                                             "; the system message is unchanged\n"))
                if not reader.person:
                    return 1
                continue
            what, text = conv.command(line)
            if what == "quit":
                return 0
            err.write(text + "\n")
            continue
        huge = _beyond_context(engine, line, "the message") or (  # (and a /system just set)
            conv.system and _beyond_context(engine, conv.system, "the system message (--system or /system)"))
        if huge:
            err.write(f"{ERROR}{huge}" + ("; the chat ends here\n" if not reader.person else "\n"))
            if not reader.person:
                return 1
            continue
        try:
            ids = engine.encode_chat(conv.messages(line))
        except LayerstreamError as e:
            err.write(f"{ERROR}{e}\n")
            if not reader.person:
                return 1
            continue
        turn = Turn(engine, ids, params)
        try:
            with _StopOnCtrlC() as sigint:  # (print_stream ends the reply's line whatever stops it)
                reply = print_stream(turn.pieces(stop=lambda: sigint.pressed), out)
        except PromptTooLongError as e:  # (refused before it ran: nothing was shown)
            err.write(_too_long(engine, conv, line, e, reader.person) + ("; the chat ends here\n" if not reader.person else "\n"))
            if not reader.person:
                return 1
            continue
        except ContextFullError:
            full = f"{ERROR}the conversation reached the context size ({engine.cfg.ctx} tokens)"
            if not reader.person:
                err.write(f"{full}; the chat ends here (give a larger --ctx)\n")
                return 1
            err.write(f"{full}; /clear starts over (or restart with a larger --ctx)\n")
            continue
        if turn.stopped and not reader.person:
            total.add(turn.rates)
            raise KeyboardInterrupt
        if turn.stopped:
            ctrl_c = True
            err.write("[reply stopped; Ctrl-C again to quit]\n")
        if reply or not turn.stopped:
            conv.add(line, reply)
        total.add(turn.rates)
        if rates_each:
            err.write(turn.rates.line() + "\n")


def _too_long(engine, conv: Conversation, line: str, e: PromptTooLongError, person: bool) -> str:
    """Why a turn (the conversation with `line`, through the chat template) was refused: no room left
    in the context for a reply. /clear is offered to a person where the message alone would fit."""
    fix = f"run with a larger --ctx (--ctx-size), of more than {e.tokens} tokens to leave room for the reply"
    why = _system_too_long(engine, conv.system)
    if why:
        return f"{ERROR}{why}"
    if not conv.turns:
        return f"{ERROR}the message is {e.tokens} tokens with the chat template, and the context holds {e.ctx}; {fix}"
    alone = len(engine.encode_chat(Conversation(conv.system).messages(line)))
    clear = "/clear starts over, or " if person and alone < e.ctx else ""
    return (f"{ERROR}the conversation with this message is {e.tokens} tokens, and the context holds {e.ctx}; "
            f"{clear}{fix}")


def _system_too_long(engine, system: str | None) -> str | None:
    """Why the system message alone leaves no room in the context, or None."""
    if not system:
        return None
    huge = _beyond_context(engine, system, "the system message (--system or /system)")
    if huge or engine.cfg.on_context_full != "error":  # (sliding, a long system message runs on)
        return huge
    try:
        n = len(engine.encode_chat([{"role": "system", "content": system}]))
    except LayerstreamError:  # (a template that wants a user's message after it: the turn says what is wrong)
        return None
    if n < engine.cfg.ctx:
        return None
    return (f"the system message (--system or /system) is {n} tokens with the chat template, and the context "
            f"holds {engine.cfg.ctx}; give a shorter one, or a larger --ctx (--ctx-size)")


# bytes of a turn tokenized whatever its size (the tokenizer's time is short beside a reply's): past
# them, one too long for the context is refused untokenized, and a shorter one is counted in tokens
TOKENIZE_FREELY = 256 << 10


def _beyond_context(engine, text: str, what: str, rendered: bool = True) -> str | None:
    """Why a long `text` cannot be a turn whatever it says, or None: past TOKENIZE_FREELY bytes, more
    than the context's tokens can spell (Tokenizer.longest_piece; where the context does not slide),
    or, where the chat template renders it (`rendered`), more characters than it may render
    (MAX_OUTPUT). Such a text is not tokenized or rendered: tokenizing it took minutes, and the
    template then stopped at its own size limit, in that limit's words."""
    size, ctx = len(text.encode("utf-8", "replace")), engine.cfg.ctx
    if engine.cfg.on_context_full == "error" and size > TOKENIZE_FREELY and size > ctx * engine.tokenizer.longest_piece:
        return (f"{what} is {size:,} bytes, more than a context of {ctx} tokens holds; give a shorter one, or a "
                f"larger --ctx (--ctx-size)")
    if rendered and len(text) > MAX_OUTPUT:
        return f"{what} is {len(text):,} characters, more than a chat prompt may be ({MAX_OUTPUT:,}); give a shorter one"
    return None


def prompt_within_context(engine, text: str, chat: bool) -> str:
    """The one-shot prompt `text`, or ConfigError where it cannot fit the context whatever it says
    (_beyond_context's rules): a huge prompt file was tokenized whole, for long and in many
    gigabytes, only to be refused by its token count."""
    why = _beyond_context(engine, text, "the prompt", rendered=chat)
    if why:
        raise ConfigError(why)
    return text
