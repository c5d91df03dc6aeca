"""Every kind of bad input gets a clear, typed error in the API and one line + exit 2 at the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from flashdecode import (
    LLM,
    FlashDecodeError,
    InvalidPromptError,
    InvalidSamplingParamsError,
    ModelLoadError,
    PromptTooLongError,
    SamplingParams,
    UnsupportedArchitectureError,
)
from flashdecode.models.loader import embedded_model_path, load_model


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(max_model_len=64)


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """``flashdecode ARGS`` in this process (the command table ``python -m flashdecode`` runs; the
    server tests start that as a process): (exit code, stdout, stderr). An uncaught exception, a
    traceback, fails the test by itself."""
    from flashdecode.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_missing_path() -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("/no/such/model.gguf")


def test_folder_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path)


def test_file_that_is_not_a_model(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip file")
    with pytest.raises(ModelLoadError, match="not a model"):
        load_model(path)


def test_truncated_gguf(tmp_path: Path) -> None:
    data = embedded_model_path().read_bytes()
    for cut in (100, 2_000_000, len(data) - 1000):  # inside the metadata, the tensor infos, the data
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError):
            load_model(path)


def test_corrupt_gguf_header(tmp_path: Path) -> None:
    data = bytearray(embedded_model_path().read_bytes()[:4096])
    data[8:16] = (2**62).to_bytes(8, "little")  # absurd tensor count
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError):
        load_model(path)


def test_unsupported_gguf_architecture(tmp_path: Path) -> None:
    path = tmp_path / "bloom.gguf"
    writer = gguf.GGUFWriter(str(path), "bloom")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedArchitectureError, match="'bloom'.*supported: .*llama"):
        load_model(path)


def test_unsupported_hf_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        load_model(tmp_path)


def test_malformed_hf_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="JSON"):
        load_model(tmp_path)


def test_pickle_checkpoints_are_refused(tmp_path: Path) -> None:
    from flashdecode.models.safetensors_loader import _safetensors_files

    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ModelLoadError, match="pickle"):
        _safetensors_files(tmp_path)


def test_prompt_longer_than_the_context(llm: LLM) -> None:
    with pytest.raises(PromptTooLongError, match="max_model_len is 64"):
        llm.generate("word " * 200)
    with pytest.raises(PromptTooLongError):
        llm.generate({"prompt_token_ids": [1] * 64})
    # a rejected batch leaves nothing behind
    assert not llm.engine.has_unfinished_requests()


def test_bad_prompts(llm: LLM) -> None:
    with pytest.raises(InvalidPromptError, match="empty"):
        llm.generate({"prompt_token_ids": []})
    with pytest.raises(InvalidPromptError, match="integers"):
        llm.generate({"prompt_token_ids": [1, 10**9]})
    with pytest.raises(InvalidPromptError):
        llm.generate([3.5])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"n": 0},
        {"max_tokens": 0},
        {"top_k": -2},
        {"min_p": 2.0},
        {"repetition_penalty": 0.0},
        {"logprobs": -1},
        {"temperature": "hot"},
    ],
)
def test_invalid_sampling_params(kwargs: dict) -> None:
    with pytest.raises(InvalidSamplingParamsError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


def test_invalid_engine_options() -> None:
    with pytest.raises(FlashDecodeError, match="max_model_len"):
        LLM(max_model_len=10**6)
    with pytest.raises(FlashDecodeError, match="unknown LLM option"):
        LLM(data_parallel_size=2)
    with pytest.raises(FlashDecodeError, match="dtype"):
        LLM(dtype="int3")


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "hi", "--model", "/no/such/file.gguf"], "does not exist"),
        (["generate", "hi", "--temperature", "-1"], "temperature"),
        (["generate", "word " * 300, "--max-model-len", "64"], "max_model_len"),
        (["info", "--model", "/etc"], "config.json"),
        (["generate", "hi", "--pipeline-parallel-size", "99"], "pipeline_parallel_size=99 exceeds"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(args: list[str], message: str, capsys) -> None:
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err


def test_cli_generate_and_info(capsys) -> None:
    # the README's first command, default numerics (docs/numerics.md: the bare question is a near-tie)
    prompt = "What is the capital of France? Answer in one sentence."
    code, out, _ = run_cli(capsys, "generate", prompt, "--chat", "--max-tokens", "16")
    assert code == 0 and "Paris" in out
    code, out, _ = run_cli(capsys, "info")
    assert code == 0
    for expected in ("llama", "134,515,008", "Q4_1", "8192", "chat template      yes"):
        assert expected in out
