"""Every family as llama.cpp's own tools write it: ``convert_hf_to_gguf.py --outtype f16`` and
``llama-quantize ... Q4_K_M`` over tiny random models (tests/model_factory.py), against transformers.

The F16 file: top-5 logprobs at every prompt and generated position within 1e-3 of transformers'
forward pass and each greedy token its argmax. The converter rounds every matrix to F16 but keeps norms,
biases and routers in F32 (``prepare_tensors``), so the reference runs on the Hugging Face weights
rounded the same way; F16 holds those exactly. The Q4_K_M file (llama.cpp's mix, with its fallbacks for
rows that 256 does not divide) loads with quantized matrices and generates, and ``flashdecode info``
names its family and features.

Runs only where llama.cpp's converter, its built ``llama-quantize`` (model_factory.LLAMA_CPP_DIRS) and
the converter's requirement ``sentencepiece`` are present; OPT has no converter class in llama.cpp.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import model_factory as mf
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

if mf.llama_cpp_dir() is None:
    pytest.skip(
        f"llama.cpp's convert_hf_to_gguf.py and build/bin/llama-quantize are in none of "
        f"{[str(d) for d in mf.LLAMA_CPP_DIRS]} (set LLAMA_CPP_DIR; benchmarks/setup_peers.sh builds one)",
        allow_module_level=True,
    )
if importlib.util.find_spec("sentencepiece") is None:
    pytest.skip("sentencepiece, which llama.cpp's converter needs, is not installed", allow_module_level=True)

import test_hf_parity as parity  # noqa: E402

from flashdecode.models.gguf_loader import read_gguf  # noqa: E402

# variant -> (factory arch, config overrides): every family; Phi-3 with a window shorter than the
# prompts (attention.sliding_window)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "phi3-window": ("phi3", dict(sliding_window=8)),
    "gemma2": ("gemma2", {}),
    "gemma3": ("gemma3", {}),
    "mixtral": ("mixtral", {}),
    "qwen2moe": ("qwen2moe", {}),
    "qwen3moe": ("qwen3moe", {}),
}
# the family flashdecode reads from each file (Mistral's converter writes it as "llama")
FAMILY = {"mistral": "llama", "phi3-window": "phi3"}
# what ``flashdecode info`` must say of each, from the factory's configs
FEATURES = {
    "qwen2": ["q/k/v biases"], "qwen3": ["q/k norm"],
    "phi3-window": ["fused projections", "sliding window 8 on 2/2 layers"],
    "gemma2": ["GeGLU", "attention soft-cap 2", "final soft-cap 4", "sliding window 8 on 2/3 layers"],
    "gemma3": ["q/k norm", "GeGLU", "sliding window 8 on 5/6 layers"],
    "mixtral": ["mixture of experts: top 2 of 4 experts"], "qwen2moe": ["q/k/v biases", "shared expert 128"],
    "qwen3moe": ["q/k norm", "mixture of experts: top 2 of 8 experts"],
}  # fmt: skip
# the converter keeps these matrices in F32 (FFN_GATE_INP, FFN_GATE_INP_SHEXP): the routers
F32_MATRICES = ("mlp.gate.weight", "block_sparse_moe.gate.weight", "shared_expert_gate.weight")
MAX_TOKENS = 8

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest.py


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, Path]]:
    """variant -> (Hugging Face folder, the converter's F16 file, llama-quantize's Q4_K_M file)."""
    root = tmp_path_factory.mktemp("llama-cpp")
    folders = {}
    for name, (arch, overrides) in VARIANTS.items():
        tokenizer = mf.CONVERTER_TOKENIZERS.get(arch, "spm")
        vocab = {"vocab_size": mf.SMOLLM_VOCAB} if tokenizer == "smollm" else {}
        folders[name] = mf.make_hf_model(arch, root / name, tokenizer=tokenizer, **vocab, **overrides)
    mf.convert_with_llama_cpp([(folder, root / f"{name}-f16.gguf") for name, folder in folders.items()])
    return {
        name: (
            folder,
            root / f"{name}-f16.gguf",
            mf.llama_quantize(root / f"{name}-f16.gguf", root / f"{name}-q4_k_m.gguf", "Q4_K_M", 1),
        )
        for name, folder in folders.items()
    }


def f16_reference(folder: Path) -> Any:
    """transformers' model with the weights as the converter stores them: matrices rounded to F16."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and not name.endswith(F32_MATRICES):
                p.copy_(p.half().float())
    return model


def prompts(vocab_size: int) -> list[list[int]]:
    # the SentencePiece vocabularies sit below the converter's padding; any id is a valid input
    return [p[:24] for p in parity.prompts_for(vocab_size)[:2]]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_f16_matches_transformers(name: str, converted: dict[str, tuple[Path, Path, Path]]) -> None:
    folder, f16, _ = converted[name]
    ref = f16_reference(folder)
    llm = parity.make_llm(f16)
    assert llm.engine.spec.family.name == FAMILY.get(name, name)
    batch = prompts(ref.config.vocab_size)
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], parity.sampling_params(MAX_TOKENS))
    for k, (out, p) in enumerate(zip(outs, batch, strict=True)):
        parity.check_request(out, p, ref, f"{name} F16 request {k}", max_tokens=MAX_TOKENS)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_q4_k_m_loads_and_generates(
    name: str, converted: dict[str, tuple[Path, Path, Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    """llama-quantize's file: ``flashdecode info`` names its family and features, its matrices stay
    quantized, and it generates."""
    from flashdecode.cli import main

    _, _, q = converted[name]
    assert main(["info", "--model", str(q)]) == 0
    text = capsys.readouterr().out
    assert FAMILY.get(name, name) in text.split(), text
    for feature in FEATURES.get(name, []):
        assert feature in text, (name, feature, text)
    formats = {t.tensor_type.name for t in read_gguf(q).tensors}
    assert {"Q4_K", "Q5_0", "Q5_1", "Q8_0", "Q6_K", "IQ4_NL"} & formats, formats
    llm = parity.make_llm(q)
    assert llm.engine.spec.family.name == FAMILY.get(name, name)
    prompt = prompts(llm.engine.spec.vocab_size)[0]
    (out,) = llm.generate({"prompt_token_ids": prompt}, parity.sampling_params(MAX_TOKENS))
    completion = out.outputs[0]
    assert len(completion.token_ids) == MAX_TOKENS
    assert all(math.isfinite(lp.logprob) for step in completion.logprobs for lp in step.values())
