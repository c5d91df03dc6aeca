"""Kernels over raw tensors and data pointers: the C flat GEMM (``cpu/``), the Triton kernels
(``triton/``), and the plain-torch references the fast paths are tested against (``reference``).
The one table of weight formats (``formats``) lives here, at the bottom, because the kernels' ABI
is keyed by it."""
