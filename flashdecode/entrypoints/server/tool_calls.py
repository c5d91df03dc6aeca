"""Tool calls on /v1/chat/completions: the request's ``tools`` and ``tool_choice`` checked, rendered into
the prompt, and the model's output read back as OpenAI ``tool_calls``.

``required`` and a named function are enforced by constrained decoding: the output is JSON, one
``{"name": ..., "arguments": ...}`` object (named) or a list of them (required), whose arguments match
that function's parameters schema. ``auto`` lets the model write freely and parses its own syntax
(Hermes/Qwen ``<tool_call>`` tags, or a bare Llama 3 style JSON object); ``none`` leaves the text alone.

Templates that read ``tools`` get them, and history with tool calls and results, as Hugging Face passes
them. Other templates get the tools described in the system message in Hermes' words, past calls as
``<tool_call>`` text and results as user turns, as vLLM and llama-server do for such templates.

Streamed and non-streamed replies go through the same parser (:class:`ToolCallParser`), so the
argument fragments of a stream concatenate to exactly the non-streamed arguments.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from .errors import bad_request
from .protocol import DeltaFunction, DeltaToolCall, NamedToolChoice, Tool, ToolCall, ToolCallFunction

# OpenAI's rule for function names; it also keeps names safe to embed in the grammar and the prompt
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
# where a model's own tool-call syntax starts, in auto mode
_TAG_OPEN, _TAG_CLOSE = "<tool_call>", "</tool_call>"
_CALL_MARKERS = (_TAG_OPEN, "<|python_tag|>")
# how a bare JSON call (Llama 3's) starts, without whitespace: one call, or a list of them
_BARE_CALL_HEADS = ('{"name":"', '[{"name":"')
_TAGGED = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
# the head of one forced call, as the grammar writes it (compact JSON, "name" first)
_FORCED_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')

_TOOL_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


@dataclass
class ToolPlan:
    """What a request's ``tools`` and ``tool_choice`` ask of the reply."""

    tools: list[dict[str, Any]]  # OpenAI's shape, parameters filled in: what the template sees
    choice: str  # "none", "auto", "required" or "named"
    schema: dict[str, Any] | None = None  # the grammar's JSON schema when the call is forced

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}

    @property
    def forced(self) -> bool:
        return self.schema is not None

    def parser(self) -> ToolCallParser:
        if self.forced:
            return ForcedToolCalls()
        if self.choice == "auto":
            return AutoToolCalls(self.names)
        return ToolCallParser()


def plan_tools(
    tools: list[Tool] | None, tool_choice: str | NamedToolChoice | None, parallel: bool
) -> ToolPlan | None:
    """The request's tool plan (None without tools); a 400 for anything malformed."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise bad_request("tool_choice is only allowed when tools are given", "tool_choice")
        return None
    specs = [_tool_spec(k, tool) for k, tool in enumerate(tools)]
    by_name = {s["function"]["name"]: s for s in specs}
    if len(by_name) != len(specs):
        raise bad_request("tools must have distinct function names", "tools")
    if tool_choice is None:
        tool_choice = "auto"
    if isinstance(tool_choice, str) and tool_choice not in ("none", "auto", "required"):
        message = f"tool_choice must be 'none', 'auto', 'required' or a named function, got {tool_choice!r}"
        raise bad_request(message, "tool_choice")
    if isinstance(tool_choice, NamedToolChoice):
        name = tool_choice.function.name
        if name not in by_name:
            raise bad_request(
                f"tool_choice names the function {name!r}, which is not in tools", "tool_choice"
            )
        return ToolPlan(specs, "named", _call_schema(by_name[name]))
    if tool_choice == "required":
        calls: dict[str, Any] = {
            "type": "array",
            "minItems": 1,
            "items": {"anyOf": [_call_schema(s) for s in specs]},
        }
        if not parallel:
            calls["maxItems"] = 1
        return ToolPlan(specs, "required", calls)
    return ToolPlan(specs, tool_choice)


def _tool_spec(k: int, tool: Tool) -> dict[str, Any]:
    fn = tool.function
    if not _NAME.match(fn.name):
        raise bad_request(
            f"tools[{k}].function.name must be 1 to 64 letters, digits, '_' or '-', got {fn.name!r}",
            f"tools[{k}].function.name",
        )
    parameters = _NO_PARAMETERS if fn.parameters is None else fn.parameters
    _check_schema(parameters, f"tools[{k}].function.parameters")
    spec: dict[str, Any] = {"name": fn.name, "parameters": parameters}
    if fn.description is not None:
        spec["description"] = fn.description
    return {"type": "function", "function": spec}


def _check_schema(schema: dict[str, Any], param: str) -> None:
    # a tokenizer-free compile, so a bad schema is a 400 even when nothing forces the call
    from llguidance import LLMatcher

    if schema.get("type", "object") != "object":
        raise bad_request(f"{param} must be a JSON schema of type 'object'", param)
    try:
        error = LLMatcher.validate_grammar(LLMatcher.grammar_from_json_schema(schema))
    except Exception as exc:  # llguidance raises ValueError/TypeError/RuntimeError on bad schemas
        error = str(exc)
    if error:
        raise bad_request(f"{param} is not a valid JSON schema: {error.strip()}", param)


def _call_schema(spec: dict[str, Any]) -> dict[str, Any]:
    fn = spec["function"]
    return {
        "type": "object",
        "properties": {"name": {"const": fn["name"]}, "arguments": fn["parameters"]},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# --- the prompt ------------------------------------------------------------------------------------


def tool_system_prompt(tools: list[dict[str, Any]]) -> str:
    return _TOOL_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))


def arguments_object(arguments: str | dict[str, Any]) -> Any:
    """A past call's arguments as the object templates expect (Hugging Face passes dicts; OpenAI's
    text is decoded where it parses)."""
    if isinstance(arguments, dict):
        return arguments
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def arguments_text(arguments: str | dict[str, Any]) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def inline_tools(
    conversation: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """``conversation`` for a template without tool support: the tools described in the system
    message, past calls as ``<tool_call>`` text, tool results as (merged) user turns."""
    out: list[dict[str, Any]] = []
    for entry in conversation:
        entry = dict(entry)
        calls = entry.pop("tool_calls", None)
        if calls:
            texts = [entry.get("content") or ""]
            for call in calls:
                fn = call["function"]
                body = json.dumps({"name": fn["name"], "arguments": fn["arguments"]}, ensure_ascii=False)
                texts.append(f"<tool_call>\n{body}\n</tool_call>")
            entry["content"] = "\n".join(t for t in texts if t)
        if entry["role"] == "tool":
            entry.pop("tool_call_id", None)
            entry.pop("name", None)
            response = f"<tool_response>\n{entry['content']}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + response
                continue
            entry = {"role": "user", "content": response, "_tool_results": True}
        out.append(entry)
    for entry in out:
        entry.pop("_tool_results", None)
    if tools:
        prompt = tool_system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


# --- reading the output ----------------------------------------------------------------------------


class ToolCallParser:
    """Text in, (content, tool-call deltas) out, as the text streams; this base passes text through."""

    def __init__(self) -> None:
        self.calls = 0  # tool calls begun so far

    def feed(self, text: str) -> tuple[str, list[DeltaToolCall]]:
        return text, []

    def close(self) -> tuple[str, list[DeltaToolCall]]:
        """The end of the output: whatever was held back."""
        return "", []

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and self.calls else reason

    def _start(self, name: str) -> DeltaToolCall:
        self.calls += 1
        return DeltaToolCall(
            index=self.calls - 1,
            id=new_call_id(),
            type="function",
            function=DeltaFunction(name=name, arguments=""),
        )


class ForcedToolCalls(ToolCallParser):
    """The grammar-shaped output: argument text streams as it comes, up to the end of each
    arguments value (tracked by bracket depth outside strings)."""

    def __init__(self) -> None:
        super().__init__()
        self._text = ""
        self._pos = 0
        self._depth: int | None = None  # inside an arguments value when not None
        self._in_string = False
        self._escaped = False

    def feed(self, text: str) -> tuple[str, list[DeltaToolCall]]:
        self._text += text
        deltas: list[DeltaToolCall] = []
        while self._pos < len(self._text):
            if self._depth is None:
                head = _FORCED_HEAD.search(self._text, self._pos)
                if head is None:
                    break
                deltas.append(self._start(json.loads(f'"{head.group(1)}"')))
                self._pos, self._depth = head.end(), 0
            else:
                start = self._pos
                self._scan_arguments()
                if self._pos > start:
                    deltas.append(self._fragment(self._text[start : self._pos]))
        return "", _coalesce(deltas)

    def _scan_arguments(self) -> None:
        text = self._text
        while self._pos < len(text):
            ch = text[self._pos]
            self._pos += 1
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self._depth = None
                    return

    def _fragment(self, text: str) -> DeltaToolCall:
        return DeltaToolCall(index=self.calls - 1, function=DeltaFunction(arguments=text))


class AutoToolCalls(ToolCallParser):
    """Free text that may hold the model's own tool-call syntax: plain text streams as content until
    a call may be starting. A ``<tool_call>...</tool_call>`` block is sent as a call as soon as it
    closes (a block that is no call of the tools stays text), and text after it streams again;
    whitespace right after a call is dropped. A reply that starts as JSON is held only while it can
    still be a bare call of one of the tools (``{"name": "<tool>"`` or a list of such, whitespace
    aside); held text is parsed at the end."""

    def __init__(self, names: set[str]) -> None:
        super().__init__()
        self._names = names
        self._held = ""
        self._holding = False  # a call has (maybe) begun: nothing more streams as content
        self._prose = False  # the output is not a bare JSON call
        self._after_call = False  # a tagged call just closed: its trailing whitespace is dropped

    def feed(self, text: str) -> tuple[str, list[DeltaToolCall]]:
        self._held += text
        if not self._prose and not self._holding:  # a bare JSON call counts only at the very start
            stripped = self._held.lstrip()
            if not stripped:
                return "", []
            state = _bare_call(stripped, self._names)
            self._holding, self._prose = state == "call", state == "no"
        content, deltas = "", []
        while self._prose:
            if self._holding:
                closed = self._close_tagged()
                if closed is None:
                    break
                content, deltas = content + closed[0], deltas + closed[1]
                continue
            if self._after_call:
                if not self._held.strip():
                    break
                self._held, self._after_call = self._held.lstrip(), False
            starts = [i for i in (self._held.find(m) for m in _CALL_MARKERS) if i >= 0]
            if starts:
                cut, self._holding = min(starts), True
            else:
                cut = len(self._held) - _partial_marker(self._held)
            content, self._held = content + self._held[:cut], self._held[cut:]
            if not starts:
                break
        return content, deltas

    def _close_tagged(self) -> tuple[str, list[DeltaToolCall]] | None:
        """The held ``<tool_call>`` block once it is complete: ("", [its call]) or (the block as
        text, []); None while it is open (or held to the end: ``<|python_tag|>``)."""
        end = self._held.find(_TAG_CLOSE)
        if not self._held.startswith(_TAG_OPEN) or end < 0:
            return None
        block, self._held = self._held[: end + len(_TAG_CLOSE)], self._held[end + len(_TAG_CLOSE) :]
        self._holding = False
        call = _call(_json(block[len(_TAG_OPEN) : -len(_TAG_CLOSE)]), self._names)
        if call is None:
            return block, []
        self._after_call = True
        return "", [self._whole_call(*call)]

    def _whole_call(self, name: str, arguments: str) -> DeltaToolCall:
        start = self._start(name)
        start.function.arguments = arguments
        return start

    def close(self) -> tuple[str, list[DeltaToolCall]]:
        held, self._held = self._held, ""
        if self._after_call and not held.strip():
            return "", []
        content, calls = parse_tool_calls(held, self._names)
        return content or "", [self._whole_call(name, arguments) for name, arguments in calls]


def _bare_call(text: str, names: set[str]) -> str:
    """Whether a reply starting with ``text`` is a bare JSON call of one of ``names``: "call" (its
    name is complete), "maybe" or "no". "no" only for a prefix whose every extension is "no" too, so
    the answer does not depend on how the reply was cut into chunks."""
    compact = "".join(text.split())  # the head has no string that may hold whitespace
    for head in _BARE_CALL_HEADS:
        if len(compact) <= len(head):
            if head.startswith(compact):
                return "maybe"
        elif compact.startswith(head):
            name, closed, _ = compact[len(head) :].partition('"')
            if closed:
                return "call" if name in names else "no"
            return "maybe" if any(n.startswith(name) for n in names) else "no"
    return "no"


def _partial_marker(text: str) -> int:
    """How many characters at the end of ``text`` could begin a call marker."""
    for n in range(min(len(text), max(map(len, _CALL_MARKERS)) - 1), 0, -1):
        if any(m.startswith(text[-n:]) for m in _CALL_MARKERS):
            return n
    return 0


def _coalesce(deltas: list[DeltaToolCall]) -> list[DeltaToolCall]:
    """One entry per call in a chunk: a call's start and its first fragment merged."""
    out: list[DeltaToolCall] = []
    for d in deltas:
        if out and out[-1].index == d.index and d.id is None:
            last = out[-1].function
            last.arguments = (last.arguments or "") + (d.function.arguments or "")
        else:
            out.append(d)
    return out


def parse_tool_calls(text: str, names: set[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """The (content, [(name, arguments JSON)]) in a model's free output. Only calls of the request's
    functions count: otherwise the whole text is content, so a plain JSON reply stays a reply."""
    calls: list[Any] = []
    content = text
    if "<tool_call>" in text:
        bodies = [m.group(1) for m in _TAGGED.finditer(text)]
        calls = [_json(b) for b in bodies]
        content = _TAGGED.sub("", text)
    else:
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if body[:1] in ("{", "["):
            decoded = _json(body)
            calls = decoded if isinstance(decoded, list) else [decoded]
            content = ""
    parsed = [_call(c, names) for c in calls]
    if not parsed or None in parsed:
        return (text or None), []
    return (content.strip() or None), parsed


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _call(value: Any, names: set[str]) -> tuple[str, str] | None:
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = _json(arguments)
    if not isinstance(arguments, dict):
        return None
    return value["name"], json.dumps(arguments, ensure_ascii=False)


def tool_calls_of(deltas: list[DeltaToolCall]) -> list[ToolCall]:
    """The whole calls a (non-streamed) reply's deltas add up to."""
    calls: list[ToolCall] = []
    for d in deltas:
        if d.id is not None:
            calls.append(ToolCall(id=d.id, function=ToolCallFunction(name=d.function.name, arguments="")))
        calls[d.index].function.arguments += d.function.arguments or ""
    return calls
