"""Shared fixtures: every test's own cache directory, and the random reference models of
tests/model_factory.py, built once per session."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import model_factory  # noqa: E402  (tests/ is on sys.path: pytest's rootdir conftest import mode)

from flashdecode.kernels.cpu import kernel_dir  # noqa: E402

# Built kernels are keyed by their source and flags, so sharing the user's saves a rebuild per test;
# tuned tables, calibrations and measured ceilings are never shared (``isolated_cache_dir``).
os.environ.setdefault("FLASHDECODE_KERNEL_DIR", str(kernel_dir()))
# module- and session-scoped fixtures (a server process, say) start before any test's own directory
# exists: they get one for the whole session, never the user's
os.environ["FLASHDECODE_CACHE_DIR"] = tempfile.mkdtemp(prefix="flashdecode-test-cache-")


@pytest.fixture
def native_kernels() -> Any:
    """The loaded native CPU kernels (``flashdecode.kernels.cpu.load()``). Where
    ``FLASHDECODE_REQUIRE_NATIVE=1`` (CI) a missing build fails the test; elsewhere the test is
    skipped with the reason. Tests that check native behaviour take this fixture instead of testing
    ``load()`` for None themselves, so no assertion silently drops out when the kernels are missing."""
    from flashdecode.kernels import cpu

    required = os.environ.get("FLASHDECODE_REQUIRE_NATIVE") == "1"
    try:
        lib = cpu.load()
    except RuntimeError as exc:  # load() raises only under FLASHDECODE_REQUIRE_NATIVE=1
        pytest.fail(f"native kernels required but unavailable: {exc}")
    if lib is None:
        reason = (
            "disabled by FLASHDECODE_NATIVE=0"
            if os.environ.get("FLASHDECODE_NATIVE", "1") == "0"
            else "no build works here (see the RuntimeWarning of flashdecode.kernels.cpu.load)"
        )
        if required:
            pytest.fail(f"FLASHDECODE_REQUIRE_NATIVE=1 but the native kernels are missing: {reason}")
        pytest.skip(f"native kernels unavailable: {reason}")
    return lib


@pytest.fixture(autouse=True)
def isolated_cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets an empty cache directory of its own: whatever ``flashdecode tune`` or
    ``calibrate`` left in the user's cache (a table tuned under load, say) cannot change a result."""
    path = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("FLASHDECODE_CACHE_DIR", str(path))
    return path


def _quiet_transformers() -> None:
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except Exception:  # transformers is a test extra; tests that need it importorskip it
        pass


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reference-models")


@pytest.fixture(scope="session")
def hf_model(model_root: Path) -> Callable[..., Path]:
    """``hf_model(arch, seed=0, shards=False, **config_overrides) -> Path`` of a saved HF folder."""
    pytest.importorskip("transformers")
    _quiet_transformers()

    def get(arch: str, **kwargs: Any) -> Path:
        return model_factory.cached_hf_model(arch, root=model_root, **kwargs)

    return get


@pytest.fixture(scope="session")
def gguf_model(hf_model: Callable[..., Path]) -> Callable[..., Path]:
    """``gguf_model(arch, tensor_type="F32", **hf_model_kwargs) -> Path`` of a converted .gguf."""

    def get(arch: str, tensor_type: str = "F32", **kwargs: Any) -> Path:
        return model_factory.cached_gguf(hf_model(arch, **kwargs), tensor_type)

    return get


@pytest.fixture(scope="session")
def hf_reference(hf_model: Callable[..., Path]) -> Callable[..., Any]:
    """``hf_reference(arch, **hf_model_kwargs)``: the transformers model (fp32, eval) of ``hf_model``."""
    import torch
    from transformers import AutoModelForCausalLM

    cache: dict[Path, Any] = {}

    def get(arch: str, **kwargs: Any) -> Any:
        path = hf_model(arch, **kwargs)
        if path not in cache:
            cache[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return cache[path]

    return get


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One intra-op thread for a module's tests, the engine's and transformers'. Their models are far
    too small to gain from more, and on a shared 2-core machine two OpenMP threads collide with any
    other busy process (a 3 x 32-token parity run took 30 ms on one thread, 1.5-7.5 s on two)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
