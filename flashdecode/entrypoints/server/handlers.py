"""The OpenAI endpoints over one ``AsyncLLMEngine``: requests to prompts and ``SamplingParams``,
engine outputs to OpenAI responses and stream chunks.

Prompts are tokenized here, not in the engine, so every check that can fail (empty prompt, token ids
outside the vocabulary, prompt beyond the context) fails before a response starts, and so usage
counts are the exact ids the engine ran. A completion with several prompts is one engine request per
prompt; choice ``index`` is ``prompt_index * n + i`` as in OpenAI's API. Tools and tool calls are
read and written by tool_calls.py; here they only pass through.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ...errors import FlashDecodeError, InvalidSamplingParamsError
from ...outputs import Logprob, RequestOutput
from ...sampling_params import MAX_LOGPROBS, SamplingParams
from ..async_engine import AsyncLLMEngine, EngineDeadError
from .errors import APIError, bad_request, context_length_exceeded, error_body, from_flashdecode
from .metrics import ServerMetrics
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Delta,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    SamplingRequest,
    TokenizeRequest,
    TokenizeResponse,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from .streaming import EventStream, merge_streams, sse, until_disconnected
from .tool_calls import (
    ToolCallParser,
    ToolPlan,
    arguments_object,
    inline_tools,
    new_call_id,
    plan_tools,
    tool_calls_of,
)

MAX_N = 128  # OpenAI's own cap on choices per request
_MIN_LOGPROB = -9999.0  # -inf is not JSON; vLLM clamps to the same value


@dataclass
class ServerSettings:
    model_names: list[str]  # the first is the name responses carry; requests may use any
    model_root: str | None = None  # the model's path, shown in /v1/models
    api_key: str | None = None
    max_body_bytes: int = 4 << 20
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class _Prompt:
    text: str | None
    ids: list[int]

    def engine_input(self) -> dict[str, Any]:
        return {"prompt": self.text, "prompt_token_ids": self.ids}


@dataclass
class _Tally:
    """What a stream has produced so far, for its usage chunk and its log line."""

    completion_tokens: int = 0
    cached: int = 0
    reasons: list[str] = field(default_factory=list)


def _clamp(logprob: float) -> float:
    return max(logprob, _MIN_LOGPROB)


def _top(entry: dict[int, Logprob], num: int) -> list[tuple[int, Logprob]]:
    """The top ``num`` candidates of one position, most likely first (the engine's dict holds the
    chosen token first, then the top tokens with their rank)."""
    ranked = [(t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= num]
    return sorted(ranked, key=lambda item: item[1].rank)


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, settings: ServerSettings, metrics: ServerMetrics):
        self.engine = engine
        core = engine.engine
        self.tokenizer = core.tokenizer
        self.max_model_len = core.max_model_len
        self.vocab_size = core.spec.vocab_size
        self.settings = settings
        self.metrics = metrics
        self.model_name = settings.model_names[0]

    # --- checks ---------------------------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.settings.model_names:
            raise APIError(404, f"The model `{name}` does not exist.", "model", "model_not_found")

    def _check_common(self, req: SamplingRequest) -> None:
        self.check_model(req.model)
        if req.n > MAX_N:
            raise bad_request(f"n must be at most {MAX_N}, got {req.n}", "n")
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        if req.logit_bias:
            raise bad_request("logit_bias is not supported yet", "logit_bias")

    def _check_ids(self, ids: list[int], param: str) -> None:
        if not ids:
            raise bad_request("the prompt is empty", param)
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})", param)

    def _check_length(self, num_prompt: int, max_tokens: int | None, what: str) -> None:
        limit = self.max_model_len
        if num_prompt >= limit:
            raise context_length_exceeded(
                f"This model's maximum context length is {limit} tokens, and your {what} has {num_prompt} "
                f"tokens; the {what} and at least one generated token must fit.",
                what,
            )
        if max_tokens is not None and num_prompt + max_tokens > limit:
            raise context_length_exceeded(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt + max_tokens} tokens ({num_prompt} in the {what}, {max_tokens} for the "
                f"completion). Please reduce the length of the {what} or max_tokens.",
                what,
            )

    async def _sampling(
        self,
        req: SamplingRequest,
        max_tokens: int | None,
        logprobs: int | None,
        prompt_logprobs: int | None,
        tool_schema: dict[str, Any] | None = None,
    ) -> SamplingParams:
        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        structured_output, param = self._structured_output(req, tool_schema)
        build = functools.partial(
            SamplingParams,
            n=req.n,
            temperature=pick(req.temperature, 1.0),
            top_p=pick(req.top_p, 1.0),
            top_k=pick(req.top_k, 0),
            min_p=pick(req.min_p, 0.0),
            repetition_penalty=pick(req.repetition_penalty, 1.0),
            presence_penalty=pick(req.presence_penalty, 0.0),
            frequency_penalty=pick(req.frequency_penalty, 0.0),
            seed=req.seed,
            stop=req.stop,
            stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
            output_kind="delta" if req.stream else "final_only",
            structured_output=structured_output,
        )
        try:
            # a grammar compiles in a thread (a big schema takes a while), so other streams go on
            return await asyncio.to_thread(build) if structured_output is not None else build()
        except InvalidSamplingParamsError as exc:
            if param is not None and str(exc).startswith("structured_output"):
                raise bad_request(f"{param}: {exc}", param) from exc
            raise

    @staticmethod
    def _structured_output(
        req: SamplingRequest, tool_schema: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any] | None, str | None]:
        """The request's output constraint as ``SamplingParams.structured_output``, and the field that
        asked for it: OpenAI's ``response_format``, one of vLLM's ``guided_*`` extras, or a forced
        tool call (``tool_choice``)."""
        found: list[tuple[dict[str, Any], str]] = []
        if tool_schema is not None:
            found.append(({"json": tool_schema}, "tool_choice"))
        rf = req.response_format
        if rf is not None:
            kind = rf.get("type", "text")
            if kind == "json_object":
                found.append(({"json_object": True}, "response_format"))
            elif kind == "json_schema":
                spec = rf.get("json_schema")
                if not isinstance(spec, dict):
                    raise bad_request(
                        "response_format json_schema needs a 'json_schema' object with a 'schema'",
                        "response_format",
                    )
                schema = spec.get("schema")
                # OpenAI lets the schema be omitted: then any JSON object will do
                found.append(
                    ({"json_object": True} if schema is None else {"json": schema}, "response_format")
                )
            elif kind != "text":
                raise bad_request(
                    f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                    "response_format",
                )
        if req.guided_json is not None:
            found.append(({"json": req.guided_json}, "guided_json"))
        if req.guided_regex is not None:
            found.append(({"regex": req.guided_regex}, "guided_regex"))
        if req.guided_choice is not None:
            found.append(({"choice": req.guided_choice}, "guided_choice"))
        if len(found) > 1:
            names = ", ".join(param for _, param in found)
            raise bad_request(f"at most one output constraint may be given, got {names}", found[1][1])
        return found[0] if found else (None, None)

    # --- prompts --------------------------------------------------------------------------------

    def completion_prompts(self, prompt: str | list) -> list[_Prompt]:
        if isinstance(prompt, str):
            items: list = [prompt]
        elif not prompt:
            raise bad_request("prompt must not be empty", "prompt")
        elif isinstance(prompt[0], int):
            items = [prompt]
        else:
            items = list(prompt)
        prompts = []
        for item in items:
            if isinstance(item, str):
                p = _Prompt(item, self.tokenizer.encode(item))
            else:
                p = _Prompt(None, list(item))
            self._check_ids(p.ids, "prompt")
            prompts.append(p)
        return prompts

    def render_chat(
        self,
        messages: list[ChatMessage],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        if not messages:
            raise bad_request("messages must not be empty", "messages")
        conversation = [self._chat_entry(k, m) for k, m in enumerate(messages)]
        if self.tokenizer.chat_template_takes_tools:
            return self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, tools=tools
            )
        conversation = inline_tools(conversation, tools)
        return self.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)

    def _chat_entry(self, k: int, m: ChatMessage) -> dict[str, Any]:
        """One message as the chat template sees it (Hugging Face's shape)."""
        role = "system" if m.role == "developer" else m.role
        if m.tool_calls and role != "assistant":
            raise bad_request(f"messages[{k}]: only assistant messages carry tool_calls", f"messages[{k}]")
        content = self._message_text(k, m)
        if content is None:
            if role != "assistant":
                raise bad_request(f"messages[{k}].content is required", f"messages[{k}].content")
            content = ""
        entry: dict[str, Any] = {"role": role, "content": content}
        if m.name is not None:
            entry["name"] = m.name
        if role == "tool" and m.tool_call_id is not None:
            entry["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            entry["tool_calls"] = [
                {
                    "id": call.id or new_call_id(),
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": arguments_object(call.function.arguments),
                    },
                }
                for call in m.tool_calls
            ]
        return entry

    @staticmethod
    def _message_text(k: int, m: ChatMessage) -> str | None:
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise bad_request(
                        f"messages[{k}].content[{j}]: only text parts are supported, got {part.type!r}",
                        f"messages[{k}].content",
                    )
                texts.append(part.text)
            content = "\n".join(texts)
        return content

    def chat_prompt(self, req: ChatCompletionRequest, plan: ToolPlan | None) -> _Prompt:
        text = self.render_chat(req.messages, req.add_generation_prompt, plan.tools if plan else None)
        # the template writes BOS itself where the model wants it
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        self._check_ids(ids, "messages")
        return _Prompt(text, ids)

    def _prompt_text(self, p: _Prompt) -> str:
        return p.text if p.text is not None else self.tokenizer.decode(p.ids, skip_special_tokens=False)

    def _token_text(self, token_id: int, lp: Logprob | None) -> str:
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    # --- logprobs -------------------------------------------------------------------------------

    def _completion_logprobs(
        self, token_ids: list[int], entries: list, num: int, offset: int
    ) -> tuple[CompletionLogprobs, int]:
        """The legacy format for ``token_ids`` (``entries[i]`` None for the first prompt token); text
        offsets start at ``offset``. Returns the logprobs and the offset after the last token."""
        result = CompletionLogprobs()
        for token_id, entry in zip(token_ids, entries):
            chosen = entry.get(token_id) if entry is not None else None
            token = self._token_text(token_id, chosen)
            result.tokens.append(token)
            result.text_offset.append(offset)
            offset += len(token)
            if entry is None:
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
                continue
            result.token_logprobs.append(_clamp(chosen.logprob) if chosen is not None else None)
            result.top_logprobs.append(
                {self._token_text(t, lp): _clamp(lp.logprob) for t, lp in _top(entry, num)}
            )
        return result, offset

    def _chat_logprobs(self, token_ids: list[int], entries: list, num: int) -> ChatLogprobs:
        content = []
        for token_id, entry in zip(token_ids, entries):
            chosen = entry.get(token_id)
            token = self._token_text(token_id, chosen)
            top = []
            for t, lp in _top(entry, num):
                text = self._token_text(t, lp)
                top.append(TopLogprob(token=text, logprob=_clamp(lp.logprob), bytes=list(text.encode())))
            content.append(
                TokenLogprob(
                    token=token,
                    logprob=_clamp(chosen.logprob) if chosen is not None else _MIN_LOGPROB,
                    bytes=list(token.encode()),
                    top_logprobs=top,
                )
            )
        return ChatLogprobs(content=content)

    # --- running --------------------------------------------------------------------------------

    def _streams(
        self, request_id: str, prompts: list[_Prompt], params: SamplingParams, priority: int
    ) -> list:
        return [
            self.engine.generate(p.engine_input(), params, request_id=f"{request_id}-{i}", priority=priority)
            for i, p in enumerate(prompts)
        ]

    async def _collect(self, streams: list) -> list[RequestOutput]:
        finals: list[RequestOutput | None] = [None] * len(streams)
        async with contextlib.aclosing(merge_streams(streams)) as merged:
            async for index, out in merged:
                finals[index] = out
        for out in finals:
            self.metrics.observe(out)
        return finals

    @staticmethod
    def _usage(prompts: list[_Prompt], completion_tokens: int, cached: int) -> Usage:
        prompt_tokens = sum(len(p.ids) for p in prompts)
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )

    @staticmethod
    def _log_entry(request: Request, request_id: str, prompts: list[_Prompt]) -> dict[str, Any]:
        entry = {"id": request_id, "prompt_tokens": sum(len(p.ids) for p in prompts)}
        request.state.log = entry  # the access-log middleware writes it, once the response is done
        return entry

    @staticmethod
    def _error_event(exc: BaseException) -> str:
        if isinstance(exc, FlashDecodeError):
            api = from_flashdecode(exc)
            body = error_body(api.status, api.message, api.param, api.code)
        else:
            body = error_body(503, f"the engine failed: {exc}")
        return sse(json.dumps(body))

    async def _sse(
        self, events: AsyncIterator[str], tally: _Tally, log: dict, usage_chunk: Callable[[], str] | None
    ) -> AsyncIterator[str]:
        """A stream's ``events``, then its usage chunk (when asked for), an error event if the engine
        failed, and ``[DONE]``; the log line gets the stream's tally however it ends."""
        try:
            async with contextlib.aclosing(events) as body:
                async for event in body:
                    yield event
            if usage_chunk is not None:
                yield usage_chunk()
        except (FlashDecodeError, EngineDeadError) as exc:
            log["error"] = type(exc).__name__
            yield self._error_event(exc)
        finally:
            log.update(completion_tokens=tally.completion_tokens, finish=",".join(tally.reasons) or "aborted")
        yield sse("[DONE]")

    # --- /v1/completions ------------------------------------------------------------------------

    async def create_completion(self, req: CompletionRequest, request: Request) -> Response:
        self._check_common(req)
        if req.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request("best_of is not supported (it must equal n)", "best_of")
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
            raise bad_request(f"logprobs must be in [0, {MAX_LOGPROBS}], got {req.logprobs}", "logprobs")
        prompts = self.completion_prompts(req.prompt)
        for p in prompts:
            self._check_length(len(p.ids), req.max_tokens, "prompt")
        prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
        params = await self._sampling(req, req.max_tokens, req.logprobs, prompt_logprobs)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        log = self._log_entry(request, request_id, prompts)
        streams = self._streams(request_id, prompts, params, req.priority)
        if req.stream:
            tally = _Tally()
            usage_chunk = None
            if req.stream_options and req.stream_options.include_usage:

                def usage_chunk() -> str:
                    usage = self._usage(prompts, tally.completion_tokens, tally.cached)
                    body = CompletionChunk(
                        id=request_id,
                        created=int(time.time()),
                        model=self.model_name,
                        choices=[],
                        usage=usage,
                    )
                    return sse(body.model_dump_json())

            events = self._completion_events(request_id, req, prompts, streams, tally)
            return EventStream(self._sse(events, tally, log, usage_chunk))

        finals = await until_disconnected(request, self._collect(streams))
        choices = []
        for i, (p, out) in enumerate(zip(prompts, finals)):
            for c in out.outputs:
                text, offset, logprobs = c.text, 0, None
                if req.echo:
                    text = self._prompt_text(p) + text
                if req.logprobs is not None:
                    ids, entries = c.token_ids, c.logprobs or []
                    if req.echo:
                        ids, entries = p.ids + ids, list(out.prompt_logprobs or [None] * len(p.ids)) + entries
                    logprobs, offset = self._completion_logprobs(ids, entries, req.logprobs, offset)
                choices.append(
                    CompletionChoice(
                        index=i * req.n + c.index,
                        text=text,
                        logprobs=logprobs,
                        finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason,
                    )
                )
        completion_tokens = sum(len(c.token_ids) for out in finals for c in out.outputs)
        usage = self._usage(prompts, completion_tokens, sum(out.num_cached_tokens for out in finals))
        log.update(
            completion_tokens=completion_tokens, finish=",".join(c.finish_reason or "" for c in choices)
        )
        body = CompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage)
        return JSONResponse(body.model_dump(mode="json"))

    async def _completion_events(self, request_id, req, prompts, streams, tally: _Tally):
        created = int(time.time())
        echoed: set[int] = set()
        offsets: dict[int, int] = {}
        prompt_lps: dict[int, list] = {}
        async with contextlib.aclosing(merge_streams(streams)) as merged:
            async for i, out in merged:
                if out.prompt_logprobs is not None:
                    prompt_lps[i] = out.prompt_logprobs
                if out.finished:
                    tally.cached += out.num_cached_tokens
                    self.metrics.observe(out)
                for c in out.outputs:
                    index = i * req.n + c.index
                    text, ids, entries = c.text, c.token_ids, c.logprobs or []
                    tally.completion_tokens += len(ids)
                    if c.finish_reason is not None:
                        tally.reasons.append(c.finish_reason)
                    if req.echo and index not in echoed and (req.logprobs is None or i in prompt_lps):
                        echoed.add(index)
                        text = self._prompt_text(prompts[i]) + text
                        if req.logprobs is not None:
                            ids, entries = prompts[i].ids + ids, list(prompt_lps[i]) + entries
                    if not text and not ids and c.finish_reason is None:
                        continue
                    logprobs = None
                    if req.logprobs is not None:
                        logprobs, offsets[index] = self._completion_logprobs(
                            ids, entries, req.logprobs, offsets.get(index, 0)
                        )
                    choice = CompletionChoice(
                        index=index,
                        text=text,
                        logprobs=logprobs,
                        finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason,
                    )
                    chunk = CompletionChunk(
                        id=request_id, created=created, model=self.model_name, choices=[choice]
                    )
                    yield sse(chunk.model_dump_json())

    # --- /v1/chat/completions -------------------------------------------------------------------

    async def create_chat_completion(self, req: ChatCompletionRequest, request: Request) -> Response:
        self._check_common(req)
        if req.functions or req.function_call is not None:
            raise bad_request(
                "functions and function_call are deprecated: use tools and tool_choice", "functions"
            )
        tools = (req.tools, req.tool_choice, req.parallel_tool_calls)
        # each tool's parameters schema compiles: in a thread, as a grammar does (see _sampling)
        plan = await asyncio.to_thread(plan_tools, *tools) if req.tools else plan_tools(*tools)
        top_logprobs = None
        if req.logprobs:
            top_logprobs = 0 if req.top_logprobs is None else req.top_logprobs
            if not 0 <= top_logprobs <= MAX_LOGPROBS:
                raise bad_request(
                    f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {top_logprobs}", "top_logprobs"
                )
        elif req.top_logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        prompt = self.chat_prompt(req, plan)
        self._check_length(len(prompt.ids), max_tokens, "messages")
        params = await self._sampling(req, max_tokens, top_logprobs, None, plan.schema if plan else None)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        log = self._log_entry(request, request_id, [prompt])
        streams = self._streams(request_id, [prompt], params, req.priority)
        if req.stream:
            return self._chat_stream(request_id, req, prompt, streams, top_logprobs, plan, log)

        (out,) = await until_disconnected(request, self._collect(streams))
        choices = []
        for c in out.outputs:
            message, finish_reason = self._chat_message(c.text, c.finish_reason, plan)
            logprobs = None
            if top_logprobs is not None:
                logprobs = self._chat_logprobs(c.token_ids, c.logprobs or [], top_logprobs)
            choices.append(
                ChatChoice(
                    index=c.index,
                    message=message,
                    logprobs=logprobs,
                    finish_reason=finish_reason,
                    stop_reason=c.stop_reason,
                )
            )
        completion_tokens = sum(len(c.token_ids) for c in out.outputs)
        log.update(
            completion_tokens=completion_tokens, finish=",".join(c.finish_reason or "" for c in choices)
        )
        body = ChatCompletionResponse(
            id=request_id,
            model=self.model_name,
            choices=choices,
            usage=self._usage([prompt], completion_tokens, out.num_cached_tokens),
        )
        return JSONResponse(body.model_dump(mode="json"))

    @staticmethod
    def _parser(plan: ToolPlan | None) -> ToolCallParser:
        return plan.parser() if plan is not None else ToolCallParser()

    def _chat_message(
        self, text: str, finish_reason: str | None, plan: ToolPlan | None
    ) -> tuple[AssistantMessage, str | None]:
        """A whole reply as the message OpenAI sends, read by the same parser a stream uses."""
        parser = self._parser(plan)
        content, deltas = parser.feed(text)
        tail, more = parser.close()
        calls = tool_calls_of(deltas + more)
        if not calls:
            return AssistantMessage(content=text), finish_reason
        message = AssistantMessage(content=(content + tail) or None, tool_calls=calls)
        return message, parser.finish_reason(finish_reason)

    def _chat_stream(self, request_id, req, prompt, streams, top_logprobs, plan, log) -> EventStream:
        tally = _Tally()
        created = int(time.time())
        usage_chunk = None
        if req.stream_options and req.stream_options.include_usage:

            def usage_chunk() -> str:
                usage = self._usage([prompt], tally.completion_tokens, tally.cached)
                body = ChatCompletionChunk(
                    id=request_id, created=created, model=self.model_name, choices=[], usage=usage
                )
                return sse(body.model_dump_json())

        events = self._chat_events(request_id, created, req, streams, top_logprobs, plan, tally)
        return EventStream(self._sse(events, tally, log, usage_chunk))

    async def _chat_events(self, request_id, created, req, streams, top_logprobs, plan, tally: _Tally):
        def chunk(choice: ChatChunkChoice) -> str:
            body = ChatCompletionChunk(
                id=request_id, created=created, model=self.model_name, choices=[choice]
            )
            return sse(body.model_dump_json())

        parsers = {index: self._parser(plan) for index in range(req.n)}
        # the role first, as OpenAI sends it (with no content when the reply can only be tool calls)
        opening = Delta(role="assistant", content=None if plan is not None and plan.forced else "")
        for index in range(req.n):
            yield chunk(ChatChunkChoice(index=index, delta=opening))
        async with contextlib.aclosing(merge_streams(streams)) as merged:
            async for _, out in merged:
                if out.finished:
                    tally.cached = out.num_cached_tokens
                    self.metrics.observe(out)
                for c in out.outputs:
                    tally.completion_tokens += len(c.token_ids)
                    parser, finish_reason = parsers[c.index], c.finish_reason
                    content, deltas = parser.feed(c.text)
                    if finish_reason is not None:
                        tally.reasons.append(finish_reason)
                        tail, more = parser.close()
                        content, deltas = content + tail, deltas + more
                        finish_reason = parser.finish_reason(finish_reason)
                    carries_logprobs = top_logprobs is not None and c.token_ids
                    if not content and not deltas and finish_reason is None and not carries_logprobs:
                        continue
                    logprobs = None
                    if top_logprobs is not None:
                        logprobs = self._chat_logprobs(c.token_ids, c.logprobs or [], top_logprobs)
                    yield chunk(
                        ChatChunkChoice(
                            index=c.index,
                            delta=Delta(content=content or None, tool_calls=deltas or None),
                            logprobs=logprobs,
                            finish_reason=finish_reason,
                            stop_reason=c.stop_reason,
                        )
                    )

    # --- the rest -------------------------------------------------------------------------------

    def list_models(self) -> ModelList:
        return ModelList(data=[self.model_card(name) for name in self.settings.model_names])

    def model_card(self, name: str) -> ModelCard:
        return ModelCard(
            id=name,
            created=self.settings.created,
            root=self.settings.model_root,
            max_model_len=self.max_model_len,
        )

    def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of prompt and messages", "prompt")
        if req.prompt is not None:
            add = True if req.add_special_tokens is None else req.add_special_tokens
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=add)
        else:
            plan = plan_tools(req.tools, None, True)
            text = self.render_chat(req.messages, req.add_generation_prompt, plan.tools if plan else None)
            ids = self.tokenizer.encode(text, add_special_tokens=bool(req.add_special_tokens))
        strs = self.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=ids, token_strs=strs)

    def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(req.model)
        bad = next((t for t in req.tokens if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})", "tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(req.tokens, skip_special_tokens=False))
