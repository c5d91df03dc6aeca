"""A request and its sequences: tokens, progress through the KV cache, and output state."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from ..sampling_params import SamplingParams

if TYPE_CHECKING:
    from .structured_output import GrammarMatcher

_arrival = itertools.count()


# each step's evidence is weighed against the steps before it with this decay, so a sequence whose
# text stops (or starts) repeating itself changes its draft length within a few steps, and one that
# stopped drafting returns to the prior and tries again
_DECAY = 0.9
# the prior: a new sequence counts as having accepted half of two drafts, enough to try drafting
_PRIOR_DRAFTED = 2.0
_PRIOR_ACCEPTED = 1.0


@dataclass
class DraftHistory:
    """A sequence's drafted and accepted tokens (speculative decoding, engine/spec_decode.py), each
    step's count decayed by ``_DECAY``."""

    drafted: float = 0.0
    accepted: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return (self.accepted + _PRIOR_ACCEPTED) / (self.drafted + _PRIOR_DRAFTED)

    def record(self, drafted: int, accepted: int) -> None:
        self.drafted = _DECAY * self.drafted + drafted
        self.accepted = _DECAY * self.accepted + accepted


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One completion. Its tokens are the prompt followed by what it generated; the first
    ``num_computed_tokens`` of them have their K/V in the blocks of ``block_table``."""

    request: Request
    index: int
    token_ids: list[int]
    generator: torch.Generator | None
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # of the computed tokens, how many came from the prefix cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hash of each full, computed block
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    text: str = ""
    prefix_offset: int = 0  # incremental detokenization window, as vLLM's
    read_offset: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # how much of the completion earlier outputs already carried (for "delta" outputs)
    sent_text: int = 0
    sent_tokens: int = 0
    # structured output: where this sequence is in its grammar (None when unconstrained); it advances
    # with the generated tokens only, which preemption keeps, so it stays valid across a recompute
    matcher: GrammarMatcher | None = None
    # speculative decoding (engine/spec_decode.py): the tokens drafted for the step being scheduled,
    # verified after its last token, the draft model's distribution each was drawn from (None where
    # greedy, and for n-gram drafts), and how well this sequence's drafts have done
    spec_token_ids: list[int] = field(default_factory=list)
    spec_draft_probs: list[torch.Tensor | None] = field(default_factory=list)
    draft_history: DraftHistory = field(default_factory=DraftHistory)

    def __post_init__(self) -> None:
        self.prefix_offset = max(0, self.num_prompt_tokens - 5)
        self.read_offset = self.num_prompt_tokens

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def priority(self) -> int:
        return self.request.priority

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        # only the first sequence of a request computes them; n > 1 siblings share the prompt
        return self.params.prompt_logprobs is not None and self.index == 0

    def visible_text(self) -> str:
        """The text a client may see now. While running, the last ``len(longest stop) - 1``
        characters are held back: they could be the start of a stop string that is cut later, and
        streamed text must never be taken back."""
        if self.finish_reason is not None or not self.params.stop:
            return self.text
        hold = max(len(s) for s in self.params.stop) - 1
        return self.text[: max(self.sent_text, len(self.text) - hold)]

    def completion(self, delta: bool) -> CompletionOutput:
        text, tokens = self.visible_text(), self.output_token_ids
        logprobs = self.logprobs if self.params.logprobs is not None else None
        start_text, start_tokens = (self.sent_text, self.sent_tokens) if delta else (0, 0)
        self.sent_text, self.sent_tokens = len(text), len(tokens)
        return CompletionOutput(
            index=self.index,
            text=text[start_text:],
            token_ids=tokens[start_tokens:],
            cumulative_logprob=self.cumulative_logprob if logprobs is not None else None,
            logprobs=logprobs[start_tokens:] if logprobs is not None else None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    arrival: int = field(default_factory=lambda: next(_arrival))
    seqs: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[dict[int, Logprob] | None] = field(default_factory=list)
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=time.monotonic()))
    sent_prompt_logprobs: bool = False

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def output(self) -> RequestOutput:
        """The request's output now; with ``output_kind="delta"`` only what is new since the last call
        (prompt logprobs travel once, in the first output after they are complete)."""
        delta = self.params.output_kind == "delta"
        prompt_logprobs = None
        if self.params.prompt_logprobs is not None:
            complete = len(self.prompt_logprobs) == len(self.prompt_token_ids)
            if not delta or (complete and not self.sent_prompt_logprobs):
                prompt_logprobs = list(self.prompt_logprobs)
                self.sent_prompt_logprobs = complete
        self.metrics.num_generated_tokens = sum(s.num_output_tokens for s in self.seqs)
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=list(self.prompt_token_ids),
            prompt_logprobs=prompt_logprobs,
            outputs=[s.completion(delta) for s in self.seqs],
            finished=self.finished,
            num_cached_tokens=self.seqs[0].num_cached_tokens if self.seqs else 0,
            metrics=self.metrics,
        )
