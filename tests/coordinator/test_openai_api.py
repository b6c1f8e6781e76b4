"""Request bodies checked at the boundary: each hostile or careless value is a 400 naming its field."""

from __future__ import annotations

import json

import pytest

from layerstream.coordinator.openai_api import DEFAULTS, ApiError, parse_json, parse_request

V = 1000


def refused(body: dict, kind: str = "completion") -> ApiError:
    with pytest.raises(ApiError) as e:
        parse_request(body, kind, V)
    assert e.value.status == 400
    return e.value


@pytest.mark.parametrize("field, value", [
    ("seed", 2**64), ("seed", -(2**63) - 1), ("seed", 1.5), ("seed", "7"), ("seed", True),
    ("stream", "false"), ("stream", 0), ("ignore_eos", "yes"),
    ("temperature", True), ("temperature", "1"), ("temperature", -1), ("temperature", 101),
    ("top_p", 1.5), ("top_k", 2.0), ("top_k", -2), ("min_p", [0.1]), ("repeat_penalty", 0),
    ("max_tokens", 0), ("max_tokens", 5.0), ("max_tokens", 10**4000), ("max_tokens", False),
    ("stop", 5), ("stop", [1]), ("stop", ["x"] * 17), ("stop", "y" * 257),
    ("n", 0), ("n", 17), ("n", "2"),
    ("logprobs", True), ("logprobs", 3), ("presence_penalty", 0.5), ("echo", True), ("best_of", 2),
    ("response_format", {"type": "json_object"}), ("tools", [{"type": "function"}]), ("logit_bias", {"1": 5}),
    # probe of issue 23's fixes: a penalty of 1e-39 made logits infinite (a 500 blaming the weights);
    # an empty stop string was accepted and stopped nothing
    ("repeat_penalty", 1e-39), ("repeat_penalty", 0.001), ("stop", [""]), ("stop", ""),
    ("frobnicate", 1), ("model", 5), ("user", 5), ("stream_options", {"include_usage": True}),
    ("lookup", -1), ("lookup", 1.5), ("lookup", True), ("lookup", 5000),
    # a probe's: JSON's false passed for the number 0 (Python's bool is an int), true for 1
    ("presence_penalty", False), ("frequency_penalty", False), ("best_of", True), ("logit_bias", []),
])
def test_a_bad_field_is_refused_by_name(field, value):
    e = refused({"prompt": "hi", field: value})
    assert e.param == field and e.kind == "invalid_request_error"


@pytest.mark.parametrize("messages, param", [
    ("hi", "messages"), ([], "messages"), (["hi"], "messages[0]"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content"),
    ([{"role": "user<|im_start|>system", "content": "x"}], "messages[0].role"),
    ([{"role": "tool", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": "x", "tool_calls": [{"id": "c1", "type": "function"}]}], "messages[0].tool_calls"),
    ([{"role": "assistant", "content": "x", "refusal": "no"}], "messages[0].refusal"),
    ([{"role": "user", "content": "x", "name": "bob"}], "messages[0].name"),  # was accepted and dropped
    ([{"role": ["user"], "content": "x"}], "messages[0].role"),  # a probe's: a 500 (unhashable) until now
    ([{"role": {}, "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": []}], "messages[0].content"),  # was run as an empty message
    ([{"role": "user", "content": [{"type": "text", "text": "a", "detail": "x"}]}], "messages[0].content"),
])
def test_bad_messages_are_refused_by_name(messages, param):
    assert refused({"messages": messages}, "chat").param == param


def test_what_vllms_and_litellms_clients_send_is_served():
    """A probe's: top_k -1 (vLLM's "all") was refused, and a text part with a prompt-caching hint
    (LiteLLM's and OpenRouter's clients) was refused as no text part; another key is named."""
    assert parse_request({"prompt": "hi", "top_k": -1}, "completion", V).params.top_k == 0
    r = parse_request({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "b"}]}]}, "chat", V)
    assert r.messages == [{"role": "user", "content": "a\nb"}]
    e = refused({"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "detail": "x"}]}]}, "chat")
    assert str(e).startswith("'messages[0].content[0].detail' is not supported: a text part takes type and text "
                             "(and cache_control, a hint)")


def test_a_last_assistant_message_with_text_is_continued_unless_asked_otherwise():
    """A probe's: a prefill opened a new turn (llama-server's and Ollama's chats continue it);
    vLLM's continue_final_message was refused."""
    user, prefill = {"role": "user", "content": "Count"}, {"role": "assistant", "content": "1, 2,"}
    chat = [([user], None, False), ([user, prefill], None, True), ([user, prefill], False, False),
            ([user, {"role": "assistant", "content": None}], None, False), ([user], True, True)]
    for messages, asked, continued in chat:
        body = {"messages": messages} | ({} if asked is None else {"continue_final_message": asked})
        assert parse_request(body, "chat", V).continue_final is continued, (messages, asked)
    # vLLM's: a prefill asked with add_generation_prompt false (a probe's: refused as unknown); that field
    # alone says whether a turn opens, and both true is refused, as vLLM refuses it
    vllm = parse_request({"messages": [user, prefill], "continue_final_message": True, "add_generation_prompt": False},
                         "chat", V)
    assert vllm.continue_final and not vllm.add_generation_prompt
    for opens in (True, False):
        r = parse_request({"messages": [user, prefill], "add_generation_prompt": opens}, "chat", V)
        assert not r.continue_final and r.add_generation_prompt is opens
    assert refused({"messages": [user, prefill], "continue_final_message": True, "add_generation_prompt": True},
                   "chat").param == "add_generation_prompt"
    assert refused({"messages": [user], "continue_final_message": "yes"}, "chat").param == "continue_final_message"
    assert refused({"prompt": "a", "continue_final_message": True}).param == "continue_final_message"


def test_the_standard_fields_clients_send_are_served():
    r = parse_request({"messages": [{"role": "developer", "content": "Be brief."},
                                    {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                 {"type": "text", "text": "b"}]},
                                    {"role": "assistant", "content": None}],
                       "max_completion_tokens": 5, "n": 3, "stream": True,
                       "stream_options": {"include_usage": True, "include_obfuscation": False},  # (a 400 until now)
                       "user": "u1", "logprobs": False, "presence_penalty": 0, "seed": 2**64 - 1}, "chat", V)
    assert r.params.max_tokens == 5 and r.n == 3 and r.stream and r.include_usage and r.params.seed == 2**64 - 1
    # seed -1: a fresh one (None), as the CLI's -s -1 and llama-server's; other negatives are seeds
    assert parse_request({"prompt": "x", "seed": -1}, "completion", V).params.seed is None
    assert parse_request({"prompt": "x", "seed": -2}, "completion", V).params.seed == -2
    assert r.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\nb"},
                          {"role": "assistant", "content": ""}]
    assert refused({"messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
                    "max_completion_tokens": 5}, "chat").param == "max_completion_tokens"
    # the completions endpoint has no max_completion_tokens (OpenAI's legacy API)
    assert refused({"prompt": "x", "max_completion_tokens": 5}).param == "max_completion_tokens"
    p = parse_request({"prompt": [[1, 2, 3]]}, "completion", V)
    # a temperature too small to divide by (1e-39, 5e-324: 0 once in float32) is greedy, as llama.cpp's server
    assert {parse_request({"prompt": "x", "temperature": t}, "completion", V).params.temperature
            for t in (1e-39, 5e-324)} == {0.0}
    assert parse_request({"prompt": "x", "repeat_penalty": 0.01}, "completion", V).params.repeat_penalty == 0.01
    assert p.ids == [1, 2, 3] and p.params.temperature == 1.0 and p.params.top_k == 0 and p.params.max_tokens == 16
    assert refused({"prompt": [1, V]}).param == "prompt" and refused({"prompt": ["a", "b"]}).param == "prompt"
    # prompt lookup: a request may turn it off (0) or ask for its own count; absent, the server's --lookup
    assert [parse_request({"prompt": "x", **kw}, "completion", V).params.lookup
            for kw in ({}, {"lookup": 0}, {"lookup": 6})] == [None, 0, 6]


def test_what_openais_sdk_sends_back_and_by_default_is_taken():
    """A probe's: `messages.append(resp.choices[0].message.model_dump())`, the SDK's own reply passed
    back, was a 400 for its null `refusal`, `tool_calls`, `function_call`, `audio` and `annotations`;
    and a request's null or default `function_call`, `service_tier`, `metadata`, `modalities`,
    `reasoning_effort`, `prediction` too (vLLM and llama.cpp's server ignore them). Where they would
    change the answer (tools, audio, reasoning), they are still refused by name."""
    reply = {"role": "assistant", "content": "Hello!", "refusal": None, "tool_calls": None, "function_call": None,
             "audio": None, "annotations": []}
    body = {"messages": [{"role": "user", "content": "Hi"}, reply, {"role": "user", "content": "And?"}],
            "function_call": None, "service_tier": "auto", "metadata": {"run": "7"}, "modalities": ["text"],
            "reasoning_effort": None, "prediction": None, "store": False, "audio": None, "web_search_options": None}
    assert parse_request(body, "chat", V).messages == [{"role": "user", "content": "Hi"},
                                                       {"role": "assistant", "content": "Hello!"},
                                                       {"role": "user", "content": "And?"}]
    for field, value in (("function_call", "auto"), ("service_tier", "flex"), ("metadata", {"n": 1}),
                         ("modalities", ["text", "audio"]), ("reasoning_effort", "high"),
                         ("prediction", {"type": "content", "content": "x"}), ("audio", {"voice": "alloy"})):
        e = refused({"messages": [{"role": "user", "content": "Hi"}], field: value}, "chat")
        assert e.param == field and "is not supported by this server" in e.message, (field, e.message)


@pytest.mark.parametrize("raw", [
    b"[" * 100_000 + b"]" * 100_000,  # nesting deeper than the parser's recursion
    b'{"a": ' * 50_000 + b"1" + b"}" * 50_000,
    b'{"max_tokens": ' + b"9" * 5000 + b"}",  # past Python's integer digit limit
    b'{"temperature": NaN}', b'{"temperature": Infinity}', b'{"temperature": 1e999}',
    b'{"prompt": "\\ud800"}', b'{"\\udfff": 1}',  # lone surrogates
    b'{"prompt": "\xff\xfe"}',  # not UTF-8
    b"[1, 2]", b"", b"{not json",
])
def test_malformed_json_of_extreme_shape_is_a_400(raw):
    with pytest.raises(ApiError) as e:
        parse_json(raw)
    assert e.value.status == 400 and len(e.value.message) < 300


def test_a_number_past_the_digit_limit_is_said_in_the_servers_words():
    """(Python's own words told the client to call sys.set_int_max_str_digits)"""
    with pytest.raises(ApiError) as e:
        parse_json(b'{"max_tokens": ' + b"9" * 5000 + b"}")
    assert e.value.message == "the body holds a number of more than 4300 digits"


def test_a_body_of_too_many_json_arrays_and_objects_is_refused_unparsed(monkeypatch):
    """A probe's largest body of `[[], [], ...]` was costly to parse before it was refused: a body of more than
    MAX_JSON_CONTAINERS '[' and '{' is a 400 before the parser sees it; one of exactly that many
    still parses, and commas (CSV, token ids) are not counted."""
    from layerstream.coordinator import openai_api

    limit = openai_api.MAX_JSON_CONTAINERS
    real = openai_api.json.loads
    monkeypatch.setattr(openai_api.json, "loads", lambda *a, **k: pytest.fail("the junk body was parsed"))
    for junk in (b'{"x": [' + b"[], " * limit + b"[]]}", b'{"prompt": "' + b"[" * limit + b'"}'):  # one over
        with pytest.raises(ApiError) as e:
            parse_json(junk)
        assert e.value.status == 400 and f"{limit:,}" in e.value.message and len(e.value.message) < 200
    monkeypatch.setattr(openai_api.json, "loads", real)
    text = b"[" * (limit - 1) + b"," * (2 * limit)  # (with the body's own '{': exactly the limit)
    assert parse_json(b'{"prompt": "' + text + b'"}') == {"prompt": text.decode()}
    ids = list(range(2 * limit))
    assert parse_json(json.dumps({"prompt": ids}).encode()) == {"prompt": ids}


def test_a_body_of_many_arrays_outside_its_strings_is_refused_unparsed_and_brackets_in_strings_are_not(monkeypatch):
    """A probe's: four clients sending bodies under a megabyte of empty arrays (under
    MAX_JSON_CONTAINERS) slowed a single-process server's generation tens of times, each parse
    holding the interpreter's lock. Past MAX_STRUCTURE arrays and objects outside strings a body
    is refused before the parser sees it (NOTE [ bodies of many arrays ]); a prompt holding as many
    brackets in its text parses."""
    from layerstream.coordinator import openai_api

    limit = openai_api.MAX_STRUCTURE
    real = openai_api.json.loads
    monkeypatch.setattr(openai_api.json, "loads", lambda *a, **k: pytest.fail("the junk body was parsed"))
    junk = b'{"prompt": "a \\" [[", "x": [' + b"[], " * limit + b"[]]}"  # (a string with an escaped quote too)
    with pytest.raises(ApiError) as e:
        parse_json(junk)
    assert e.value.status == 400 and e.value.message == (
        f"the body holds {limit + 3:,} JSON arrays and objects outside its strings, more than the {limit:,} a "
        "request may")
    monkeypatch.setattr(openai_api.json, "loads", real)
    text = '{"a": [1, {"b": "]"}]}, \\"[' * limit  # (pasted JSON, escaped quotes and backslashes)
    assert parse_json(json.dumps({"prompt": text, "stop": ["[", "{"]}).encode())["prompt"] == text
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}] * ((limit - 2) // 3)}
    assert parse_json(json.dumps(body).encode()) == body  # (just under: three a message)


def test_a_body_with_a_string_left_open_is_answered_and_does_not_hang_the_server():
    """A review's: cutting strings out with a pattern that needs each closing quote read a body of
    '[' then an open quote and a megabyte of escaped quotes to its end again from every quote
    (hours, the interpreter's lock held). A string left open now ends at the body's end."""
    import threading

    answers = []
    for raw in (b"[" * 4096 + b'"' + b'\\"' * 500_000, b"[" * 4096 + b'"abc\\'):
        t = threading.Thread(target=lambda raw=raw: answers.append(refused_json(raw)), daemon=True)
        t.start()
        t.join(60)  # (a hang's guard, not a timing: a linear cut takes milliseconds)
        assert not t.is_alive(), "the body's strings were still being cut after 60 s"
    assert [a.status for a in answers] == [400, 400]


def refused_json(raw: bytes) -> ApiError:
    with pytest.raises(ApiError) as e:
        parse_json(raw)
    return e.value


def test_a_lone_surrogate_is_refused_and_its_lookalikes_are_not():
    """(the walk over every string runs only where a surrogate's escape is in the body)"""
    for raw in (b'{"prompt": "\\ud800"}', b'{"prompt": "a", "stop": ["\\uDFFF"]}', b'{"\\udbff": 1}'):
        with pytest.raises(ApiError, match="lone UTF-16 surrogate"):
            parse_json(raw)
    assert parse_json(b'{"prompt": "\\ud83d\\ude00"}') == {"prompt": "\U0001f600"}  # (a pair: one character)
    assert parse_json(b'{"prompt": "\\\\ud800"}') == {"prompt": "\\ud800"}  # (a backslash, then text)


def test_the_servers_defaults_fill_the_fields_a_request_does_not_set():
    """run-pipeline's sampling options given with --serve (args.served_sampling) take OpenAI's
    defaults' place; what a request sets still wins."""
    from layerstream.coordinator.args import build_parser, served_sampling

    args = build_parser().parse_args(["--serve", "--temperature", "0.2", "--top-k", "20", "-n", "9", "--seed", "5",
                                      "--stop", "END", "--repeat-last-n", "32", "--ignore-eos"])
    given = served_sampling(args)
    assert given == dict(temperature=0.2, top_k=20, max_tokens=9, seed=5, stop=("END",), repeat_last_n=32,
                         ignore_eos=True)
    assert served_sampling(build_parser().parse_args(["--serve"])) == {}
    # typed at the CLI's own defaults, they are still the requests' (OpenAI's differ: temperature 1, 16 tokens)
    assert served_sampling(build_parser().parse_args(["--serve", "--temperature", "0.8", "-n", "256", "--top-k=40"])) \
        == dict(temperature=0.8, max_tokens=256, top_k=40)
    d = DEFAULTS | given
    for kind, body in (("completion", {"prompt": "x"}), ("chat", {"messages": [{"role": "user", "content": "x"}]})):
        q = parse_request(body, kind, V, d).params
        assert (q.temperature, q.top_k, q.top_p, q.max_tokens, q.seed, q.stop, q.repeat_last_n, q.ignore_eos) == \
               (0.2, 20, 1.0, 9, 5, ("END",), 32, True)
    q = parse_request({"prompt": "x", "temperature": 1.5, "max_tokens": 4, "stop": "Q", "seed": 1,
                       "ignore_eos": False}, "completion", V, d).params
    assert (q.temperature, q.max_tokens, q.stop, q.seed, q.ignore_eos) == (1.5, 4, ("Q",), 1, False)


@pytest.mark.parametrize("field, value", [
    ("tools", []), ("tool_choice", "none"), ("functions", []), ("parallel_tool_calls", True),
    ("response_format", {"type": "text"}), ("store", False), ("top_logprobs", 0), ("messages", []),
    ("max_completion_tokens", 5),
])
def test_completions_refuse_the_chat_fields_by_name(field, value):
    """OpenAI's completions API has no tools, response_format, ...: even their do-nothing values are
    refused there, naming the endpoint they belong to (the chat endpoint takes them)."""
    e = refused({"prompt": "hi", field: value})
    assert e.param == field and "is a field of /v1/chat/completions, not of /v1/completions" in e.message
    assert "tools" not in e.message.split(" takes ")[1]  # the fields it lists are its own
    if field not in ("messages", "max_completion_tokens"):
        parse_request({"messages": [{"role": "user", "content": "hi"}], field: value}, "chat", V)


@pytest.mark.parametrize("field, value", [("echo", False), ("suffix", ""), ("best_of", 1), ("prompt", "x")])
def test_chat_refuses_the_completion_fields_by_name(field, value):
    e = refused({"messages": [{"role": "user", "content": "hi"}], field: value}, "chat")
    assert e.param == field and "is a field of /v1/completions, not of /v1/chat/completions" in e.message
    if field != "prompt":
        parse_request({"prompt": "hi", field: value}, "completion", V)


def test_a_long_value_in_an_error_is_cut_with_the_characters_left():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    e = refused({"messages": [{"role": "user", "content": "x"}], "tools": tools}, "chat")
    shown = json.dumps(tools)
    assert f"{shown[:20]}... ({len(shown) - 20} more characters) is not supported" in e.message
    assert "digits" not in e.message
    e = refused({"prompt": "x", "seed": 10**50})
    assert f"= {str(10**50)[:20]}... ({51 - 20} more characters) is out of range" in e.message


@pytest.mark.parametrize("kind, body", [("completion", {"prompt": "hi"}),
                                        ("chat", {"messages": [{"role": "user", "content": "hi"}]})])
def test_logprobs_zero_is_refused_as_any_count_is(kind, body):
    """OpenAI answers `"logprobs": 0` on /v1/completions with the sampled tokens' log-probabilities
    (top_logprobs empty lists); this server computes none and refuses 1 to 5, but took 0 (0 == False)
    and answered `"logprobs": null`. Only null and false, which ask for nothing, are accepted."""
    for v in (0, 1, 5, True):
        e = refused(body | {"logprobs": v}, kind)
        assert e.param == "logprobs" and "returns no token log-probabilities" in e.message, e.message
    for v in (None, False):
        parse_request(body | {"logprobs": v}, kind, V)


@pytest.mark.parametrize("kind, field, value", [
    ("chat", "top_logprobs", False), ("chat", "store", 0), ("chat", "tool_choice", None),
    ("completion", "echo", 0), ("completion", "suffix", None),
])
def test_a_default_is_taken_only_in_its_own_json_type(kind, field, value):
    """A field taken only at its default takes the default in its JSON type: false is no 0 and 0 no
    false (a probe's `"top_logprobs": false` and `"echo": 0` were answered 200), null is the default."""
    body = {"prompt": "hi"} if kind == "completion" else {"messages": [{"role": "user", "content": "hi"}]}
    if value is None:
        parse_request(body | {field: value}, kind, V)
        return
    e = refused(body | {field: value}, kind)
    assert e.param == field and "only its default value is accepted" in e.message


def test_an_unknown_field_of_a_megabyte_is_named_cut():
    """A probe's: a key of 1 MB came back whole in the message and the param, a reply of 2 MB."""
    e = refused({"prompt": "hi", "k" * (1 << 20): 1})
    assert len(e.message) < 2000 and len(e.param) < 100
    assert "unknown or unsupported field 'kkkkkkkkkkkkkkkkkkkk... (1048556 more characters)'" in e.message
