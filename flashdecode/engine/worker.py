"""One rank's model and KV cache, built alike by the engine and by every parallel worker.

The engine (rank 0) builds one ``Worker`` beside its scheduler, tokenizer and sampler; under tensor
and pipeline parallelism every other rank builds the same from the same ``EngineConfig``
(engine/parallel/), each loading only its shard of its stage's layers. What must agree across ranks
is agreed through the group here: the number of KV blocks (the smallest any rank's memory allows)
and the numerics record (rank 0's).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..config import DEFAULT_KV_CACHE_BYTES, EngineConfig
from ..errors import FlashDecodeError
from ..kernels.formats import is_quantized
from ..layers.dataflow import DataflowTable, load_table
from ..layers.device import Device, resolve_device
from ..layers.kv_cache import KVCache
from ..models.decoder import Decoder
from ..models.loader import load_model, model_spec
from ..models.pipeline_parallel import PPStage, pipeline_stage
from ..models.spec import ModelSpec
from ..models.tensor_parallel import TPShard
from ..models.weights import LoadedModel
from ..utils.cpuinfo import physical_cores
from . import numerics
from .calibration import softmax_policy
from .model_runner import execute_model
from .parallel.groups import ParallelGroup
from .parallel.worker_loop import serve_steps


def resolve_max_model_len(config: EngineConfig, spec: ModelSpec) -> int:
    wanted = config.max_model_len
    if wanted is None:
        return spec.max_position
    if wanted > spec.max_position:
        raise FlashDecodeError(
            f"max_model_len={wanted} exceeds the model's context length {spec.max_position}"
        )
    return wanted


def max_blocks_per_seq(config: EngineConfig, spec: ModelSpec, max_model_len: int) -> int:
    """The most blocks one sequence holds at once: its full length, or, where every layer slides
    within W (the block manager releases what precedes the window), the W - 1 positions before a
    step's chunk and the chunk, over a block more for alignment (vLLM's bound for sliding-window
    layers)."""
    bs = config.kv_block_size
    full = -(-max_model_len // bs)
    window = spec.cache_sliding_window
    if window is None:
        return full
    return min(full, -(-(window - 1 + config.max_num_batched_tokens) // bs) + 1)


def build_model(
    config: EngineConfig,
    loaded: LoadedModel,
    model_arg: str | None,
    table: DataflowTable | None,
    device: Device,
    max_model_len: int,
    group: ParallelGroup | None = None,
    owned: bool = False,
) -> tuple[Decoder, numerics.Numerics]:
    """A loaded model's decoder with its softmax policy and numerics (the target's, or a draft's).
    ``owned``: the caller hands ``loaded``'s weights over (it loaded them for this decoder alone)."""
    triton = device.backend == "triton"
    tensor_parallel = group is not None and group.tensor_size > 1
    model = Decoder(
        loaded,
        config.torch_dtype(loaded.formats.get("embed", "")),
        config.dataflow,
        table,
        config.quantization,
        device,
        max_model_len=max_model_len,
        comm=group.tensor if tensor_parallel else None,
    )
    if owned:  # the decoder holds every weight it runs: the loaded dict's references would keep the
        # stored planes alive beside the repacks that the plans below may replace them with
        loaded.weights.clear()
    quantized_file = config.quantization is None and any(is_quantized(f) for f in loaded.formats.values())
    source = loaded.source or model_arg  # the file the weights came from: what a record is of
    model.softmax = softmax_policy(
        config.softmax, model_arg, loaded.spec.num_layers, "triton" if triton else "auto"
    )
    stage = loaded.stage
    if stage is not None and len(model.softmax.phi) > 1:  # one phi per layer: the stage's layers'
        model.softmax = replace(model.softmax, phi=model.softmax.phi[stage.start : stage.end])
    # int8 activations and a 16-bit KV cache where the held-out check allows (engine/numerics.py);
    # exact in a pipeline stage, which cannot run the check's whole model alone
    mode = config.numerics if stage is None else "exact"
    choice = numerics.resolve(
        mode, config.kv_cache_dtype, source, model, loaded.tokenizer, quantized_file, group
    )
    return model, choice


def kv_bytes_per_token(model: Decoder, kv_cache_dtype: str) -> int:
    s = model.spec  # this rank's heads and layers: the cache is sharded by KV heads and by stage
    return KVCache.bytes_per_token(len(model.layers), s.num_kv_heads, s.head_dim, model.dtype, kv_cache_dtype)


def kv_cache(
    model: Decoder, kv_cache_dtype: str, num_blocks: int, block_size: int, device: Device
) -> KVCache:
    s = model.spec
    return KVCache(
        len(model.layers),
        num_blocks * block_size,
        s.num_kv_heads,
        s.head_dim,
        model.dtype,
        kv_cache_dtype,
        device.torch,
    )


def _rank_part(config: EngineConfig, group: ParallelGroup | None) -> tuple[TPShard | None, PPStage | None]:
    """The tensor shard and the pipeline stage of the model this rank holds (None: the whole)."""
    if group is None:
        return None, None
    shard = TPShard(group.tensor.rank, group.tensor_size) if group.tensor_size > 1 else None
    stage = None
    if group.pipeline_size > 1:
        stage = pipeline_stage(model_spec(config.model), group.stage, group.pipeline_size)
    return shard, stage


class Worker:
    def __init__(
        self,
        config: EngineConfig,
        loaded: LoadedModel | None = None,
        table: DataflowTable | None = None,
        group: ParallelGroup | None = None,
    ):
        """``loaded``: an already loaded model (else ``config.model`` is loaded, this rank's shard of its
        stage under tensor and pipeline parallelism); ``table``: the dataflow table to follow (else,
        with ``dataflow="auto"``, this machine's from the cache directory); ``group``: the group of
        every rank, this rank's among them."""
        self.config, self.group = config, group
        # where the model runs (torch device + kernel backend), resolved once and handed down
        self.device = resolve_device(config.device)
        # ranks that share a machine share its cores
        ranks_here = 1 if group is None else group.local_size
        torch.set_num_threads(config.num_threads or max(1, physical_cores() // ranks_here))
        owned = loaded is None
        if owned:
            loaded = load_model(config.model, *_rank_part(config, group))
        self.tokenizer = loaded.tokenizer
        self.spec = loaded.spec
        self.formats = loaded.formats
        self.dtype = config.torch_dtype(loaded.formats.get("embed", ""))
        self.max_model_len = resolve_max_model_len(config, self.spec)
        # the tables offline tools wrote for this machine and model, read here and handed down (the
        # dataflow table times this CPU's kernels: the triton backend has its own default plan)
        triton = self.device.backend == "triton"
        if table is None and config.dataflow == "auto" and not triton:
            table = load_table()
        self.table = table
        self.model, self.numerics = build_model(
            config, loaded, config.model, table, self.device, self.max_model_len, group, owned
        )
        del loaded
        self.kv_cache_dtype = self.numerics.kv_cache_dtype
        self.num_blocks = 0
        self.cache: KVCache | None = None

    def allocate_cache(self, extra_bytes_per_token: int = 0) -> KVCache:
        """The KV cache, its block count agreed over the ranks. ``extra_bytes_per_token``: a draft
        model's K/V per token, held in the same blocks (speculative decoding)."""
        self.num_blocks = self._num_kv_blocks(extra_bytes_per_token)
        if self.group is not None:
            self.num_blocks = self.group.min_over_ranks(self.num_blocks)
        self.cache = kv_cache(
            self.model, self.kv_cache_dtype, self.num_blocks, self.config.kv_block_size, self.device
        )
        return self.cache

    def _num_kv_blocks(self, extra_bytes_per_token: int) -> int:
        cfg = self.config
        bs = cfg.kv_block_size
        bytes_per_block = (kv_bytes_per_token(self.model, self.kv_cache_dtype) + extra_bytes_per_token) * bs
        min_blocks = max_blocks_per_seq(cfg, self.spec, self.max_model_len)
        if cfg.kv_cache_memory_fraction is not None:
            budget = int(cfg.kv_cache_memory_fraction * self.device.available_memory())
        elif cfg.kv_cache_bytes is not None:
            budget = cfg.kv_cache_bytes
        else:
            # room for every sequence at its most blocks, within a cap that leaves the machine usable
            cap = min(DEFAULT_KV_CACHE_BYTES, self.device.available_memory() // 4)
            return max(min_blocks, min(cfg.max_num_seqs * min_blocks, cap // bytes_per_block))
        blocks = budget // bytes_per_block
        if blocks < min_blocks:
            raise FlashDecodeError(
                f"the KV-cache budget of {budget} bytes holds {blocks * bs} tokens, fewer than one "
                f"sequence may hold ({min_blocks * bs} at max_model_len={self.max_model_len}); give at "
                f"least {min_blocks * bytes_per_block} bytes"
            )
        return blocks


def run_worker(config: EngineConfig, group: ParallelGroup) -> None:
    """A rank other than 0: its ``Worker`` built as rank 0 builds its own, then
    every step rank 0 broadcasts run on it until the shutdown."""
    worker = Worker(config, group=group)
    worker.allocate_cache()
    serve_steps(group, lambda step: execute_model(worker.model, worker.cache, step, group))
