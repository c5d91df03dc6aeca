"""Per-request sampling parameters, field for field (names, order of the common ones, defaults) as vLLM's
``SamplingParams``, so code written against vLLM's offline API runs unchanged."""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from typing import Any

from flashdecode.errors import InvalidSamplingParamsError

# Temperatures below this are greedy: dividing logits by them would overflow, and vLLM uses the same cut.
_SAMPLING_EPS = 1e-5

# The OpenAI API (and vLLM's default max_logprobs) caps logprobs at 20; larger values cost a top-k over
# the vocabulary per step for no use anyone has asked for.
MAX_LOGPROBS = 20
OUTPUT_KINDS = ("cumulative", "delta", "final_only")
# structured_output holds exactly one of these keys: a JSON schema (a dict, or its JSON text), any JSON
# object (True), a regular expression the whole output must match, or a list of strings to pick one of.
STRUCTURED_OUTPUT_KINDS = ("json", "json_object", "regex", "choice")


def _is_int(value: object) -> bool:
    # bool is an int subclass, but n=True or top_k=False is a bug in the caller, not a number.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _fail(name: str, requirement: str, value: object) -> InvalidSamplingParamsError:
    return InvalidSamplingParamsError(f"{name} must be {requirement}, got {value!r}")


@dataclass
class SamplingParams:
    """How to sample the completion(s) of one prompt.

    ``top_k`` 0 or -1 disables top-k; ``max_tokens=None`` generates up to the model's context length.
    ``stop`` and ``stop_token_ids`` are normalised to lists (``None`` becomes ``[]``) as vLLM does.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # what each streamed output holds, as vLLM's RequestOutputKind: everything so far ("cumulative"),
    # only what is new since the previous output ("delta"), or a single output when done ("final_only")
    output_kind: str = "cumulative"
    # constrained decoding: the output always matches this (see STRUCTURED_OUTPUT_KINDS), e.g.
    # {"json": {"type": "object", ...}}; the engine masks every token the grammar does not allow
    structured_output: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise _fail("n", "an integer >= 1", self.n)
        self.n = int(self.n)

        self.presence_penalty = self._real("presence_penalty", "a number in [-2, 2]", lambda v: -2 <= v <= 2)
        self.frequency_penalty = self._real(
            "frequency_penalty", "a number in [-2, 2]", lambda v: -2 <= v <= 2
        )
        self.repetition_penalty = self._real("repetition_penalty", "a number > 0", lambda v: v > 0)
        self.temperature = self._real("temperature", "a number >= 0", lambda v: v >= 0)
        self.top_p = self._real("top_p", "a number in (0, 1]", lambda v: 0 < v <= 1)
        self.min_p = self._real("min_p", "a number in [0, 1]", lambda v: 0 <= v <= 1)

        if not _is_int(self.top_k) or self.top_k < -1:
            raise _fail("top_k", "an integer: 0 or -1 (disabled) or >= 1", self.top_k)
        self.top_k = int(self.top_k)

        if self.seed is not None:
            if not _is_int(self.seed):
                raise _fail("seed", "None or an integer", self.seed)
            self.seed = int(self.seed)

        self.stop = self._stop_strings(self.stop)
        self.stop_token_ids = self._stop_token_ids(self.stop_token_ids)

        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(name, "a bool", getattr(self, name))

        if self.max_tokens is not None:
            if not _is_int(self.max_tokens) or self.max_tokens < 1:
                raise _fail("max_tokens", "None or an integer >= 1", self.max_tokens)
            self.max_tokens = int(self.max_tokens)
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise _fail("min_tokens", "an integer >= 0", self.min_tokens)
        self.min_tokens = int(self.min_tokens)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidSamplingParamsError(
                f"min_tokens must be <= max_tokens, got min_tokens={self.min_tokens!r} "
                f"and max_tokens={self.max_tokens!r}"
            )

        if self.output_kind not in OUTPUT_KINDS:
            raise _fail("output_kind", f"one of {OUTPUT_KINDS}", self.output_kind)

        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                if not _is_int(value) or not 0 <= value <= MAX_LOGPROBS:
                    raise _fail(name, f"None or an integer in [0, {MAX_LOGPROBS}]", value)
                setattr(self, name, int(value))

        # the grammar the engine's matchers run (llguidance's serialised form), compiled here so that a
        # bad schema fails when the request is made, not inside the engine loop
        self._grammar: str | None = None
        if self.structured_output is not None:
            self._grammar = _compile_grammar(self.structured_output)

    @property
    def grammar(self) -> str | None:
        """The compiled grammar of ``structured_output`` (None when the output is unconstrained)."""
        return self._grammar

    def _real(self, name: str, requirement: str, ok) -> float:
        value = getattr(self, name)
        # NaN fails every comparison and inf would turn logits into NaN, so both are rejected outright.
        if not _is_real(value) or not math.isfinite(value) or not ok(value):
            raise _fail(name, f"{requirement} (finite)", value)
        return float(value)

    @staticmethod
    def _stop_strings(stop: object) -> list[str]:
        if stop is None:
            return []
        items = [stop] if isinstance(stop, str) else stop
        if not isinstance(items, (list, tuple)):
            raise _fail("stop", "None, a string or a list of strings", stop)
        for s in items:
            # An empty stop string would match at every position and end generation immediately.
            if not isinstance(s, str) or not s:
                raise _fail("stop", "None, a string or a list of non-empty strings", stop)
        return list(items)

    @staticmethod
    def _stop_token_ids(ids: object) -> list[int]:
        if ids is None:
            return []
        if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple)):
            raise _fail("stop_token_ids", "None or a list of integers", ids)
        for t in ids:
            if not _is_int(t) or t < 0:
                raise _fail("stop_token_ids", "None or a list of non-negative integers", ids)
        return [int(t) for t in ids]

    @property
    def greedy(self) -> bool:
        """Whether this request takes the argmax instead of sampling (temperature ~ 0)."""
        return self.temperature < _SAMPLING_EPS


def _compile_grammar(spec: object) -> str:
    """``structured_output`` as an llguidance grammar; InvalidSamplingParamsError when it is malformed or
    does not compile (the tokenizer-free check: unknown types, bad regexes, unsupported keywords)."""
    requirement = f"a dict with exactly one of the keys {STRUCTURED_OUTPUT_KINDS}"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in STRUCTURED_OUTPUT_KINDS:
        raise _fail("structured_output", requirement, spec)
    ((kind, value),) = spec.items()
    try:
        from llguidance import LLMatcher
    except ImportError as exc:  # pragma: no cover - llguidance is a dependency
        raise InvalidSamplingParamsError("structured_output needs the llguidance package") from exc

    # compact JSON: flexible whitespace lets a sampled model pad the output with blank lines forever
    options = {"whitespace_flexible": False}
    try:
        if kind == "json":
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict):
                raise _fail("structured_output", "{'json': a JSON schema object}", spec)
            grammar = LLMatcher.grammar_from_json_schema(value, defaults=options)
        elif kind == "json_object":
            if value is not True:
                raise _fail("structured_output", "{'json_object': True}", spec)
            grammar = LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=options)
        elif kind == "regex":
            if not isinstance(value, str) or not value:
                raise _fail("structured_output", "{'regex': a non-empty string}", spec)
            grammar = LLMatcher.grammar_from_regex(value)
        else:
            if (
                not isinstance(value, (list, tuple))
                or not value
                or not all(isinstance(c, str) and c for c in value)
            ):
                raise _fail("structured_output", "{'choice': a non-empty list of non-empty strings}", spec)
            # each choice is a quoted Lark literal: json.dumps escapes quotes and backslashes
            grammar = LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
    except InvalidSamplingParamsError:
        raise
    except Exception as exc:  # llguidance raises ValueError/TypeError/RuntimeError on some bad inputs
        raise InvalidSamplingParamsError(f"structured_output {kind} does not compile: {exc}") from exc
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidSamplingParamsError(f"structured_output {kind} does not compile: {error.strip()}")
    return grammar
