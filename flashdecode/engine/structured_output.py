"""Constrained decoding for ``SamplingParams.structured_output``, on llguidance.

``SamplingParams`` compiles the request's schema/regex/choice into a grammar (tokenizer-free); here each
sequence gets its own matcher over the model's vocabulary. Before a step samples, the matcher's
allowed-token bitmask goes into that row's :class:`~flashdecode.engine.sampler.SamplingRow` and the sampler
sets every other logit to -inf; after it, the sampled token is fed back. The matcher lives on the
sequence and advances only with its generated tokens, which preemption (recompute) keeps, so its state
stays valid across a preemption; an aborted sequence simply drops it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import llguidance
import torch

from ..errors import InvalidSamplingParamsError
from ..models.tokenizer import Tokenizer


class GrammarMatcher:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._words = (vocab_size + 31) // 32

    def allowed_mask(self) -> torch.Tensor:
        """The tokens the grammar allows next, as a bool tensor of ``vocab_size``."""
        bits = torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.int32)
        shifts = torch.arange(32, dtype=torch.int32)
        mask = ((bits[: self._words].unsqueeze(1) >> shifts) & 1).bool().flatten()
        return mask[: self._vocab_size]

    def accept(self, token: int) -> bool:
        """Advance past a sampled token; False if the grammar does not allow it (the mask did)."""
        return self._matcher.consume_token(token)

    @property
    def is_stopped(self) -> bool:
        """The grammar is complete and nothing can extend it: the sequence ends here."""
        return self._matcher.is_stopped()


class StructuredOutputs:
    """Builds matchers over one tokenizer. The llguidance tokenizer is built on the first structured
    request, so offline use without constraints never pays for it; a server builds it ahead, off its
    event loop, with :meth:`prepare`."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Iterable[int]):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()  # make_request (which builds matchers) may run on any thread

    def prepare(self) -> None:
        """Build the llguidance tokenizer now (it takes a noticeable part of a second for a large
        vocabulary), so no request waits for it."""
        self._lltokenizer()

    def _lltokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.LLTokenizer(
                    self._tokenizer.backend_json(), n_vocab=self._vocab_size, eos_token=self._eos
                )
            return self._ll_tokenizer

    def matcher(self, grammar: str) -> GrammarMatcher:
        matcher = llguidance.LLMatcher(self._lltokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise InvalidSamplingParamsError(f"structured_output does not compile: {matcher.get_error()}")
        return GrammarMatcher(matcher, self._vocab_size)
