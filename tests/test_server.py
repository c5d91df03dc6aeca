"""`flashdecode serve` as a client sees it: the official `openai` client (and httpx for raw bodies)
against a real server process on the embedded model, one server for the module."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import re
import time
from pathlib import Path

import httpx
import openai
import pytest
from server_process import Server, metric, running_server

from flashdecode.models.loader import load_model

API_KEY = "test-key-123"
MODEL = "smollm2"
MAX_MODEL_LEN = 1024  # room for the tool descriptions in the prompt, and forced calls after them
MAX_BODY = 64 << 10
SECRET_PROMPT = "Zebra-Quokka secret prompt text"
MESSAGES = [{"role": "user", "content": "Name a colour."}]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    args = ["--max-model-len", str(MAX_MODEL_LEN), "--served-model-name", MODEL]
    args += ["--max-body-bytes", str(MAX_BODY)]
    log = tmp_path_factory.mktemp("server") / "server.log"
    # the key from the environment
    with running_server(args, log, env={"FLASHDECODE_API_KEY": API_KEY}) as server:
        yield server


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer():
    """An independent tokenizer: the embedded model loaded in this process, not the server's."""
    return load_model().tokenizer


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def _greedy(**extra):
    return dict(temperature=0, extra_body={"ignore_eos": True, **extra})


# --- the happy paths ---------------------------------------------------------------------------------


def test_health_models_and_metrics(server: Server, client: openai.OpenAI) -> None:
    assert httpx.get(f"{server.base}/health").status_code == 200  # no key needed
    assert [m.id for m in client.models.list().data] == [MODEL]
    text = httpx.get(f"{server.base}/metrics").text
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "prompt_tokens_total",
        "generation_tokens_total",
        "time_to_first_token_seconds_bucket",
        "e2e_request_latency_seconds_bucket",
    ):
        assert f"flashdecode:{name}" in text


def test_completion_stream_matches_non_stream_and_usage(client: openai.OpenAI, tokenizer) -> None:
    prompt = "The capital of France is"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, **_greedy())
    choice = full.choices[0]
    assert choice.finish_reason == "length" and choice.text
    assert full.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert full.usage.completion_tokens == 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12
    assert full.usage.prompt_tokens_details.cached_tokens == 0  # shorter than one KV block

    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
            **_greedy(),
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_stream_matches_non_stream_and_usage(client: openai.OpenAI, tokenizer) -> None:
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, **_greedy())
    text = full.choices[0].message.content
    assert full.choices[0].message.role == "assistant" and text
    rendered = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert full.usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))
    assert full.usage.completion_tokens == 12

    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_completion_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        **_greedy(),
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == 12

    # content as a list of text parts renders as the same string
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}]
    again = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=12, **_greedy())
    assert again.choices[0].message.content == text


def test_chat_logprobs_stop_and_system(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "You answer briefly."}, *MESSAGES]
    out = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, logprobs=True, top_logprobs=3, **_greedy()
    )
    content = out.choices[0].logprobs.content
    assert len(content) == 8
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy takes the top token
    text = out.choices[0].message.content
    stop = text[3:6]
    stopped = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, stop=[stop], **_greedy()
    )
    assert stopped.choices[0].message.content == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_completion_prompt_forms_n_seed_echo_logprobs(client: openai.OpenAI, tokenizer) -> None:
    prompt = "Once upon a time"
    ids = tokenizer.encode(prompt)
    by_text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, **_greedy())
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, **_greedy())
    assert by_ids.choices[0].text == by_text.choices[0].text

    batch = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=8, **_greedy())
    assert [c.index for c in batch.choices] == [0, 1]
    assert {c.text for c in batch.choices} == {by_text.choices[0].text}
    assert batch.usage.prompt_tokens == 2 * len(ids)

    sampled = dict(model=MODEL, prompt=[prompt, "Hello"], max_tokens=8, n=2, temperature=1.0, seed=7)
    first, second = client.completions.create(**sampled), client.completions.create(**sampled)
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]  # seeded

    echoed = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=4, echo=True, logprobs=2, **_greedy()
    )
    choice = echoed.choices[0]
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 4
    assert lp.token_logprobs[0] is None and all(v is not None for v in lp.token_logprobs[1:])
    assert all(len(top) <= 2 for top in lp.top_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)


def test_tokenize_and_detokenize(server: Server, tokenizer) -> None:
    text = "Hello, tokenizer world!"
    r = httpx.post(f"{server.base}/tokenize", json={"model": MODEL, "prompt": text}, headers=_auth())
    assert r.status_code == 200
    body = r.json()
    assert body["tokens"] == tokenizer.encode(text) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == MAX_MODEL_LEN
    r = httpx.post(f"{server.base}/tokenize", json={"messages": MESSAGES}, headers=_auth())
    rendered = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert r.json()["tokens"] == tokenizer.encode(rendered, add_special_tokens=False)
    r = httpx.post(f"{server.base}/detokenize", json={"tokens": body["tokens"]}, headers=_auth())
    assert r.status_code == 200 and r.json()["prompt"] == text


def test_prefix_cache_hits_show_as_cached_tokens(client: openai.OpenAI) -> None:
    prompt = " ".join(f"word{i}" for i in range(60)) + " and then"
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0)
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached > 0 and cached % 16 == 0 and cached < again.usage.prompt_tokens


# --- errors ------------------------------------------------------------------------------------------


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_error_statuses(server: Server) -> None:
    url = f"{server.base}/v1/completions"
    ok = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    json_headers = {**_auth(), "Content-Type": "application/json"}

    error = _error(httpx.post(url, content=b'{"prompt": "Hi",', headers=json_headers), 400)
    assert error["code"] == "invalid_json"
    error = _error(httpx.post(url, json={**ok, "max_tokens": "many"}, headers=_auth()), 400)
    assert error["param"] == "max_tokens"
    error = _error(httpx.post(url, json={**ok, "temperature": -1}, headers=_auth()), 400)
    assert error["param"] == "temperature" and error["type"] == "invalid_request_error"

    error = _error(httpx.post(url, json=ok, headers={"Authorization": "Bearer wrong"}), 401)
    assert error["code"] == "invalid_api_key"
    _error(httpx.post(url, json=ok), 401)
    _error(httpx.get(f"{server.base}/v1/models"), 401)

    error = _error(httpx.post(url, json={**ok, "model": "no-such-model"}, headers=_auth()), 404)
    assert error["code"] == "model_not_found"

    big = {**ok, "prompt": "word " * MAX_BODY}
    error = _error(httpx.post(url, json=big, headers=_auth()), 413)
    assert error["code"] == "request_too_large"

    long_prompt = list(range(1, MAX_MODEL_LEN + 10))
    error = _error(httpx.post(url, json={**ok, "prompt": long_prompt}, headers=_auth()), 400)
    assert error["code"] == "context_length_exceeded"
    chat = {"model": MODEL, "messages": MESSAGES, "max_tokens": MAX_MODEL_LEN}
    error = _error(httpx.post(f"{server.base}/v1/chat/completions", json=chat, headers=_auth()), 400)
    assert error["code"] == "context_length_exceeded"

    _error(httpx.post(url, json={**ok, "stream": True, "prompt": [99999999]}, headers=_auth()), 400)
    _error(httpx.get(f"{server.base}/no/such/route", headers=_auth()), 404)


def test_errors_reach_the_openai_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, temperature=-0.5)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="nope", max_retries=0).models.list()


# --- structured output -------------------------------------------------------------------------------

PET_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "kind": {"enum": ["cat", "dog", "fish"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "toys": {"type": "array", "items": {"enum": ["ball", "rope"]}, "maxItems": 2},
    },
    "required": ["name", "kind", "age"],
    "additionalProperties": False,
}
PET_FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET_SCHEMA, "strict": True}}
PET_MESSAGES = [{"role": "user", "content": "Describe a pet as JSON."}]


def _valid_pet(text: str) -> None:
    import jsonschema

    jsonschema.validate(json.loads(text), PET_SCHEMA)


def test_response_format_json_schema_at_high_temperature(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(
        model=MODEL, messages=PET_MESSAGES, max_tokens=64, temperature=1.2, seed=7, n=2,
        response_format=PET_FORMAT,
    )  # fmt: skip
    for choice in full.choices:
        assert choice.finish_reason == "stop"
        _valid_pet(choice.message.content)

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=PET_MESSAGES,
            max_tokens=64,
            temperature=1.2,
            seed=8,
            stream=True,
            response_format=PET_FORMAT,
        )  # fmt: skip
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    _valid_pet(text)

    obj = client.chat.completions.create(
        model=MODEL, messages=PET_MESSAGES, max_tokens=64, temperature=1.2, seed=9,
        response_format={"type": "json_object"},
    )  # fmt: skip
    assert obj.choices[0].message.content.startswith("{")


def test_guided_extras_on_completions(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model=MODEL, prompt="Is water wet?", max_tokens=8, temperature=1.2, n=3, seed=1,
        extra_body={"guided_choice": ["yes", "no"]},
    )  # fmt: skip
    assert all(c.text in ("yes", "no") and c.finish_reason == "stop" for c in out.choices)
    out = client.completions.create(
        model=MODEL, prompt="A number:", max_tokens=8, temperature=1.2, seed=2,
        extra_body={"guided_regex": "[0-9]{3}"},
    )  # fmt: skip
    assert re.fullmatch("[0-9]{3}", out.choices[0].text)
    out = client.completions.create(
        model=MODEL, prompt="A pet:", max_tokens=64, temperature=1.2, seed=3,
        extra_body={"guided_json": PET_SCHEMA},
    )  # fmt: skip
    _valid_pet(out.choices[0].text)


def test_invalid_structured_output_is_a_400(server: Server, client: openai.OpenAI) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    with pytest.raises(openai.BadRequestError, match="nonsense"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, response_format=bad)
    url = f"{server.base}/v1/chat/completions"
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8}
    for extra in (
        {"response_format": bad},
        {"response_format": {"type": "yaml"}},
        {"response_format": {"type": "json_schema"}},
        {"guided_regex": "a(b"},
        {"guided_choice": []},
        {"guided_regex": "a", "guided_choice": ["a"]},
    ):
        error = _error(httpx.post(url, json={**body, **extra}, headers=_auth()), 400)
        assert error["type"] == "invalid_request_error"
        assert error["param"] == next(k for k in reversed(extra)), (extra, error)
    for stream in (False, True):  # nothing started: the error comes before any event
        error = _error(
            httpx.post(url, json={**body, "stream": stream, "response_format": bad}, headers=_auth()), 400
        )
        assert error["param"] == "response_format"


# --- concurrency and disconnects ---------------------------------------------------------------------


def test_eight_concurrent_streams_match_a_single_request(server: Server, client: openai.OpenAI) -> None:
    prompt = "List some fruits:"
    single = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, **_greedy()).choices[0].text

    async def run() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{server.base}/v1", api_key=API_KEY, max_retries=0, timeout=60)

        async def one() -> str:
            stream = await aclient.completions.create(
                model=MODEL, prompt=prompt, max_tokens=16, stream=True, **_greedy()
            )
            return "".join([c.choices[0].text async for c in stream if c.choices])

        try:
            return await asyncio.gather(*(one() for _ in range(8)))
        finally:
            await aclient.close()

    assert asyncio.run(run()) == [single] * 8


def test_closing_a_stream_early_frees_its_kv_blocks(server: Server, client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a very long essay about the sea."}],
        max_tokens=400,
        stream=True,
        **_greedy(),
    )
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received >= 3:
            break
    assert metric(server, "kv_cache_usage_perc") > 0  # still generating when the client leaves
    stream.close()
    deadline = time.monotonic() + 5
    while metric(server, "kv_cache_usage_perc") > 0:
        assert time.monotonic() < deadline, "the aborted request kept its KV blocks"
        time.sleep(0.1)
    assert metric(server, "num_requests_running") == 0


def test_forty_clients_some_hanging_up_none_lost(server: Server) -> None:
    """benchmarks/serve_load.py's load test, smaller: the /health latency it reports is not asserted
    (a shared two-core machine is too noisy for a timing bound)."""
    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks" / "serve_load.py")
    serve_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_load)
    parser = argparse.ArgumentParser()
    serve_load.add_arguments(parser)
    args = parser.parse_args(
        ["--base-url", server.base, "--model", MODEL, "--api-key", API_KEY, "--clients", "40"]
        + ["--hang-up", "0.25", "--max-tokens", "8", "--prompt-len", "8", "--timeout", "120"]
    )
    report = serve_load.run_load(args)
    shown = json.dumps(report, indent=1)
    assert report["hung_up"] == 10 and report["hang_up_errors"] == [], shown
    assert report["lost"] == 0 and report["completed"] == 30, shown
    assert report["health"]["polls"] > 0 and report["health"]["failures"] == [], shown
    assert report["after"] == {"num_requests_running": 0, "kv_cache_usage_perc": 0}, shown


def test_health_answers_while_the_engine_is_busy(server: Server) -> None:
    async def run() -> float:
        async with httpx.AsyncClient(timeout=60) as http:
            # long enough to be still running at the check, however fast the decode step gets
            body = {"model": MODEL, "prompt": "Count to one hundred:", "max_tokens": 400, "ignore_eos": True}
            busy = asyncio.ensure_future(
                http.post(f"{server.base}/v1/completions", json=body, headers=_auth())
            )
            await asyncio.sleep(0.5)
            start = time.monotonic()
            assert (await http.get(f"{server.base}/health")).status_code == 200
            waited = time.monotonic() - start
            assert not busy.done()
            assert (await busy).status_code == 200
            return waited

    assert asyncio.run(run()) < 1.0


def test_one_log_line_per_request_without_prompt_text(server: Server, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt=SECRET_PROMPT, max_tokens=2, temperature=0)
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": SECRET_PROMPT}], max_tokens=2, temperature=0
    )
    time.sleep(0.2)
    log = server.log.read_text()
    assert "Zebra" not in log and "Quokka" not in log
    lines = [line for line in log.splitlines() if "POST /v1/" in line and "prompt_tokens=" in line]
    assert lines and all(
        re.search(r" (200|4\d\d) \d+\.\d+s id=\S+ prompt_tokens=\d+", line) for line in lines
    )
    assert json.dumps(SECRET_PROMPT)[1:-1] not in log


# --- tool calls --------------------------------------------------------------------------------------

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "options": {
            "type": "object",
            "properties": {"hourly": {"type": "boolean"}, "alerts": {"enum": ["none", "severe"]}},
            "required": ["hourly"],
            "additionalProperties": False,
        },
        "fields": {"type": "array", "items": {"enum": ["rain", "wind", "sun"]}, "maxItems": 3},
    },
    "required": ["city", "unit", "days", "options", "fields"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The forecast for a city.",
            "parameters": WEATHER_PARAMETERS,
        },
    },
    {"type": "function", "function": {"name": "get_time", "description": "The local time in a city."}},
]
SCHEMAS = {
    "get_weather": WEATHER_PARAMETERS,
    "get_time": {"type": "object", "properties": {}, "additionalProperties": False},
}
TOOL_MESSAGES = [{"role": "user", "content": "What will the weather be in Paris this week?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def _valid_calls(message, names: set[str]) -> None:
    import jsonschema

    assert message.content is None and message.tool_calls
    for call in message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("tool_choice", ["required", NAMED], ids=["required", "named"])
def test_forced_tool_calls_validate_at_high_temperature(client: openai.OpenAI, tool_choice) -> None:
    names = {"get_weather"} if tool_choice == NAMED else set(SCHEMAS)
    for seed in (1, 2, 3):
        out = client.chat.completions.create(
            model=MODEL, messages=TOOL_MESSAGES, tools=TOOLS, tool_choice=tool_choice,
            temperature=1.2, seed=seed, n=2, max_tokens=300,
        )  # fmt: skip
        for choice in out.choices:
            assert choice.finish_reason == "tool_calls", choice
            _valid_calls(choice.message, names)
            if tool_choice == NAMED:
                assert len(choice.message.tool_calls) == 1


def _streamed_calls(chunks) -> tuple[list[dict], list[str | None]]:
    calls: list[dict] = []
    for chunk in chunks:
        for piece in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if piece.id is not None:
                assert piece.index == len(calls) and piece.type == "function"
                calls.append({"id": piece.id, "name": piece.function.name, "arguments": ""})
            calls[piece.index]["arguments"] += piece.function.arguments or ""
    return calls, [c.choices[0].finish_reason for c in chunks if c.choices]


@pytest.mark.parametrize("tool_choice", ["required", NAMED], ids=["required", "named"])
def test_streamed_tool_calls_concatenate_to_the_non_streamed_ones(client: openai.OpenAI, tool_choice) -> None:
    request = dict(model=MODEL, messages=TOOL_MESSAGES, tools=TOOLS, tool_choice=tool_choice, max_tokens=300)
    # one call: the grammar then closes the list, so the greedy reply ends however the model leans
    request["parallel_tool_calls"] = False
    full = client.chat.completions.create(**request, temperature=0)
    chunks = list(client.chat.completions.create(**request, temperature=0, stream=True))
    calls, reasons = _streamed_calls(chunks)
    expected = [(c.function.name, c.function.arguments) for c in full.choices[0].message.tool_calls]
    assert [(c["name"], c["arguments"]) for c in calls] == expected
    assert all(c.choices[0].delta.content is None for c in chunks if c.choices)
    assert reasons[-1] == "tool_calls" and full.choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_and_auto_give_content(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model=MODEL, messages=TOOL_MESSAGES, max_tokens=12, **_greedy())
    for tool_choice in ("none", "auto"):
        out = client.chat.completions.create(
            model=MODEL,
            messages=TOOL_MESSAGES,
            tools=TOOLS,
            tool_choice=tool_choice,
            max_tokens=12,
            **_greedy(),
        )
        message = out.choices[0].message
        if tool_choice == "none" or not message.tool_calls:  # the tiny model rarely calls in auto mode
            assert message.content and message.tool_calls is None
            assert out.choices[0].finish_reason == "length"
        else:
            _valid_calls(message, set(SCHEMAS))
    # the tools reach the prompt (the embedded template has no tool support: a system message)
    assert out.usage.prompt_tokens > plain.usage.prompt_tokens


def test_tool_call_history_renders(server: Server, client: openai.OpenAI) -> None:
    arguments = json.dumps(
        {"city": "Paris", "unit": "celsius", "days": 1, "options": {"hourly": False}, "fields": []}
    )
    history = [
        *TOOL_MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 degrees."},
    ]  # fmt: skip
    out = client.chat.completions.create(
        model=MODEL, messages=history, tools=TOOLS, max_tokens=8, **_greedy()
    )
    assert out.choices[0].finish_reason in ("length", "stop", "tool_calls")
    r = httpx.post(
        f"{server.base}/tokenize",
        json={"messages": history, "tools": TOOLS, "return_token_strs": True},
        headers=_auth(),
    )
    rendered = "".join(r.json()["token_strs"])
    assert "Sunny" in rendered and "get_weather" in rendered and "<tool_call>" in rendered


def test_invalid_tools_are_a_400(server: Server, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        client.chat.completions.create(
            model=MODEL, messages=TOOL_MESSAGES, tools=TOOLS, max_tokens=4,
            tool_choice={"type": "function", "function": {"name": "launch_rocket"}},
        )  # fmt: skip
    url = f"{server.base}/v1/chat/completions"
    body = {"model": MODEL, "messages": TOOL_MESSAGES, "max_tokens": 4}
    nonsense = {"type": "object", "properties": {"x": {"type": "nonsense"}}}
    bad_schema = [{"type": "function", "function": {"name": "f", "parameters": nonsense}}]
    for extra, param in (
        ({"tools": bad_schema}, "tools[0].function.parameters"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
    ):
        for stream in (False, True):
            error = _error(httpx.post(url, json={**body, **extra, "stream": stream}, headers=_auth()), 400)
            assert error["type"] == "invalid_request_error"
            assert error["param"] == param, (extra, error)


# --- bench serve ---------------------------------------------------------------------------------------


def bench_serve(server: Server, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """``flashdecode bench serve`` against ``server``, in this process (a client needs no process of
    its own): (exit code, stdout, stderr)."""
    from flashdecode.cli import main

    capsys.readouterr()
    code = main(["bench", "serve", "--base-url", server.base, "--model", MODEL, "--no-progress", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_bench_serve_reports_every_level(server: Server, tmp_path: Path, capsys) -> None:
    report_path = tmp_path / "bench.json"
    args = ["--concurrency", "1,3", "--num-prompts", "3", "--prompt-len", "8", "--max-tokens", "4"]
    code, out, err = bench_serve(server, capsys, *args, "--api-key", API_KEY, "--json", str(report_path))
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert report["model"] == MODEL and report["max_tokens"] == 4
    assert [level["concurrency"] for level in report["levels"]] == [1, 3]
    for level in report["levels"]:
        assert level["errors"] == 0 and level["completed"] == 3, level
        assert level["output_tokens"] == 3 * 4  # the server's own usage counts, EOS ignored
        assert level["request_throughput"] > 0 and level["output_tokens_per_s"] > 0
        for name in ("ttft_ms", "itl_ms", "e2e_ms"):
            assert set(level[name]) == {"p50", "p90", "p99", "mean"}
            assert 0 < level[name]["p50"] <= level[name]["p90"] <= level[name]["p99"]
    assert "TTFT p50 ms" in out


def test_bench_serve_counts_errors(server: Server, tmp_path: Path, capsys) -> None:
    args = ["--concurrency", "2", "--num-prompts", "2", "--max-tokens", "2", "--api-key", "wrong"]
    code, _, err = bench_serve(server, capsys, *args, "--json", str(tmp_path / "bench.json"))
    assert code == 0, err
    (level,) = json.loads((tmp_path / "bench.json").read_text())["levels"]
    assert level["errors"] == 2 and level["completed"] == 0
    assert level["error_samples"] and "401" in level["error_samples"][0]
