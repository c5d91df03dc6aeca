"""The one decoder-only transformer, parameterised by a ``ModelSpec``.

Pre-norm blocks: RMSNorm -> attention (fused QKV projection, optional q/k biases and per-head q/k
RMSNorm, RoPE, paged KV cache) -> residual -> RMSNorm -> SwiGLU MLP (fused gate/up) -> residual.
Gemma's differences are data on the spec: an RMSNorm after attention and after the MLP, GeGLU, the
embeddings scaled by sqrt(hidden), its attention scale, soft-capped attention scores and logits, and
sliding-window layers with their own RoPE base. An MoE family's sparse layers route each token to
its top-k experts (models/moe.py, layers/moe.py) in place of the dense MLP. OPT's (models/opt.py):
LayerNorm with biases, learned positions in place of RoPE, a plain ReLU MLP, biases on every
projection, norms after the residual adds where configured, and embeddings projected in and out of
the hidden size. All of a step's tokens, from every sequence, run flattened through the projections
as one matrix, so a decode batch of B sequences is one [B, hidden] GEMM per projection.

Under tensor parallelism (models/tensor_parallel.py) each rank's decoder holds its shard and runs on
its shard's spec; a ``Communicator`` (layers/parallel.py) sums the partial outputs of o and of the
MLP (one all-reduce each), assembles the vocabulary-parallel embeddings, and gathers the logits.
Under pipeline parallelism (models/pipeline_parallel.py) each stage's decoder holds its layers only:
the first embeds the token ids, the others take the previous stage's hidden states, and only the last
normalizes them and holds the head (the engine moves the activations between stages).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from ..kernels import cpu
from ..layers.attention import AttentionMetadata, SoftmaxPolicy, paged_attention, soft_cap_
from ..layers.dataflow import DataflowTable, configure
from ..layers.device import CPU, Device
from ..layers.kv_cache import KVCache
from ..layers.linear import Linear, SplitLinear, fused_linear, iter_linears
from ..layers.moe import GatedMLP, SparseMoE
from ..layers.norms import rms_norm
from ..layers.parallel import Communicator, vocab_parallel_embedding
from ..layers.quant import QuantizedTensor, prepare_weights
from ..layers.rope import RotaryEmbedding, apply_rope
from . import moe
from .native_decode import NativeDecode
from .opt import POSITION_OFFSET as OPT_POSITION_OFFSET
from .spec import ModelSpec
from .tensor_parallel import vocab_range
from .weights import LoadedModel

ACTIVATIONS = {"silu": F.silu, "gelu_tanh": partial(F.gelu, approximate="tanh"), "relu": F.relu}


def _norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm, or where the norm has a bias (OPT) LayerNorm."""
    if bias is None:
        return rms_norm(x, weight, eps)
    return F.layer_norm(x, weight.shape, weight, bias, eps)


class PlainMLP:
    """down(act(up(x))) with biases: OPT's fc1 -> ReLU -> fc2."""

    def __init__(self, up: Linear, down: Linear, act: Callable[[torch.Tensor], torch.Tensor]):
        self.up = up
        self.down = down
        self.act = act

    def projections(self) -> list[Linear | SplitLinear]:
        return [self.up, self.down]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class DecoderLayer:
    def __init__(
        self,
        spec: ModelSpec,
        w: dict[str, torch.Tensor],
        index: int,
        backend: str = "native",
        comm: Communicator | None = None,
    ):
        """``comm``: tensor parallelism's collectives, where this layer holds a shard (o and the MLP
        then give partial sums, added over the ranks)."""
        self.spec = spec
        self.reduce = _identity if comm is None else comm.all_reduce
        prefix = f"layers.{index}."
        self.attn_norm = w[prefix + "attn_norm"]
        self.mlp_norm = w[prefix + "mlp_norm"]
        # OPT: LayerNorm biases, no RoPE (its positions are embeddings), norms after the residual adds
        # where norm_before is off
        self.attn_norm_bias = w.get(prefix + "attn_norm_bias")
        self.mlp_norm_bias = w.get(prefix + "mlp_norm_bias")
        self.rotary = not spec.family.opt
        # Gemma: norms of the attention and MLP outputs before their residual adds
        self.attn_post_norm = w.get(prefix + "attn_post_norm")
        self.mlp_post_norm = w.get(prefix + "mlp_post_norm")
        self.act = ACTIVATIONS[spec.hidden_act]
        self.scale = spec.head_dim**-0.5 if spec.attention_scale is None else spec.attention_scale
        self.sliding_window = spec.window_at(index)
        qkv_bias = None
        if spec.family.qkv_bias:
            qkv_bias = [w[prefix + "q_bias"], w[prefix + "k_bias"], w[prefix + "v_bias"]]
        self.qkv = fused_linear([w[prefix + "q"], w[prefix + "k"], w[prefix + "v"]], qkv_bias, backend)
        self.o = Linear(w[prefix + "o"], w.get(prefix + "o_bias"), backend=backend)
        # q and k are adjacent in the QKV output and normalise and rotate alike, so each runs as one
        # call over q's and k's heads together; the per-head norms become one [heads, head_dim] weight
        self.qk_heads = spec.num_heads + spec.num_kv_heads
        self.qk_norm = None
        if prefix + "q_norm" in w:
            self.qk_norm = torch.cat(
                [
                    w[prefix + "q_norm"].expand(spec.num_heads, spec.head_dim),
                    w[prefix + "k_norm"].expand(spec.num_kv_heads, spec.head_dim),
                ]
            )
        # the MLP: a mixture of experts in an MoE family's sparse layers (models/moe.py), else dense
        self.mlp: GatedMLP | SparseMoE | PlainMLP
        if spec.moe_at(index):
            self.mlp = moe.sparse_moe(spec, w, prefix, self.act, backend)
        elif spec.family.opt:
            up = Linear(w[prefix + "up"], w[prefix + "up_bias"], backend=backend)
            self.mlp = PlainMLP(
                up, Linear(w[prefix + "down"], w[prefix + "down_bias"], backend=backend), self.act
            )
        else:
            gate_up = fused_linear([w[prefix + "gate"], w[prefix + "up"]], backend=backend)
            self.mlp = GatedMLP(gate_up, Linear(w[prefix + "down"], backend=backend), self.act)

    def projections(self) -> list[Linear | SplitLinear]:
        return [self.qkv, self.o, *self.mlp.projections()]

    def linears(self) -> list[Linear]:
        return list(iter_linears(self.projections()))

    def __call__(
        self,
        index: int,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache,
        meta: AttentionMetadata,
        softmax: SoftmaxPolicy | None = None,
    ) -> torch.Tensor:
        """``rope``: the step's cos/sin rows (``RotaryEmbedding.tables``)."""
        s = self.spec
        t = x.shape[0]
        attn_norm = partial(_norm, weight=self.attn_norm, bias=self.attn_norm_bias, eps=s.norm_eps)
        mlp_norm = partial(_norm, weight=self.mlp_norm, bias=self.mlp_norm_bias, eps=s.norm_eps)
        qkv = self.qkv(attn_norm(x) if s.norm_before else x)
        qk = qkv[:, : -s.kv_size].view(t, self.qk_heads, s.head_dim)
        v = qkv[:, -s.kv_size :].view(t, s.num_kv_heads, s.head_dim)
        if self.qk_norm is not None:
            qk = rms_norm(qk, self.qk_norm, s.norm_eps)
        if self.rotary:
            qk = apply_rope(qk, *rope)
        q, k = qk[:, : s.num_heads], qk[:, s.num_heads :]
        cache.write(index, meta.slot_mapping, k, v)
        attn = paged_attention(
            q, cache, index, meta, self.scale, softmax, s.attn_logit_softcap, self.sliding_window
        )
        x = x + self._post(self.reduce(self.o(attn.reshape(t, s.q_size))), self.attn_post_norm)
        if not s.norm_before:  # OPT-350m: each norm follows its residual add
            x = attn_norm(x)
            return mlp_norm(x + self.reduce(self.mlp(x)))
        return x + self._post(self.reduce(self.mlp(mlp_norm(x))), self.mlp_post_norm)

    def _post(self, y: torch.Tensor, norm: torch.Tensor | None) -> torch.Tensor:
        return y if norm is None else rms_norm(y, norm, self.spec.norm_eps)


def _permute_qk(
    weights: dict[str, torch.Tensor], spec: ModelSpec, rope: RotaryEmbedding
) -> dict[str, torch.Tensor]:
    """A copy of ``weights`` with every q/k projection, bias and per-head norm in ``rope.order``."""
    out = dict(weights)
    for i in range(spec.num_layers):
        for key, heads in (("q", spec.num_heads), ("k", spec.num_kv_heads)):
            for name, n in ((key, heads), (f"{key}_bias", heads), (f"{key}_norm", 1)):
                full = f"layers.{i}.{name}"
                if full in out:
                    out[full] = rope.permute_heads(out[full], n)
    return out


class Decoder:
    def __init__(
        self,
        loaded: LoadedModel,
        dtype: torch.dtype,
        dataflow: str = "auto",
        table: DataflowTable | None = None,
        quantization: str | None = None,
        device: Device = CPU,
        max_model_len: int | None = None,
        comm: Communicator | None = None,
    ):
        """``dataflow`` and ``table``: how every projection picks its kernel per M (layers/dataflow.py);
        the engine hands down the tuned table it read, if any. ``device`` (layers/device.py): where the
        weights, norms and RoPE tables live and which kernel backend every projection runs on.
        ``max_model_len``: the longest sequence the engine runs (default: the model's context), which
        picks LongRoPE's short or long factors (layers/rope.py). ``comm``: the tensor-parallel group's
        collectives, where ``loaded`` holds one rank's shard."""
        spec = loaded.local_spec
        self.rope = RotaryEmbedding(
            spec.head_dim,
            spec.max_position,
            spec.rope_theta,
            spec.rope_scaling,
            device.torch,
            rotary_dim=spec.rotary_dim,
            context_len=max_model_len,
        )
        # Gemma 3: sliding layers rotate with their own base and no scaling
        self.rope_local = None
        if spec.rope_local_theta is not None:
            self.rope_local = RotaryEmbedding(
                spec.head_dim, spec.max_position, spec.rope_local_theta, None, device.torch
            )
        weights = loaded.weights
        if self.rope.order is not None:  # partial rotary: q/k head dims reordered once (layers/rope.py)
            weights = _permute_qk(weights, spec, self.rope)
        # float tensors cast to dtype; GGUF blocks kept (layers/quant.py) where a kernel runs them (the
        # Triton flat GEMM, or the native build unless it failed); optional int8/int4 quantization
        keep_blocks = device.backend == "triton" or cpu.load() is not None
        w = prepare_weights(weights, dtype, spec.matrices(), quantization, keep_blocks)
        if spec.family.gemma_norms:  # Gemma's 1 + w scales in fp32 (layers/norms.py)
            w |= {n: weights[n].float() for n in set(spec.tensors()) - spec.matrices()}
        if not device.on_host:
            w = {name: t.to(device.torch) for name, t in w.items()}
        self.spec = spec
        self.dtype = dtype
        self.device = device
        # a tied head's Linear holds the embedding matrix, in whichever layout its plan keeps, and
        # the lookup reads rows from it (Linear.rows): the matrix is held once
        tied = spec.tie_embeddings
        self.embed = None if tied else w.get("embed")
        # Gemma: sqrt(hidden) rounded to the activations' dtype, as transformers multiplies
        self.embed_scale = None
        if spec.family.gemma_norms:
            self.embed_scale = torch.tensor(spec.hidden_size**0.5, dtype=dtype, device=device.torch)
        self.comm = comm
        self.vocab = None if loaded.shard is None else vocab_range(loaded.spec, loaded.shard)
        self.stage = loaded.stage
        held = range(spec.num_layers) if self.stage is None else range(self.stage.start, self.stage.end)
        # the layers' KV lives at their position within the stage (the cache holds the stage's alone)
        self.layers = [DecoderLayer(spec, w, i, device.backend, comm) for i in held]
        self.first = self.stage is None or self.stage.first
        self.last = self.stage is None or self.stage.last
        self.norm = w.get("norm")  # OPT-350m (norms after the residual adds) has no final norm
        self.norm_bias = w.get("norm_bias")
        # OPT: learned positions; the embeddings' own width projected in and out of the hidden size
        self.pos_embed = w.get("pos_embed")
        self.project_in = self.project_out = None
        if "project_in" in w:
            self.project_in = Linear(w["project_in"], backend=device.backend)
            self.project_out = Linear(w["project_out"], backend=device.backend)
        # a middle stage holds no head; a first stage's tied embedding lives in one, for its rows
        self.lm_head = None
        if self.last or (tied and self.first):
            self.lm_head = Linear(w["embed"] if tied else w["lm_head"], backend=device.backend)
        self.softmax: SoftmaxPolicy | None = None  # None: exact attention (layers/attention.py)
        # every projection's kernel per M: the tuned table, the default plan, or one static kernel
        self.dataflow = configure(self.linears(), dataflow, table)
        # whole decode steps in one native call, where they can run (the native backend, on the host),
        # a tensor-parallel rank's too (the step calls back for its all-reduces); not a pipeline
        # stage's yet: the step runs every layer and the final norm
        self.native = None
        if device.backend == "native" and device.on_host and self.stage is None:
            reduce = None if comm is None else comm.all_reduce
            rope_local = self.rope_local
            self.native = NativeDecode(spec, self.layers, self.norm, self.rope, dtype, rope_local, reduce)

    def _embed_rows(self, ids: torch.Tensor) -> torch.Tensor:
        if self.embed is None:  # tied: the head's matrix
            return self.lm_head.rows(ids, self.dtype)
        if isinstance(self.embed, QuantizedTensor):
            return self.embed.rows(ids, self.dtype)
        return F.embedding(ids, self.embed)

    def linears(self) -> list[Linear | SplitLinear]:
        mods: list[Linear | SplitLinear] = [] if self.lm_head is None else [self.lm_head]
        mods += [p for p in (self.project_in, self.project_out) if p is not None]
        for layer in self.layers:
            mods += layer.projections()
        return mods

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        meta: AttentionMetadata,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm, for the step's flattened tokens; a pipeline
        stage after the first runs its layers on the previous stage's ``hidden`` instead, and a stage
        before the last returns its last layer's output."""
        if not self.first:
            return self._run_layers(hidden, positions, cache, meta)
        if self.comm is None:
            x = self._embed_rows(input_ids)
        else:
            x = vocab_parallel_embedding(input_ids, self._embed_rows, self.vocab, self.comm)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        if self.project_in is not None:
            x = self.project_in(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed[positions + OPT_POSITION_OFFSET]
        t = x.shape[0]
        step = None if self.native is None else self.native.step(t, cache, self.softmax)
        if step is not None:
            return self.native.run(step, x, positions, meta, self.softmax)
        return self._run_layers(x, positions, cache, meta)

    def _run_layers(
        self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        rope = self.rope.tables(positions)
        local = rope if self.rope_local is None else self.rope_local.tables(positions)
        for i, layer in enumerate(self.layers):
            x = layer(i, x, local if layer.sliding_window else rope, cache, meta, self.softmax)
        if not self.last:
            return x
        if self.norm is not None:
            x = _norm(x, self.norm, self.norm_bias, self.spec.norm_eps)
        return x if self.project_out is None else self.project_out(x)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, vocab] float32 (the whole vocabulary, gathered from the ranks under tensor parallelism)."""
        logits = self.lm_head(hidden).float()
        if self.comm is not None:
            logits = self.comm.all_gather(logits)
        return soft_cap_(logits, self.spec.final_logit_softcap)
