"""The offline API, a drop-in for vLLM's ``LLM``: batch generation and chat over the engine."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from ..config import EngineConfig
from ..engine.llm_engine import EngineStats, LLMEngine, PromptType
from ..errors import FlashDecodeError, InvalidPromptError
from ..models.tokenizer import Tokenizer
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams

Conversation = list[dict[str, Any]]


class LLM:
    def __init__(
        self,
        model: str | None = None,
        dtype: str = "auto",
        max_model_len: int | None = None,
        seed: int = 0,
        **engine_options: Any,
    ):
        """``engine_options`` are the other ``EngineConfig`` fields (kv_block_size, kv_cache_bytes,
        max_num_seqs, max_num_batched_tokens, enable_prefix_caching, num_threads, softmax, dataflow,
        quantization, device: "cpu" or "cuda", the Triton kernels; speculative: e.g. {"method": "ngram",
        "num_speculative_tokens": 4}, see config.SpeculativeConfig; tensor_parallel_size: ranks the model
        is split over, engine/parallel/; pipeline_parallel_size: stages its layers are split into)."""
        known = set(EngineConfig.__dataclass_fields__)
        unknown = sorted(set(engine_options) - known)
        if unknown:
            raise FlashDecodeError(f"unknown LLM option(s) {unknown}; known: {sorted(known - {'model'})}")
        config = EngineConfig(
            model=model, dtype=dtype, max_model_len=max_model_len, seed=seed, **engine_options
        )
        self.engine = LLMEngine(config)
        self._ids = itertools.count()

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def stats(self) -> EngineStats:
        """The engine's counters: KV blocks, prefix cache, tokens, speculative decoding's drafts."""
        return self.engine.stats()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; ``priority`` (one per prompt, lower runs first) as vLLM's."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise InvalidPromptError("no prompts given")
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise FlashDecodeError(f"{len(params)} sampling_params for {len(prompts)} prompts")

        priorities = [0] * len(prompts) if priority is None else list(priority)
        if len(priorities) != len(prompts):
            raise FlashDecodeError(f"{len(priorities)} priorities for {len(prompts)} prompts")
        # validate everything first: a bad prompt fails the call before any work is queued
        requests = [
            self.engine.make_request(str(next(self._ids)), prompt, p, prio)
            for prompt, p, prio in zip(prompts, params, priorities)
        ]
        for request in requests:
            self.engine.enqueue(request)
        return self._run([r.request_id for r in requests], use_tqdm)

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.get_tokenizer()
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {})
            )
            # the template already holds BOS where the model wants it
            prompts.append(
                {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}
            )
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(request_ids)
        final: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            bar = tqdm(total=len(request_ids), desc="Processed prompts")
        try:
            while pending:
                for out in self.engine.step():
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        final[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for request_id in pending:
                self.engine.abort(request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [final[r] for r in request_ids]
