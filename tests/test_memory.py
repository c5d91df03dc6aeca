"""Memory: huge-page advice never changes a tensor's values; a loaded file's pages are given back
once copied out; the load makes no second copy of the weights; the embedded model serving 32
sequences peaks within a bound of its file and its KV cache (issue 15)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from flashdecode.errors import ModelLoadError
from flashdecode.kernels import cpu
from flashdecode.kernels.formats import I8_FORMATS, NATIVE
from flashdecode.layers import linear
from flashdecode.layers.linear import fused_linear
from flashdecode.layers.quant import quantize
from flashdecode.models.gguf_header import GGUFHeader
from flashdecode.models.gguf_loader import read_gguf
from flashdecode.utils.memory import HUGE_PAGE, advise_huge_pages, drop_mapped_pages, huge_page_copy


def test_huge_page_copy_keeps_the_values() -> None:
    t = torch.randint(0, 255, (20 * HUGE_PAGE,), dtype=torch.uint8)
    copy = huge_page_copy(t)
    assert torch.equal(copy, t) and copy.dtype == t.dtype and copy.shape == t.shape
    small = torch.ones(16)
    assert huge_page_copy(small) is small
    view = t[::2]
    assert huge_page_copy(view) is view  # a strided view is left as it is


def test_advice_on_a_buffer_smaller_than_a_huge_page_is_declined() -> None:
    assert advise_huge_pages(torch.empty(100)) is False


# --- mapped file pages -------------------------------------------------------------------------------


def _rss_file_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux's")
def test_dropped_file_pages_leave_the_resident_set_and_keep_the_values(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 255, 16 << 20, dtype=np.uint8)
    path = tmp_path / "blob"
    data.tofile(path)
    mapping = np.memmap(path, mode="r").view(np.ndarray)
    part = mapping[12345 : 12345 + (8 << 20)]
    before = _rss_file_kb()
    total = int(part.sum(dtype=np.int64))  # reads every page
    assert _rss_file_kb() - before > 6 << 10
    assert drop_mapped_pages(mapping, part)
    assert _rss_file_kb() - before < 1 << 10
    assert int(part.sum(dtype=np.int64)) == total  # faulted in again from the page cache
    assert np.array_equal(mapping, data)


def test_dropping_pages_refuses_memory_that_is_not_a_read_only_file_map(tmp_path: Path) -> None:
    anon = np.arange(1 << 20, dtype=np.uint8)
    frozen = anon.copy()
    frozen.flags.writeable = False
    for a in (anon, frozen):
        assert not drop_mapped_pages(a, a[4096:])
    assert np.array_equal(anon, np.arange(1 << 20, dtype=np.uint8))  # untouched
    path = tmp_path / "blob"
    anon.tofile(path)
    mapping = np.memmap(path, mode="r").view(np.ndarray)
    assert not drop_mapped_pages(mapping, anon)  # a part outside the map
    writable = np.memmap(path, mode="c").view(np.ndarray)  # copy-on-write: the advice would lose writes
    assert not drop_mapped_pages(writable, writable[10:])


# --- the GGUF header, and copies the load no longer makes -------------------------------------------------


@pytest.mark.parametrize("arch, tensor_type", [("llama", "Q4_0"), ("llama", "F16"), ("phi3", "F32")])
def test_gguf_header_reads_what_gguf_reads(gguf_model, arch: str, tensor_type: str) -> None:
    """models/gguf_header.py: the metadata as gguf's ``field.contents()``, the tensors as its views."""
    path = gguf_model(arch, tensor_type)
    ours, theirs = GGUFHeader(path), gguf.GGUFReader(path)
    assert ours.meta == {key: field.contents() for key, field in theirs.fields.items()}
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert a.tensor_type == b.tensor_type and list(a.shape) == [int(d) for d in b.shape]
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
        assert np.array_equal(a.data, b.data)


def test_a_truncated_gguf_header_is_a_load_error(gguf_model, tmp_path: Path) -> None:
    raw = gguf_model("llama", "Q4_0").read_bytes()
    for cut in (3, 40, len(raw) // 2):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(raw[:cut])
        with pytest.raises(ModelLoadError, match="not a valid GGUF file"):
            read_gguf(path)


def test_fused_parts_become_views_of_the_fused_matrix() -> None:
    """fused_linear: q/k/v (gate/up) are held once, in the fused matrix, and keep their values."""
    gen = torch.Generator().manual_seed(0)
    parts = [quantize(torch.randn(rows, 64, generator=gen), "Q4_1") for rows in (48, 16, 16)]
    before = [p.dequantize() for p in parts]
    fused = fused_linear(parts).weight
    first = 0
    for p, want in zip(parts, before, strict=True):
        assert torch.equal(p.dequantize(), want)
        for plane, whole in zip(p.planes(), fused.planes(), strict=True):
            start = whole.data_ptr() + first * whole.stride(0) * whole.element_size()
            assert plane.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
            assert plane.data_ptr() == start
        first += p.shape[0]


@pytest.mark.parametrize("fmt", I8_FORMATS)
def test_repack_by_rows_is_the_whole_repack(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """layers/linear.py: a large matrix's int8 repack built a few groups of rows at a time is the
    repack of the whole (the padding of the last group included)."""
    monkeypatch.setattr(linear, "REPACK_ROWS", 32)
    gen = torch.Generator().manual_seed(1)
    n, k = 3 * 32 + 5, 256
    if NATIVE[fmt].repacked:
        qs = torch.randint(0, 256, (n, k // 32, NATIVE[fmt].qs_bytes), dtype=torch.uint8, generator=gen)
        if fmt == "Q5_K":
            qs &= 0x1F
        scales = n, k // 32 * NATIVE[fmt].scales_per_block
        d = torch.rand(scales, generator=gen)
        planes = (qs, d, -torch.rand(scales, generator=gen) if NATIVE[fmt].has_min else None)
    else:
        planes = quantize(torch.randn(n, k, generator=gen), fmt).planes()
    whole = cpu.repack_i8(fmt, planes)
    pieces = linear._repack_i8_by_rows(fmt, planes, n)
    for a, b in zip(pieces, whole, strict=True):
        assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b))


# --- the embedded model serving 32 sequences ---------------------------------------------------------

SERVE_32 = """
import json
from flashdecode import LLM, SamplingParams
from flashdecode.tools.bench import model_file_bytes
from flashdecode.utils.cpuinfo import peak_rss_bytes, reset_peak_rss, rss_bytes

n, prompt, gen = {n}, {prompt}, {gen}
baseline = rss_bytes()
assert reset_peak_rss()
llm = LLM(max_model_len=prompt + gen, max_num_seqs=n)
built = peak_rss_bytes()
prompts = [{{"prompt_token_ids": [100 + (7 * i + j) % 4000 for j in range(prompt)]}} for i in range(n)]
out = llm.generate(prompts, SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True))
cache = llm.engine.cache
print(json.dumps({{
    "baseline": baseline, "built": built, "peak": peak_rss_bytes(), "file": model_file_bytes(None),
    "slot_bytes": cache.bytes_per_slot, "slots": cache.kv.shape[1], "block": llm.engine.config.kv_block_size,
    "generated": [len(o.outputs[0].token_ids) for o in out],
}}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux's /proc")
def test_serving_32_sequences_peaks_within_the_file_and_kv_bound() -> None:
    """Issue 15's figure, peak RSS against the GGUF file plus the KV cache the run needs, for what
    serving adds: the peak above the process's RSS before the engine (the interpreter and torch,
    ~200 MB whatever the model). The weights are the file's blocks (1x the file) and the KV cache
    is its blocks (1x); the rest (tokenizer, native library and modules, the native step's workspace
    for 256 rows, the [32, vocab] logits) is fixed, about 0.3x of these for a 97 MB model. 1.5x
    leaves headroom over that and fails on a second copy of the weights (+0.48x) or of the cache,
    or a step workspace for a whole 1024-token prefill chunk beside a duplicate of the logits.
    Before the engine serves, the load alone must stay within the weights plus those fixed costs
    (2.2x the file): the mapped file resident beside its planes, fused parts beside the fused
    matrix, or planes beside their repacks each add a whole copy."""
    n, prompt, gen = 32, 128, 4
    code = SERVE_32.format(n=n, prompt=prompt, gen=gen)
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    assert r["generated"] == [gen] * n
    # the cache holds what the run needs, in whole blocks: never sized beyond the request
    blocks = -(-(prompt + gen) // r["block"])
    assert r["slots"] == n * blocks * r["block"]
    kv = r["slot_bytes"] * r["slots"]
    load, serve = r["built"] - r["baseline"], r["peak"] - r["baseline"]
    mib = 2**20
    assert load <= 2.2 * r["file"], f"load peak {load / mib:.0f} MiB over a {r['file'] / mib:.0f} MiB file"
    bound = 1.5 * (r["file"] + kv)
    assert serve <= bound, f"serving peak {serve / mib:.0f} MiB > {bound / mib:.0f} MiB"
