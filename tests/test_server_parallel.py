"""`flashdecode serve --tensor-parallel-size 2` as the official `openai` client sees it: a tiny
random-weight Llama over two ranks of one thread each answers a chat and a streamed
completion with the single-process engine's greedy text, and a rank that dies turns ``/health``
unhealthy and requests into OpenAI error objects instead of a hang."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
from server_process import running_server

from flashdecode import LLM, SamplingParams

# 4 heads of 16 over 2 KV heads and an MLP of 256: each rank holds 2 heads, 1 KV head, whole blocks
SHAPE = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=256)
MESSAGES = [{"role": "user", "content": "Name a colour."}]
PROMPT = [1, 17, 45, 300, 12, 99, 7]
MAX_TOKENS = 8


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _workers(server_pid: int) -> list[int]:
    """The ranks the server started: the children of its fork server (or, where ranks are spawned,
    its own children that run multiprocessing's spawn entry point; not its resource tracker)."""
    pids = []
    for pid in _children(server_pid):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"forkserver" in cmdline:
            pids += _children(pid)
        elif b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            pids.append(pid)
    return pids


def test_serve_under_tensor_parallelism(hf_model: Callable[..., Path], tmp_path: Path) -> None:
    model = hf_model("llama", **SHAPE)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    reference = LLM(str(model), num_threads=1, numerics="exact")
    chat_text = reference.chat(MESSAGES, params)[0].outputs[0].text
    completion_text = reference.generate([PROMPT], params)[0].outputs[0].text
    del reference
    assert chat_text and completion_text  # something to compare

    args = ["--model", str(model), "--tensor-parallel-size", "2", "--threads", "1", "--exact"]
    with running_server(args, tmp_path / "server.log") as server:
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="none", max_retries=0, timeout=60)
        name = client.models.list().data[0].id
        greedy = dict(max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
        chat = client.chat.completions.create(model=name, messages=MESSAGES, **greedy)
        assert chat.choices[0].message.content == chat_text
        assert chat.usage.completion_tokens == MAX_TOKENS
        stream = client.completions.create(model=name, prompt=PROMPT, stream=True, **greedy)
        assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == completion_text

        (worker,) = _workers(server.process.pid)
        os.kill(worker, signal.SIGKILL)
        with pytest.raises(openai.APIStatusError) as failed:
            client.completions.create(model=name, prompt=PROMPT, **greedy)
        assert failed.value.status_code == 503
        assert failed.value.body["type"] and "a rank died" in failed.value.body["message"]
        assert httpx.get(f"{server.base}/health", timeout=10).status_code == 503
        with pytest.raises(openai.APIStatusError) as later:  # every later request fails at once too
            client.chat.completions.create(model=name, messages=MESSAGES, **greedy)
        assert later.value.status_code == 503
