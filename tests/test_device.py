"""``device="cuda"``: the engine on the Triton kernels (layers/device.py), against ``device="cpu"``.

Without a GPU the Triton path runs on host memory under the interpreter: TRITON_INTERPRET=1 must be
set before triton is first imported, so this module sets it at import time (as the other Triton
tests do), before it imports flashdecode's kernels. With a GPU and the variable unset, the same tests
run on CUDA.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("triton was imported without the interpreter and there is no GPU", allow_module_level=True)

from model_factory import random_k_blocks  # noqa: E402

from flashdecode import LLM, SamplingParams  # noqa: E402
from flashdecode.cli import main  # noqa: E402
from flashdecode.config import EngineConfig  # noqa: E402
from flashdecode.errors import FlashDecodeError  # noqa: E402
from flashdecode.layers.dataflow import default_plan, static_candidate  # noqa: E402
from flashdecode.layers.device import CPU, resolve_device  # noqa: E402
from flashdecode.layers.linear import CANDIDATES, Linear  # noqa: E402
from flashdecode.layers.quant import QuantizedTensor, quantize  # noqa: E402

DEVICE = resolve_device("cuda")
TORCH_CANDIDATES = {"torch_f32", "torch_bf16", "torch_bf16_cast"}  # F.linear: any device


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest.py


# --- (1) the option and its resolution -----------------------------------------------------------


def test_device_option_is_validated_and_resolved() -> None:
    assert EngineConfig().device == "cpu" and EngineConfig(device="cuda").device == "cuda"
    with pytest.raises(FlashDecodeError, match="device='tpu'"):
        EngineConfig(device="tpu")
    with pytest.raises(FlashDecodeError):
        resolve_device("gpu")
    assert resolve_device("cpu") is CPU and CPU.backend == "native" and CPU.on_host
    assert DEVICE.backend == "triton"
    assert DEVICE.torch.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_cuda_without_a_gpu_or_the_interpreter_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FlashDecodeError, match="device='cuda' but no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(FlashDecodeError, match="no CUDA device"):
        LLM(device="cuda")  # resolved before the model is loaded
    # the command line: one line on stderr, exit code 2
    assert main(["generate", "hi", "--device", "cuda", "--max-tokens", "1"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


# --- (2) the Linear candidates on the triton backend ----------------------------------------------


def _weight(fmt: str, n: int, k: int, seed: int) -> torch.Tensor | QuantizedTensor:
    if fmt in ("Q4_K", "Q6_K"):
        return QuantizedTensor.from_gguf_blocks(fmt, random_k_blocks(fmt, n, k, seed=seed), (n, k))
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.5
    return w if fmt == "F32" else quantize(w, fmt)


def test_triton_backend_has_only_triton_and_torch_candidates() -> None:
    for fmt in ("Q4_0", "Q8_0", "Q4_K", "F32", "BF16"):
        w = _weight("F32" if fmt == "BF16" else fmt, 32, 256, seed=1)
        w = w.bfloat16() if fmt == "BF16" else w
        host = Linear(w)
        assert "triton" not in host.candidates(allow_approx=True)
        lin = Linear(w.to(DEVICE.torch), backend="triton")
        names = lin.candidates(allow_approx=True)
        assert "triton" in names and set(names) <= {"triton"} | TORCH_CANDIDATES, (fmt, names)
        if lin.quantized:
            assert names == ["triton"]
        assert static_candidate(lin) == "triton" and default_plan(lin) == [(1, "triton")]
    assert CANDIDATES["triton"].exact
    with pytest.raises(ValueError, match="backend"):
        Linear(torch.zeros(4, 32), backend="cuda")


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K", "F32"])
@pytest.mark.parametrize("bias", [False, True])
def test_triton_candidate_matches_the_reference(fmt: str, bias: bool) -> None:
    n, k = (37, 256) if fmt in ("Q4_K", "Q6_K") else (37, 96)  # K = 96: a partial last K step
    weight = _weight(fmt, n, k, seed=7)
    gen = torch.Generator().manual_seed(3)
    b = torch.randn(n, generator=gen) if bias else None
    dev = DEVICE.torch
    lin = Linear(weight.to(dev), None if b is None else b.to(dev), backend="triton")
    lin.set_plan(default_plan(lin))
    wd = (weight._dequant_torch() if isinstance(weight, QuantizedTensor) else weight).double()
    for m in (1, 5, 17):  # 17: a second M tile
        x = torch.randn(m, k, generator=gen)
        y = lin(x.to(dev)).cpu()
        assert y.shape == (m, n) and y.dtype == torch.float32
        ref = x.double() @ wd.T + (0 if b is None else b.double())
        bound = 1e-5 * (x.double().abs() @ wd.abs().T) + 1e-5
        assert ((y.double() - ref).abs() <= bound).all(), (fmt, bias, m)


# --- (3) end to end: the same greedy tokens and prompt logprobs as the CPU ----------------------

PROMPTS = [[5, 17, 33, 48, 99, 100, 2, 3, 4, 5, 6, 7], list(range(11, 31))]  # 12 and 20 tokens


def _run(path, device: str, softmax: str, max_tokens: int):
    # a 16-token budget splits the second prompt's prefill over steps that also decode the first
    llm = LLM(
        model=str(path),
        device=device,
        softmax=softmax,
        dtype="float32",
        max_model_len=128,
        kv_block_size=16,
        kv_cache_bytes=1 << 20,
        max_num_batched_tokens=16,
        num_threads=1,
        numerics="exact",  # the Triton flat GEMM has no int8-activation path: compare like with like
    )
    params = SamplingParams(temperature=0, max_tokens=max_tokens, prompt_logprobs=1, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    return llm, outs


def _assert_same(cpu_outs, dev_outs) -> None:
    for a, b in zip(cpu_outs, dev_outs):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        targets = a.prompt_token_ids[1:]
        for ea, eb, t in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], targets, strict=True):
            assert abs(ea[t].logprob - eb[t].logprob) < 1e-3


@pytest.fixture(scope="module")
def q8_model(gguf_model):
    return gguf_model("llama", tensor_type="Q8_0")


def test_triton_engine_matches_cpu_unified(q8_model) -> None:
    _, cpu_outs = _run(q8_model, "cpu", "unified", 12)
    llm, dev_outs = _run(q8_model, "cuda", "unified", 12)
    engine = llm.engine
    assert engine.device.backend == "triton" and engine.model.softmax.backend == "triton"
    assert engine.cache.kv.device.type == DEVICE.torch.type
    assert all(lin.plan == [(1, "triton")] for lin in engine.model.linears())
    assert engine.stats().attention_rows_checked > 0  # the Triton attention kernels ran
    _assert_same(cpu_outs, dev_outs)


def test_triton_engine_matches_cpu_exact(q8_model) -> None:
    """Exact mode keeps the torch attention reference, on the device's tensors."""
    _, cpu_outs = _run(q8_model, "cpu", "exact", 4)
    llm, dev_outs = _run(q8_model, "cuda", "exact", 4)
    assert llm.engine.model.softmax.mode == "exact" and llm.engine.stats().attention_rows_checked == 0
    _assert_same(cpu_outs, dev_outs)
