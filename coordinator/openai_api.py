"""OpenAI request bodies checked at the boundary: strict JSON, every field by type and range.

A body becomes a `GenRequest` or an `ApiError` (a 4xx naming the field); nothing unchecked
reaches the engine. Fields the server implements are served; the standard fields whose given
value changes nothing here (`user`, `logprobs: false`, `presence_penalty: 0`, ...) are accepted;
any other field, or another value of those, is refused with 400 naming it, never dropped.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass

from layerstream.bounds import MAX_TEMPERATURE, MAX_WINDOW, REPEAT_PENALTY_RANGE, SEED_RANGE
from layerstream.compute.sampling import SamplingParams

MAX_N = 16  # choices a request may ask for (each runs as a request of its own)
MAX_STOPS, MAX_STOP_CHARS = 16, 256
MAX_TOKENS = MAX_WINDOW
# '[' and '{' a body may hold (inside strings too): each may be an array or an object to build, the
# costly values to parse. A probe's largest body of empty arrays cost more time and memory to parse
# than any real request before its unknown field was refused; a body past this many is refused
# unparsed. Numbers and strings are cheap to parse and not counted, so a prompt of CSV or token ids
# never meets it.
MAX_JSON_CONTAINERS = 1 << 20
# NOTE [ bodies of many arrays ]
# Parsing holds the interpreter's lock, which a single-process server's engine needs between its
# kernels: a few clients sending bodies under a megabyte of empty arrays, each costly to parse and
# walk, slowed every other client's generation many times over. A request needs few arrays and
# objects outside its strings (its messages, their parts, a list of token ids, stop strings): so a
# body of HEAVY_CONTAINERS '[' and '{' or more (strings included, a cheap count) parses in the
# costly bodies' own thread, one at a time (Server.large_pool), and its arrays and objects outside
# strings are counted first (its strings cut out by one linear pass in C): past MAX_STRUCTURE it is
# refused unparsed. A prompt of pasted code or JSON keeps its brackets in a string and is not refused.
HEAVY_CONTAINERS = 1 << 12
MAX_STRUCTURE = 1 << 16
# (a string left open ends at the body's end: a pattern that needs its closing quote read to the end
# again from every later quote, quadratic in the body, and the lock held meanwhile)
JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)', re.S)
# a \u escape of a UTF-16 surrogate (D800-DFFF): only such escapes parse to a lone surrogate (raw
# bytes that are not UTF-8 fail the decode), so the walk over every string runs only where one is
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
MAX_LOOKUP = 1 << 12  # drafted tokens a step a request may ask for (a step holds fewer anyway)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

# OpenAI's defaults, not the CLI's (README: "Sampling defaults"): a client that sets nothing
# gets the model's own distribution, as it would from OpenAI. run-pipeline's sampling options
# given with --serve take their place (as llama-server's do): `defaults` of sampling_from.
DEFAULTS = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0, repeat_last_n=64, seed=None,
                stop=(), ignore_eos=False, max_tokens=None)  # max_tokens None: MAX_TOKENS_DEFAULT by kind
MAX_TOKENS_DEFAULT = {"completion": 16, "chat": 256}


STOPPING = "the server is stopping; send the request again once it is back (or to another server)"


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, message, offending parameter, OpenAI's type and code."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        param = param if param is None else _short(param)  # (a client's key of a megabyte, named)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class GenRequest:
    """A checked generation request: a prompt (text, token ids or messages) and how to sample it."""

    kind: str  # "completion" or "chat"
    params: SamplingParams
    text: str | None = None
    ids: list[int] | None = None
    messages: list[dict] | None = None
    stream: bool = False
    include_usage: bool = False
    n: int = 1
    continue_final: bool = False  # chat: the last message, the assistant's, is continued (a prefill)
    add_generation_prompt: bool = True  # chat: the template's opening of the assistant's turn, where not continued


def parse_json(raw: bytes, opens: int | None = None) -> dict:
    """A JSON object from a body; NaN, infinities, non-UTF-8 bytes, lone surrogates, integers of
    more than 4300 digits and nesting too deep for the parser are a 400. opens: containers(raw),
    where the caller counted them already."""
    def constant(name):
        raise ValueError(f"{name} is not JSON")

    def finite(s):
        v = float(s)
        if not math.isfinite(v):
            raise ValueError(f"the number {s[:40]} is out of range")
        return v

    opens = containers(raw) if opens is None else opens
    if opens > MAX_JSON_CONTAINERS:
        raise ApiError(400, f"the body holds {opens:,} '[' and '{{' (strings included), more than the "
                            f"{MAX_JSON_CONTAINERS:,} a request may: too many JSON arrays and objects")
    if opens >= HEAVY_CONTAINERS:  # (NOTE [ bodies of many arrays ])
        outside = containers(JSON_STRING.sub(b'""', raw))
        if outside > MAX_STRUCTURE:
            raise ApiError(400, f"the body holds {outside:,} JSON arrays and objects outside its strings, more than "
                                f"the {MAX_STRUCTURE:,} a request may")
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=constant, parse_float=finite)
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the body is not UTF-8 ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise ApiError(400, "the body is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and integers past Python's digit limit
        if not isinstance(e, json.JSONDecodeError) and "digits" in str(e):  # (its words name sys.set_int_max_str_digits)
            raise ApiError(400, f"the body holds a number of more than {sys.get_int_max_str_digits()} digits") from None
        raise ApiError(400, f"the body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    if SURROGATE_ESCAPE.search(raw):
        _check_strings(body)
    return body


def containers(raw: bytes) -> int:
    """'[' and '{' in a body, strings included: at most the JSON arrays and objects it can hold."""
    return raw.count(b"[") + raw.count(b"{")


def _check_strings(obj) -> None:
    """Every string (keys too) encodes as UTF-8: a lone surrogate escape (\\ud800) is a 400."""
    todo = [obj]
    while todo:
        o = todo.pop()
        items = o.items() if isinstance(o, dict) else enumerate(o) if isinstance(o, list) else ()
        for k, v in items:
            for s in (k, v):
                if isinstance(s, str):
                    try:
                        s.encode("utf-8")
                    except UnicodeEncodeError:
                        raise ApiError(400, "the body holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is "
                                            "no character") from None
            if isinstance(v, (dict, list)):
                todo.append(v)


# -- fields --------------------------------------------------------------------------------------------


def _int(body: dict, key: str, default, low: int, high: int):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"'{key}' must be an integer, not {_kind(v)}", key)
    if not low <= v <= high:
        raise ApiError(400, f"'{key}' = {_short(v)} is out of range [{low}, {high}]", key)
    return v


def _float(body: dict, key: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ApiError(400, f"'{key}' must be a number, not {_kind(v)}", key)
    if not ((v > low if low_open else v >= low) and v <= high):
        raise ApiError(400, f"'{key}' = {_short(v)} is out of range {'(' if low_open else '['}{low:g}, {high:g}]", key)
    return float(v)


def _bool(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(400, f"'{key}' must be true or false, not {_kind(v)}", key)
    return v


def _kind(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(v), type(v).__name__)


def _short(v) -> str:
    """A value for an error message, cut to its first 20 characters where longer than 40."""
    s = str(v)
    return s if len(s) <= 40 else f"{s[:20]}... ({len(s) - 20} more characters)"


# standard fields and a test of the values that change nothing here; each endpoint takes only its
# own (OpenAI's completions API has no tools or response_format, its chat API no echo or suffix)
SERVED = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed", "stop",
          "stream", "stream_options", "n", "ignore_eos", "user", "lookup"}


def _is(default, *types):
    """A test that a value is null or `default` of one of `types` (JSON's false is not the number 0, nor
    true 1: Python's bool is an int, and `in (None, 0)` took false for 0)."""
    return lambda v: v is None or (type(v) in types and v == default)


HARMLESS_BOTH = {
    # not 0: OpenAI answers it on /v1/completions with the sampled tokens' log-probabilities, which this
    # server does not compute (so refused as 1 to 5 are; 0 is compared as a number, not as False)
    "logprobs": _is(False, bool),
    "presence_penalty": _is(0, int, float),
    "frequency_penalty": _is(0, int, float),
    "logit_bias": _is({}, dict),
}
HARMLESS_COMPLETION = {
    "best_of": _is(1, int),
    "echo": _is(False, bool),
    "suffix": _is("", str),
}
HARMLESS_CHAT = {
    "top_logprobs": _is(0, int),
    "response_format": _is({"type": "text"}, dict),
    "tools": _is([], list),
    "functions": _is([], list),
    "tool_choice": _is("none", str),
    "parallel_tool_calls": lambda v: v is None or isinstance(v, bool),
    "store": _is(False, bool),
    # fields that change nothing a model without tools, audio or reasoning generates, where null or their
    # default (what OpenAI's SDK sends from a default-built request; vLLM and llama.cpp's server ignore them)
    "function_call": _is("none", str),
    "service_tier": lambda v: v is None or v in ("auto", "default"),
    "metadata": lambda v: v is None or (isinstance(v, dict) and all(isinstance(x, str) for x in v.values())),
    "modalities": lambda v: v is None or v == ["text"],
    "reasoning_effort": _is(None),
    "prediction": _is(None),
    "audio": _is(None),
    "web_search_options": _is(None),
}
UNSERVED = {"logprobs": "it returns no token log-probabilities; leave 'logprobs' out or give null"}
HARMLESS = {"completion": HARMLESS_BOTH | HARMLESS_COMPLETION, "chat": HARMLESS_BOTH | HARMLESS_CHAT}
FIELDS = {"completion": SERVED | {"prompt"},
          "chat": SERVED | {"messages", "max_completion_tokens", "continue_final_message", "add_generation_prompt"}}
ROUTES = {"completion": "/v1/completions", "chat": "/v1/chat/completions"}


def _check_fields(body: dict, kind: str) -> None:
    for key, v in body.items():
        if key in FIELDS[kind]:
            continue
        test = HARMLESS[kind].get(key)
        if test is None:
            other = "chat" if kind == "completion" else "completion"
            what = (f"'{key}' is a field of {ROUTES[other]}, not of {ROUTES[kind]}"
                    if key in FIELDS[other] or key in HARMLESS[other] else f"unknown or unsupported field '{_short(key)}'")
            takes = ", ".join(sorted(FIELDS[kind] | set(HARMLESS[kind])))
            raise ApiError(400, f"{what}; {ROUTES[kind]} takes {takes}", key)
        if not test(v):
            why = UNSERVED.get(key, "only its default value is accepted")
            raise ApiError(400, f"'{key}' = {_short(json.dumps(v))} is not supported by this server ({why})", key)


def sampling_from(body: dict, kind: str, defaults: dict = DEFAULTS) -> SamplingParams:
    """SamplingParams from a checked body, `defaults` (DEFAULTS' keys) for the fields it does not set;
    a bad value is a 400 naming the field."""
    d = defaults
    stop = body.get("stop")
    if stop is None:
        stop = tuple(d["stop"])
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOPS:
        stop = tuple(stop)
    else:
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} strings", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise ApiError(400, f"a 'stop' string is longer than {MAX_STOP_CHARS} characters", "stop")
    if "" in stop:
        raise ApiError(400, "a 'stop' string is empty, which would stop nothing; drop it", "stop")
    temperature = _float(body, "temperature", d["temperature"], 0.0, MAX_TEMPERATURE)
    if 0 < temperature < 1e-4:
        temperature = 0.0  # too small to sample with: greedy, as llama.cpp's server does
    max_tokens = _int(body, "max_tokens", d["max_tokens"] or MAX_TOKENS_DEFAULT[kind], 1, MAX_TOKENS)
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        mct = _int(body, "max_completion_tokens", None, 1, MAX_TOKENS)
        if body.get("max_tokens") is not None and body["max_tokens"] != mct:
            raise ApiError(400, "'max_tokens' and 'max_completion_tokens' differ; give one", "max_completion_tokens")
        max_tokens = mct
    return SamplingParams(
        temperature=temperature,
        top_p=_float(body, "top_p", d["top_p"], 0.0, 1.0),
        top_k=max(0, _int(body, "top_k", d["top_k"], -1, 1 << 31)),  # (-1: all, as vLLM's clients send it)
        min_p=_float(body, "min_p", d["min_p"], 0.0, 1.0),
        repeat_penalty=_float(body, "repeat_penalty", d["repeat_penalty"], *REPEAT_PENALTY_RANGE),
        repeat_last_n=d["repeat_last_n"],
        seed=None if (seed := _int(body, "seed", d["seed"], *SEED_RANGE)) == -1 else seed,  # -1: fresh, as the CLI's
        max_tokens=max_tokens,
        stop=stop,
        ignore_eos=_bool(body, "ignore_eos", d["ignore_eos"]),
        # drafts a step, prompt lookup's or the draft model's; 0: none; absent: --lookup's or --draft-tokens'
        lookup=_int(body, "lookup", None, 0, MAX_LOOKUP),
    )


# keys of an assistant's message as OpenAI's SDK returns it (`message.model_dump()`, passed back in the
# next request), taken where null or empty: a reply's tool calls, refusal or audio would be a 400
EMPTY_MESSAGE_KEYS = frozenset({"refusal", "tool_calls", "function_call", "audio", "annotations"})


def _messages(v) -> list[dict]:
    """Chat messages: role system/developer/user/assistant; content a string or text parts."""
    if not isinstance(v, list) or not v:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"'{where}' must be an object with 'role' and 'content'", where)
        for key in m:
            if key not in ("role", "content", "name") and not (key in EMPTY_MESSAGE_KEYS and m[key] in (None, [])):
                raise ApiError(400, f"'{where}.{_short(key)}' is not supported (messages take role and content; a reply's "
                                    f"{', '.join(sorted(EMPTY_MESSAGE_KEYS))} only null or empty)", f"{where}.{key}")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:  # (a list or object is no key of ROLES: a 500 once)
            raise ApiError(400, f"'{where}.role' must be one of {', '.join(ROLES)}, not {_short(json.dumps(role))}",
                           f"{where}.role")
        if m.get("name") is not None:  # the chat template gets role and content only: a name would be dropped
            raise ApiError(400, f"'{where}.name' is not supported: the model's chat template takes a message's "
                                "role and content only; drop it, or put the name in the content", f"{where}.name")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):
            if not content:  # (OpenAI's schema: at least one part)
                raise ApiError(400, f"'{where}.content' is an empty list: give a string or at least one text part",
                               f"{where}.content")
            parts = []
            for j, p in enumerate(content):
                if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                    raise ApiError(400, f"'{where}.content[{j}]' must be a text part {{\"type\": \"text\", \"text\": "
                                        "...}; this server takes no images or audio", f"{where}.content")
                # a prompt-caching hint (LiteLLM's and OpenRouter's clients send it) changes no token: taken
                if extra := sorted(set(p) - {"type", "text", "cache_control"}):  # (was refused as "no text part")
                    raise ApiError(400, f"'{where}.content[{j}].{_short(extra[0])}' is not supported: a text part "
                                        "takes type and text (and cache_control, a hint)", f"{where}.content")
                parts.append(p["text"])
            content = "\n".join(parts)
        if not isinstance(content, str):
            raise ApiError(400, f"'{where}.content' must be a string or a list of text parts", f"{where}.content")
        out.append({"role": ROLES[role], "content": content})
    return out


def _prompt(v, n_vocab: int) -> tuple[str | None, list[int] | None]:
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
        v = v[0]  # a batch of one
    if isinstance(v, str):
        return v, None
    if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        if not all(0 <= t < n_vocab for t in v):
            raise ApiError(400, f"'prompt' holds token ids outside 0..{n_vocab - 1}", "prompt")
        return None, list(v)
    raise ApiError(400, "'prompt' must be a string or a list of token ids (one prompt a request)", "prompt")


def parse_request(body: dict, kind: str, n_vocab: int, defaults: dict = DEFAULTS) -> GenRequest:
    """A GenRequest from a parsed body of /v1/completions ("completion") or /v1/chat/completions ("chat")."""
    _check_fields(body, kind)
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise ApiError(400, "'model' must be a string", "model")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise ApiError(400, "'user' must be a string", "user")
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not stream:
            raise ApiError(400, "'stream_options' is only allowed with \"stream\": true", "stream_options")
        if not isinstance(opts, dict):
            raise ApiError(400, "'stream_options' must be an object", "stream_options")
        for key in opts:
            if key not in ("include_usage", "include_obfuscation"):
                raise ApiError(400, f"'stream_options.{_short(key)}' is not supported (only include_usage and "
                                    "include_obfuscation)", f"stream_options.{key}")
        include_usage = _bool(opts, "include_usage")
        _bool(opts, "include_obfuscation")  # (OpenAI's padding of chunks against size side channels: none here)
    req = GenRequest(kind, sampling_from(body, kind, defaults), stream=stream, include_usage=include_usage,
                     n=_int(body, "n", 1, 1, MAX_N))
    if kind == "chat":
        req.messages = _messages(body.get("messages"))
        # a last message of the assistant's with text is continued, as llama-server's and Ollama's chats
        # take it, unless the request says: vLLM's continue_final_message, or its add_generation_prompt
        last, opens = req.messages[-1], body.get("add_generation_prompt")
        req.add_generation_prompt = _bool(body, "add_generation_prompt", True)
        prefill = opens is None and last["role"] == "assistant" and bool(last["content"].strip())
        req.continue_final = _bool(body, "continue_final_message", prefill)
        if req.continue_final and opens:  # (vLLM's refusal too: a turn both opened and continued)
            raise ApiError(400, "'continue_final_message' and 'add_generation_prompt' cannot both be true",
                           "add_generation_prompt")
    else:
        req.text, req.ids = _prompt(body.get("prompt"), n_vocab)
    return req
