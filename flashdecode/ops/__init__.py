"""Numerical kernels: attention (FlashDecoding++ §3), linear layers (§4-5), RoPE and norms."""
