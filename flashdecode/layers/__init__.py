"""The model's building blocks over torch tensors: linear (its candidate kernels) and the dataflow
that picks among them per M (FlashDecoding++ sections 4-5), attention with the unified-max softmax
(section 3), the KV cache, RoPE, norms and the quantized weight formats."""
