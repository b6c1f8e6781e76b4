"""How a command line is spelled: other tools' options, glued letters, and each option as typed."""

from __future__ import annotations

import argparse
import re
import unicodedata


class UsageError(Exception):
    """A command line that cannot run: reported as one line, exit status 2."""


def no_experts(flags: list[str], arch: str) -> str:
    """The refusal of mixture-of-experts flags given with a dense model (run-pipeline's and bin/bench's)."""
    many = len(flags) > 1
    return (f"{', '.join(flags)}: {'do' if many else 'does'} nothing with a dense model ({arch}, no experts); "
            f"drop {'them' if many else 'it'}")


def reader_dirs_problem(dirs: int, readers: int) -> str | None:
    """The refusal of --reader-dir given other than once per reader (None: not given, or once each),
    in one function's words for run-pipeline's usage error and ReaderOptions' ConfigError."""
    if not dirs or dirs == readers:
        return None
    given = {1: "once", 2: "twice"}.get(dirs, f"{dirs} times")  # (it said "given 1 times")
    return f"--reader-dir given {given} for --readers {readers}; give one per reader"


# Options of other tools whose meaning this command spells otherwise: (what they set, the option here).
# argparse's "unrecognized arguments: -b" named no way forward.
FOREIGN = {
    "-b": ("llama.cpp's prompt tokens per step", "--prefill-chunk N"),
    "--batch-size": ("llama.cpp's prompt tokens per step", "--prefill-chunk N"),
    "-ub": ("llama.cpp's prompt tokens per step", "--prefill-chunk N"),
    "--ubatch-size": ("llama.cpp's prompt tokens per step", "--prefill-chunk N"),
    "-np": ("llama.cpp's sequences at once", "--batch N"),
    "--parallel": ("llama.cpp's sequences at once", "--batch N"),
    "--n-ctx": ("the context size", "--ctx N"),
    "--max-model-len": ("vLLM's context size", "--ctx N"),
    "--max-num-seqs": ("vLLM's sequences at once", "--batch N"),
    "--gpu-memory-utilization": ("vLLM's share of the GPU's memory", "--vram-gb GiB"),
    "--num-predict": ("Ollama's tokens to generate", "--max-tokens N"),
    "-cnv": ("llama.cpp's conversation mode", "--chat"),
    "--conversation": ("llama.cpp's conversation mode", "--chat"),
    "-i": ("llama.cpp's interactive mode", "--chat"),
    "--interactive": ("llama.cpp's interactive mode", "--chat"),
}


def refuse_foreign_options(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """An option of llama.cpp, vLLM or Ollama that this command spells otherwise: refused with a
    hint (not the value of an option of ours that takes one: `--stop -b`)."""
    actions = parser._option_string_actions
    for i, a in enumerate(argv):
        if a == "--":
            return
        before = actions.get(argv[i - 1]) if i else None
        if before is not None and before.nargs != 0:
            continue
        name = a.split("=", 1)[0] if a.startswith("--") else a
        if name in FOREIGN:
            what, ours = FOREIGN[name]
            raise UsageError(f"unknown option {name} ({what}); did you mean {ours}?")


def typed_options(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, tuple[str, str | None]]:
    """Each option's destination -> (its name, its value) as the command line spelled them (the last
    time given), so that an error names `-ngl -1` or `--temperature 1e309`, not what argparse made of them."""
    actions = parser._option_string_actions
    typed: dict[str, tuple[str, str | None]] = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            break
        name, eq, value = a.partition("=") if a.startswith("--") else (a, "", "")
        action = actions.get(name)
        if action is None and len(a) > 2 and a[0] == "-" and a[1] != "-" and a[:2] in actions:
            action, name, eq, value = actions[a[:2]], a[:2], "=", a[2:]  # glued: -n64
        if action is not None and action.dest != "help":
            if not eq and action.nargs != 0 and i + 1 < len(argv):
                i, value = i + 1, argv[i + 1]
            typed[action.dest] = (name, value if eq or action.nargs != 0 else None)
        i += 1
    return typed


def refuse_glued_words(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """A single dash and several letters that name no option (llama.cpp's `-fa`, `-sm`) would be
    read by argparse as a one-letter option and its value (`-n` with "gl"): refused by name."""
    known = set(parser._option_string_actions)
    flags = {s[1] for s, a in parser._option_string_actions.items()
             if len(s) == 2 and s[0] == "-" and a.nargs == 0}  # letters that take no value: `-vv` is fine
    for a in argv:
        if a == "--":
            return
        if re.fullmatch(r"-[A-Za-z][A-Za-z-]+", a) and a not in known and not set(a[1:]) <= flags:
            raise UsageError(f"unknown option {a} (one dash takes one letter, as -n 64; long options take two, "
                             "as --max-tokens 64)")


def dashed_numbers_joined(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """argv with an option's value that starts with a dash and reads as a number joined to it with '='
    (`--temperature -inf` as `--temperature=-inf`): argparse knows -1 and -0.5 for numbers, and took
    -inf, -nan and -1e3 for options."""
    actions = parser._option_string_actions
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            return out + argv[i:]
        action = actions.get(a)
        if action is not None and action.nargs is None and i + 1 < len(argv) and _dashed_number(argv[i + 1]):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def _dashed_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return s.startswith("-")


_ESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{2}|[ntr\\'\"])")
_ESCAPES = {b"n": b"\n", b"t": b"\t", b"r": b"\r"}


def unescape(text: str) -> str:
    """A stop string's escapes read as llama.cpp reads its reverse prompts' (`--stop '\\n'` is a newline;
    \\xHH a byte of the UTF-8 text); any other backslash stays as it is."""
    got = _ESCAPE.sub(lambda m: bytes([int(m[1][1:], 16)]) if m[1][:1] == b"x" else _ESCAPES.get(m[1], m[1]),
                      text.encode("utf-8", "surrogateescape"))
    return got.decode("utf-8", "replace")


def whole(text: str) -> int:
    """An int option's value, in decimal digits with an optional sign: int() alone also took
    `1_000`, spaces around it and other scripts' digits, which the message ("in decimal digits")
    does not name. Named int, so that argparse's refusal reads as any int option's."""
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise ValueError(text)
    return int(text)


whole.__name__ = "int"


def decimal(text: str) -> float:
    """A float option's value, written as a decimal number (`0.5`, `.5`, `5e-1`, with an optional
    sign), or nan or inf for the option's own range check to name: float() alone also took `1_0`
    as 10, spaces around it and other scripts' digits, which whole() refuses for int options.
    Named float, so that argparse's refusal reads as any float option's."""
    if not re.fullmatch(r"[+-]?(([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|nan|inf|infinity)", text, re.IGNORECASE):
        raise ValueError(text)
    return float(text)


decimal.__name__ = "float"


def one_line(msg: str) -> str:
    """An error's text with its control characters, line breaks and bidirectional overrides escaped
    (as repr escapes them): a file named with a newline split the error over two lines, and one with
    an escape sequence reached the terminal. Other format characters (an emoji's joiner, Persian's
    non-joiner) and spaces of other scripts stay as they are."""
    return "".join(repr(c)[1:-1] if unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") or c in _BIDI else c
                   for c in msg)


_BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")  # (they reorder the text shown after them)
