"""The engine: requests in, one batched model step at a time, incremental outputs back."""

from __future__ import annotations

import atexit
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..config import EngineConfig
from ..errors import FlashDecodeError, InvalidPromptError, PromptTooLongError
from ..layers.dataflow import DataflowTable
from ..layers.linear import iter_linears
from ..models.decoder import Decoder
from ..models.loader import load_model, resolve_model_path
from ..models.weights import LoadedModel
from ..outputs import Logprob, RequestOutput
from ..sampling_params import SamplingParams
from ..utils.cpuinfo import release_freed_memory
from .block_manager import BlockManager
from .detokenizer import append_new_text, find_stop_string
from .model_runner import ModelRunner
from .parallel import launch
from .sampler import Sampler, SamplingRow, prompt_logprobs
from .scheduler import ScheduledBatch, Scheduler
from .sequence import Request, Sequence
from .spec_decode import (
    DraftModelProposer,
    NgramProposer,
    StepCostMeter,
    linear_step_costs,
    tuned_step_costs,
    weight_bytes_ratio,
)
from .structured_output import StructuredOutputs
from .worker import Worker, build_model, kv_bytes_per_token, kv_cache, run_worker

logger = logging.getLogger(__name__)

PromptType = str | dict[str, Any] | list[int]


@dataclass
class StepRecord:
    """What one step ran: the sequences that decoded and the prefill chunks (request id, tokens)."""

    decodes: list[str]
    prefills: list[tuple[str, int]]

    @classmethod
    def of(cls, batch: ScheduledBatch) -> StepRecord:
        return cls(
            decodes=[s.request.request_id for s in batch.decodes],
            prefills=[(s.request.request_id, n) for s, n in batch.prefills],
        )


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_free: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int
    # unified-max softmax (layers/attention.py): attention rows checked against the safe window, and the
    # rows that left it and were recomputed with the exact softmax
    attention_rows_checked: int = 0
    attention_fallbacks: int = 0
    # speculative decoding (engine/spec_decode.py): verification steps of sequences that drafted, the
    # tokens they drafted, and the drafts accepted (as vLLM's num_drafts / num_draft_tokens / ...)
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0

    @property
    def spec_acceptance_rate(self) -> float:
        """Accepted drafts per drafted token (0 before any draft)."""
        return (
            self.spec_num_accepted_tokens / self.spec_num_draft_tokens if self.spec_num_draft_tokens else 0.0
        )

    @property
    def spec_mean_accepted_length(self) -> float:
        """Tokens a drafting sequence emitted per verification step: its accepted drafts plus the
        target's own token (1 before any draft)."""
        return 1.0 + self.spec_num_accepted_tokens / self.spec_num_drafts if self.spec_num_drafts else 1.0


class LLMEngine:
    def __init__(
        self, config: EngineConfig, loaded: LoadedModel | None = None, table: DataflowTable | None = None
    ):
        """``loaded``: an already loaded model (else ``config.model`` is loaded); ``table``: the dataflow
        table to follow (else, with ``dataflow="auto"``, this machine's from the cache directory)."""
        self.config = config
        # tensor and pipeline parallelism: the other ranks (spawned here, or launched by torchrun) run
        # the model on the step inputs this rank broadcasts; a torchrun rank > 0 never returns from
        # start()
        spec_config = config.speculative
        draft_model = spec_config is not None and spec_config.method == "draft"
        if config.world_size > 1 and draft_model:
            raise FlashDecodeError(
                "speculative decoding with a draft model does not run under tensor or pipeline "
                "parallelism yet"
            )
        self.ranks = None
        if config.world_size > 1:
            if loaded is not None:
                raise FlashDecodeError(
                    "tensor and pipeline parallelism load the model on every rank: give config.model"
                )
            self.ranks = launch.start(config, run_worker)
            atexit.register(self.ranks.shutdown)  # workers end with this process, shut down or not
        group = None if self.ranks is None else self.ranks.group
        try:
            worker = Worker(config, loaded, table, group)
        except BaseException:
            self.shutdown()
            raise
        del loaded
        self.device = worker.device
        self.tokenizer = worker.tokenizer
        self.spec = worker.spec
        self.formats = worker.formats
        self.dtype = worker.dtype
        self.max_model_len = worker.max_model_len
        self.model = worker.model
        self.numerics = worker.numerics
        self.kv_cache_dtype = worker.kv_cache_dtype
        table = worker.table
        # a draft model (speculative decoding) and what its K/V takes per token
        draft: Decoder | None = None
        draft_kv_dtype, draft_bytes = "auto", 0
        if draft_model:
            path = spec_config.model
            if resolve_model_path(path).resolve() == resolve_model_path(config.model).resolve():
                # the target drafting for itself (a check of the machinery): one copy of the weights
                draft, draft_numerics = self.model, self.numerics
            else:
                draft, draft_numerics = build_model(
                    config, self._load_draft(path), path, table, self.device, self.max_model_len, owned=True
                )
            draft_kv_dtype = draft_numerics.kv_cache_dtype
            draft_bytes = kv_bytes_per_token(draft, draft_kv_dtype)
        release_freed_memory()  # the load's temporaries are freed; their pages need not stay resident
        try:
            self.cache = worker.allocate_cache(draft_bytes)
        except BaseException:
            self.shutdown()
            raise
        bs = config.kv_block_size
        num_blocks = worker.num_blocks
        self.block_manager = BlockManager(
            num_blocks, bs, config.enable_prefix_caching, self.spec.cache_sliding_window
        )
        self.sampler = Sampler()
        self.runner = ModelRunner(self.model, self.cache, bs, self.device.torch, group)
        proposer = None
        # the engine's decode steps timed by their rows, which the adaptive draft length prices
        # drafts by once it has seen enough of them (engine/spec_decode.py)
        self.step_meter: StepCostMeter | None = None
        if spec_config is not None:
            k = spec_config.num_speculative_tokens
            costs = None if table is None else tuned_step_costs(iter_linears(self.model.linears()), table, k)
            self.step_meter = StepCostMeter()
            if draft is None:
                proposer = NgramProposer(spec_config, self.max_model_len, costs, self.step_meter)
            else:
                ratio = weight_bytes_ratio(iter_linears(draft.linears()), iter_linears(self.model.linears()))
                # the draft's cache has the target's blocks, from the same block manager, as vLLM's
                # draft layers share the target's KV cache groups: one block table per sequence
                # addresses both, so allocation, the prefix cache, preemption, abort and a rejected
                # draft's rollback need no bookkeeping of their own, and one budget (above) sizes both
                draft_cache = kv_cache(draft, draft_kv_dtype, num_blocks, bs, self.device)
                proposer = DraftModelProposer(
                    spec_config,
                    self.max_model_len,
                    costs or linear_step_costs(k, spec_config.draft_row_cost),
                    ratio,
                    ModelRunner(draft, draft_cache, bs, self.device.torch),
                    self.sampler,
                    self._sampling_row,
                    self.model.lm_head.shape[0],
                    self.step_meter,
                )
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, config.max_num_batched_tokens, proposer
        )
        self.requests: dict[str, Request] = {}
        self._rng = random.Random(config.seed)
        self.eos_token_ids = frozenset(self.spec.eos_token_ids) | self.tokenizer.stop_token_ids
        self.structured_outputs = StructuredOutputs(self.tokenizer, self.spec.vocab_size, self.eos_token_ids)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.spec_num_drafts = self.spec_num_draft_tokens = self.spec_num_accepted_tokens = 0
        self.step_log: list[StepRecord] | None = None  # set to [] to record every step (tests, tracing)

    # --- set-up -------------------------------------------------------------------------------

    def _load_draft(self, path: str) -> LoadedModel:
        """The draft model of speculative decoding, refused where it cannot draft for this target."""
        draft = load_model(path)
        if draft.tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise FlashDecodeError(
                f"speculative draft model {path}: its vocabulary ({draft.tokenizer.vocab_size} tokens) "
                f"differs from the target's ({self.tokenizer.vocab_size}); a draft must share the "
                "target's tokenizer"
            )
        if draft.spec.max_position < self.max_model_len:
            raise FlashDecodeError(
                f"speculative draft model {path}: its context length {draft.spec.max_position} is "
                f"shorter than max_model_len={self.max_model_len}"
            )
        window, draft_window = self.spec.cache_sliding_window, draft.spec.cache_sliding_window
        if window is not None and (draft_window is None or draft_window > window):
            # the target's blocks before its window are released, and the draft would read them
            raise FlashDecodeError(
                f"speculative draft model {path}: the target slides within {window} tokens and "
                "releases the blocks behind them; the draft must slide within as few"
            )
        return draft

    # --- requests -----------------------------------------------------------------------------

    def _prompt_ids(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            text = prompt.get("prompt")
        elif isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
            return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        elif isinstance(prompt, list):
            ids, text = prompt, None
        else:
            raise InvalidPromptError(
                f"unsupported prompt of type {type(prompt).__name__}: expected a string, "
                "{'prompt': str} or {'prompt_token_ids': [int, ...]}"
            )
        vocab = self.spec.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise InvalidPromptError(f"prompt_token_ids must be integers in [0, {vocab})")
        return text, list(ids)

    def make_request(
        self, request_id: str, prompt: PromptType, params: SamplingParams | None = None, priority: int = 0
    ) -> Request:
        """Validate and tokenize a request without touching the scheduler (safe from any thread)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise FlashDecodeError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise FlashDecodeError(f"priority must be an integer, got {priority!r}")
        text, ids = self._prompt_ids(prompt)
        if not ids:
            raise InvalidPromptError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"prompt has {len(ids)} tokens but max_model_len is {self.max_model_len} "
                "(the prompt and at least one generated token must fit)"
            )
        request = Request(request_id, text, ids, params, priority)
        request.prompt_logprobs.append(None)  # the first prompt token has no context to score it
        for index in range(params.n):
            seed = params.seed + index if params.seed is not None else self._rng.getrandbits(63)
            generator = torch.Generator().manual_seed(seed)
            # one matcher per sequence: n > 1 siblings walk the grammar independently
            matcher = self.structured_outputs.matcher(params.grammar) if params.grammar is not None else None
            request.seqs.append(
                Sequence(
                    request=request, index=index, token_ids=list(ids), generator=generator, matcher=matcher
                )
            )
        return request

    def enqueue(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise FlashDecodeError(f"request id {request.request_id!r} is already in use")
        for seq in request.seqs:
            self.scheduler.add(seq)
        self.requests[request.request_id] = request
        self.prompt_tokens += len(request.prompt_token_ids)

    def add_request(
        self, request_id: str, prompt: PromptType, params: SamplingParams | None = None, priority: int = 0
    ) -> Request:
        request = self.make_request(request_id, prompt, params, priority)
        self.enqueue(request)
        return request

    def abort(self, request_id: str) -> None:
        """Stop a request now; its KV blocks return to the pool before this returns."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)

    def shutdown(self) -> None:
        """End the tensor-parallel workers and leave their group (nothing to do without them; safe to
        call twice). The engine runs no step afterwards."""
        if self.ranks is not None:
            ranks, self.ranks = self.ranks, None
            atexit.unregister(ranks.shutdown)
            ranks.shutdown()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_total=bm.num_blocks,
            kv_blocks_free=bm.num_free_blocks,
            prefix_cache_queries=bm.prefix_queries,
            prefix_cache_hits=bm.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            attention_rows_checked=self.model.softmax.rows_checked,
            attention_fallbacks=self.model.softmax.fallbacks,
            spec_num_drafts=self.spec_num_drafts,
            spec_num_draft_tokens=self.spec_num_draft_tokens,
            spec_num_accepted_tokens=self.spec_num_accepted_tokens,
        )

    # --- the step -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one batched model step; return the output of every request it advanced (per each
        request's ``output_kind``: cumulative, delta, or only once finished)."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        now = time.monotonic()
        if self.step_log is not None:
            self.step_log.append(StepRecord.of(batch))
        step_start, num_rows = time.perf_counter(), batch.num_tokens
        result = self.runner.run(batch)
        touched: dict[str, Request] = {}
        for seq in batch.decodes:
            seq.num_computed_tokens += 1
        for seq, n in batch.prefills:
            seq.num_computed_tokens += n
        for seq in [*batch.decodes, *(s for s, _ in batch.prefills)]:
            self.block_manager.register_computed_blocks(seq)
            touched[seq.request.request_id] = seq.request
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.metrics.first_scheduled_time = now

        for seq, first, logits in result.prompt_logits:
            request = seq.request
            targets = request.prompt_token_ids[first + 1 : first + 1 + logits.shape[0]]
            entries = prompt_logprobs(logits, targets, request.params.prompt_logprobs)
            request.prompt_logprobs.extend(self._decode_logprobs(entries))

        if result.sample_seqs:
            rows = [row for seq in result.sample_seqs for row in self._sampling_rows(seq)]
            sampled = self.sampler(result.logits, rows)
            now = time.monotonic()
            start = 0
            for seq in result.sample_seqs:
                end = start + 1 + len(seq.spec_token_ids)
                self._accept(seq, sampled.token_ids[start:end], sampled.logprobs[start:end])
                start = end
                metrics = seq.request.metrics
                metrics.first_token_time = metrics.first_token_time or now
                if seq.request.finished:
                    metrics.finished_time = now
        if self.step_meter is not None and not batch.prefills:
            # a decode step's model pass and sampling: what a drafted row adds to
            self.step_meter.record(num_rows, time.perf_counter() - step_start)

        outputs = []
        for request in touched.values():
            if request.finished:
                self.requests.pop(request.request_id, None)
            elif request.params.output_kind == "final_only":
                continue
            outputs.append(request.output())
        return outputs

    def _sampling_rows(self, seq: Sequence) -> list[SamplingRow]:
        """One row per position the step verifies: after its last token, then after each draft, with
        the penalty and min_tokens state as it would be once the drafts before it are accepted."""
        drafts = seq.spec_token_ids
        if not drafts:
            return [self._sampling_row(seq, seq.output_token_ids)]
        output = seq.output_token_ids
        probs = seq.spec_draft_probs or [None] * len(drafts)
        return [
            self._sampling_row(seq, output + drafts[:j], draft, q)
            for j, (draft, q) in enumerate([*zip(drafts, probs), (None, None)])
        ]

    def _sampling_row(
        self,
        seq: Sequence,
        output_token_ids: list[int],
        draft: int | None = None,
        draft_probs: torch.Tensor | None = None,
    ) -> SamplingRow:
        params = seq.params
        suppressed: Iterable[int] = ()
        if len(output_token_ids) < params.min_tokens:
            suppressed = set(params.stop_token_ids or ()) | (
                set() if params.ignore_eos else self.eos_token_ids
            )
        return SamplingRow(
            params,
            seq.generator,
            seq.request.prompt_token_ids,
            output_token_ids,
            tuple(suppressed),
            seq.matcher.allowed_mask() if seq.matcher is not None else None,
            draft,
            draft_probs,
        )

    def _accept(self, seq: Sequence, tokens: list[int], logprobs: list[dict[int, Logprob] | None]) -> None:
        """Append what the step decided for ``seq``: the drafts up to the first one its row did not
        take, then that row's own token (after all drafts: the bonus token). Tokens go in one at a
        time, so a stop or length limit inside the accepted run ends it where plain decoding would."""
        drafts = seq.spec_token_ids
        accepted = 0
        while accepted < len(drafts) and tokens[accepted] == drafts[accepted]:
            accepted += 1
        for token, lp in zip(tokens[: accepted + 1], logprobs):
            self._append_token(seq, token, lp)
            if seq.is_finished:
                break
        seq.spec_token_ids, seq.spec_draft_probs = [], []
        if self.config.speculative is None:
            return
        seq.draft_history.record(len(drafts), accepted)
        if not drafts:
            return
        self.spec_num_drafts += 1
        self.spec_num_draft_tokens += len(drafts)
        self.spec_num_accepted_tokens += accepted
        if not seq.is_finished:
            # the rows of rejected drafts computed K/V for tokens the sequence does not hold: its
            # length rolls back to the accepted ones, and blocks taken only for the rest are freed
            seq.num_computed_tokens = seq.num_tokens - 1
            self.block_manager.free_trailing_blocks(seq, seq.num_tokens)
            self.block_manager.register_computed_blocks(seq)

    def _decode_logprobs(self, entries: list[dict[int, Logprob]]) -> list[dict[int, Logprob]]:
        for entry in entries:
            for token_id, lp in entry.items():
                lp.decoded_token = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return entries

    def _append_token(self, seq: Sequence, token: int, logprobs: dict[int, Logprob] | None) -> None:
        seq.token_ids.append(token)
        self.generation_tokens += 1
        params = seq.params
        if logprobs is not None:
            seq.logprobs.extend(self._decode_logprobs([logprobs]))
            seq.cumulative_logprob += logprobs[token].logprob
        if seq.matcher is not None and not seq.matcher.accept(token):
            # cannot happen while the sampler applies the mask; never let it emit invalid output
            logger.error("request %s: the grammar rejected token %d", seq.request.request_id, token)
            seq.finish_reason = "abort"
            self.scheduler.finish(seq)
            return

        may_stop = seq.num_output_tokens >= params.min_tokens
        if may_stop and not params.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason = "stop"
        elif may_stop and params.stop_token_ids and token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        else:
            new_text = append_new_text(self.tokenizer, seq)
            stop = find_stop_string(seq, len(new_text)) if may_stop else None
            if stop is not None:
                seq.finish_reason, seq.stop_reason = "stop", stop
            elif seq.matcher is not None and seq.matcher.is_stopped:
                seq.finish_reason = "stop"  # the grammar is complete and nothing can extend it
            elif params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
                seq.finish_reason = "length"
            elif seq.num_tokens >= self.max_model_len:
                seq.finish_reason = "length"
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)
