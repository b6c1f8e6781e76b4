"""The files run-pipeline's options name, checked or read before any model is opened: why one
cannot be read, a prompt file's text, and --trace's file opened for writing once up front."""

from __future__ import annotations

import contextlib
import os
import select
import stat
import sys
import threading

from layerstream.coordinator.spelling import UsageError
from layerstream.errors import ConfigError
from layerstream.proto.timeline import trace_part


def path_problem(path: str, what: str = "file") -> str | None:
    """Why a file to read cannot be read, or None."""
    if os.path.isdir(path):
        return "is a directory; give the .gguf file inside it" if what == "model" else "is a directory, not a file"
    if not os.path.exists(path):
        if os.path.islink(path):  # (a link to nothing, or a loop of links: ELOOP)
            try:
                os.stat(path)
            except OSError as e:
                return f"a symbolic link whose target cannot be reached ({e.strerror})"
        return "no such file"
    if not os.path.isfile(path):
        return "is not a regular file"
    if not os.access(path, os.R_OK):
        return "not readable (check its permissions)"
    return None


def no_text(path: str) -> str | None:
    """Why a regular file holds nothing to read ("the file is empty", or its read error), or None. A
    size of 0 alone does not say: /proc's files report 0 and hold text (or refuse to be read)."""
    if os.path.getsize(path):
        return None
    try:
        with open(path, "rb") as f:
            return None if f.read(1) else "the file is empty"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"


MAX_PERPLEXITY_FILE = 16 << 20  # --perplexity's text: tokenized whole first, its tokenizer's records many times its size


def perplexity_problem(path: str) -> str | None:
    """Why --perplexity's file cannot be scored, or None; `-` (standard input), a pipe or a terminal
    pass, and are read to their end at the run (perplexity_text)."""
    if path == "":
        return "an empty path; give a file, or - for standard input"
    if _piped(path):
        return None
    why = path_problem(path)
    if why:
        return why
    size = os.path.getsize(path)
    if size > MAX_PERPLEXITY_FILE:
        return f"{size / 2**20:.1f} MiB, {_OVER_PERPLEXITY} FILE"
    return no_text(path)


_OVER_PERPLEXITY = (f"over the {MAX_PERPLEXITY_FILE >> 20} MiB a run scores (the whole text is tokenized in memory "
                    f"first); score a part of it, e.g. head -c {MAX_PERPLEXITY_FILE >> 20}M")


MAX_PROMPT_FILE = 64 << 20  # bytes of a -f file: more than any context holds (4 M tokens at a few bytes each)
WAIT_NOTE_S = 1.0  # a -f pipe read this long says on stderr that it waits for its text


def _mode(path: str) -> int:
    """The st_mode of a path that names something (0 for `-`, "" and a path to nothing)."""
    return os.stat(path).st_mode if path not in ("", "-") and os.path.exists(path) else 0


def _piped(path: str) -> bool:
    """`-`, a pipe or a terminal (as /dev/stdin, <(...)): read to its end, never sized up front."""
    mode = _mode(path)
    return path == "-" or stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


def prompt_file_problem(path: str) -> str | None:
    """Why -f's file cannot be read, or None; `-`, a pipe or a terminal are read to their end
    (read_prompt), so they pass."""
    return "an empty path; give a file" if path == "" else None if _piped(path) else path_problem(path)


def perplexity_text(path: str) -> str:
    """--perplexity's text (`-`: standard input's), to its end, at most MAX_PERPLEXITY_FILE bytes; bytes
    that are not UTF-8 become U+FFFD. UsageError where a pipe's text is too long or blank, ConfigError
    where the file cannot be read (checked up front, it can still fail)."""
    option = f"--perplexity {path}"
    text = _decoded(path, MAX_PERPLEXITY_FILE, lambda e: ConfigError(f"{option}: cannot be read ({e.strerror or e})"),
                    f"{option}: {_OVER_PERPLEXITY}")
    if _blank(text):
        raise UsageError(f"{option}: {'standard input holds' if path == '-' else 'the file holds'} no text")
    return text


def read_prompt(option: str, path: str) -> str:
    """-f's prompt text (bytes that are not UTF-8 become U+FFFD); UsageError naming the file."""
    why = prompt_file_problem(path)
    if why:
        raise UsageError(f"{option}: {why}")
    text = _read_text(option, path)
    if _blank(text):
        raise UsageError(f"{option}: the file holds no prompt text")
    return text


NO_PROMPT = "no prompt given; pass the prompt text (or pipe it in), or --chat for an interactive chat"


def read_prompt_text(args) -> None:
    """The prompt's text into args.prompt (checked args: args.check_args'): -f's file, or standard
    input where no prompt was given; UsageError where there is none; --perplexity's text into
    args.perplexity_text. Read last, after the model's header too: a file or a pipe can wait on its
    writer, and a command line that cannot run says so at once rather than after it."""
    if args.perplexity:
        args.perplexity_text = perplexity_text(args.perplexity)
    if args.prompt_file is not None:
        args.prompt = [read_prompt(args.prompt_source, args.prompt_file)]
    elif not args.prompt and not (args.serve or args.perplexity or args.chat):
        piped = piped_prompt()
        if piped == "":  # (it said no prompt was given: a probe's)
            raise UsageError("standard input holds no prompt text (it is empty or blank); pipe in the prompt, "
                             "or pass it as an argument")
        args.prompt = [piped] if piped is not None else []
    if not args.serve and not args.perplexity and not args.chat and not " ".join(args.prompt).strip():
        raise UsageError(NO_PROMPT)


def stdin_readable() -> bool:
    """Whether standard input is a pipe, a file or a socket (piped_prompt reads it), not a terminal,
    /dev/null or closed."""
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode) or stat.S_ISSOCK(mode)


def piped_prompt() -> str | None:
    """The prompt on standard input where that is a pipe or a file and no prompt was given
    (`echo text | run-pipeline -m M`, as Ollama reads one), read to its end; None where standard
    input is a terminal, /dev/null or closed, "" where it holds only blanks."""
    if not stdin_readable():
        return None
    text = _read_text("standard input", "-")
    return "" if _blank(text) else text


def _blank(text: str) -> bool:
    return not text.replace("\0", "").strip()


def _read_text(option: str, path: str) -> str:
    """The file's text (`-`: standard input's), to its end, at most MAX_PROMPT_FILE bytes, less one
    line end at its end (which a file's last line or `echo` adds; llama.cpp's -f drops a `\\n`).
    A named pipe that has not ended within WAIT_NOTE_S says on stderr, once, that it waits for it:
    it waited with nothing shown (a probe's)."""
    text = _decoded(path, MAX_PROMPT_FILE, lambda e: UsageError(f"{option}: cannot read it ({e.strerror or e})"),
                    f"{option}: larger than {MAX_PROMPT_FILE >> 20} MiB; no context holds a prompt that long",
                    f"{option}: waiting for text on the pipe (Ctrl-C stops)" if stat.S_ISFIFO(_mode(path)) else None)
    return text.removesuffix("\r\n") if text.endswith("\r\n") else text.removesuffix("\n")


def _decoded(path: str, limit: int, unreadable, too_long: str, waiting: str | None = None) -> str:
    """The file's text (`-`: standard input's) to its end, bytes that are not UTF-8 as U+FFFD;
    unreadable(OSError) raised where it cannot be read, UsageError(too_long) past `limit` bytes;
    `waiting` printed to stderr where the open and the read take over WAIT_NOTE_S."""
    note = threading.Timer(WAIT_NOTE_S, lambda: print(waiting, file=sys.stderr, flush=True)) if waiting else None
    if note is not None:
        note.daemon = True
        note.start()
    try:
        with (contextlib.nullcontext(sys.stdin.buffer) if path == "-" else open(path, "rb")) as f:
            raw = _read_all(f, limit + 1)
    except OSError as e:
        raise unreadable(e) from None
    finally:
        if note is not None:
            note.cancel()
    if len(raw) > limit:
        raise UsageError(too_long)
    return raw.decode("utf-8", "replace")


def _read_all(f, limit: int) -> bytes:
    """Up to `limit` bytes of f, to its end. A pipe its parent left non-blocking (as Node.js passes
    one) answers None while its writer is slow, which is not its end: wait for it. A terminal's read
    returns short only at the Ctrl-D that ends the text: reading again waited for a second one."""
    chunks, n = [], 0
    tty = f.isatty()
    while n < limit:
        b = f.read(limit - n)
        if b is None:
            select.select([f], [], [])
            continue
        if not b:
            break
        chunks.append(b)
        n += len(b)
        if tty:
            break
    return b"".join(chunks)


def check_trace(path: str, inputs: dict[str, str | None] | None = None) -> None:
    """--trace's file, opened for writing now (and removed again where this made it), and the part
    file it is written into first (timeline.write_chrome_trace), so that a path no one may write
    (root included: /proc/x) is refused before the run rather than after it; `inputs`: the files
    the run reads, by flag, which the trace must not replace (it overwrote -m's model, status 0)."""
    if os.path.isdir(path):
        raise UsageError(f"--trace {path}: is a directory; give a file name, for example "
                         f"{os.path.join(path, 'trace.json')}")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise UsageError(f"--trace {path}: exists and is not a regular file")
    for flag, given in (inputs or {}).items():
        if given and given != "-" and os.path.exists(path) and os.path.exists(given) and os.path.samefile(path, given):
            raise UsageError(f"--trace {path}: is {flag}'s file, which the trace would replace; give another file")
    existed = os.path.lexists(path)
    part = trace_part(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK, 0o644)
        os.close(fd)
        os.close(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        os.unlink(part)
    except OSError as e:
        raise UsageError(f"--trace {path}: cannot write there ({e.strerror}); give a file in a writable "
                         "directory") from None
    finally:
        if not existed:
            with contextlib.suppress(OSError):
                os.unlink(path)
