"""OPT (``OPTForCausalLM``) against transformers on random models (tests/model_factory.py
``OPT_ARCHS``): pre-norm with a tied head (head_dim 16), and OPT-350m's layout, norms after the
residual adds with no final norm and embeddings narrower than the hidden size (project_in /
project_out; head_dim 20). From safetensors only: llama.cpp has no OPT architecture, so there is no
GGUF to compare. Top-5 logprobs at every position within 1e-3 and 32 greedy tokens equal to
``generate``, batches of three sequences.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import model_factory as mf
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import test_hf_parity as parity  # noqa: E402  (tests/ is on sys.path; its helpers)

from flashdecode.errors import ModelLoadError  # noqa: E402
from flashdecode.models.loader import load_model  # noqa: E402
from flashdecode.models.safetensors_loader import spec_from_hf_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest.py


@pytest.mark.parametrize("arch", mf.OPT_ARCHS)
def test_hf_folder_matches_transformers(arch: str, hf_model: Callable[..., Path], hf_reference: Any) -> None:
    path, ref = hf_model(arch), hf_reference(arch)
    prompts = parity.prompts_for(ref.config.vocab_size)
    outs = parity.run_engine(path, prompts)
    assert len(outs) == len(prompts)
    for k, (out, prompt) in enumerate(zip(outs, prompts)):
        parity.check_request(out, prompt, ref, f"{arch} hf request {k}")
        parity.check_greedy(out, prompt, ref, f"{arch} hf request {k}")


def test_spec_and_weights(hf_model: Callable[..., Path]) -> None:
    """The layouts the parity test runs: OPT-350m's post-norms, projections and no final norm; the
    native decode step declines OPT."""
    pre, post = load_model(hf_model("opt")), load_model(hf_model("opt-350m"))
    assert pre.spec.norm_before and pre.spec.embed_dim is None and "norm_bias" in pre.weights
    assert not post.spec.norm_before and post.spec.embed_dim == 48
    assert "norm" not in post.weights
    assert post.weights["project_in"].shape == (80, 48) and post.weights["embed"].shape == (512, 48)
    assert post.weights["pos_embed"].shape == (post.spec.max_position + 2, 80)
    assert not pre.spec.native_block and not post.spec.native_block


def test_learned_positions_matter(hf_reference: Any) -> None:
    """Shifting the position table by one row (dropping the offset's effect) moves transformers'
    logits well beyond the parity tolerance, so the parity test fails where the offset is wrong."""
    ref = hf_reference("opt")
    ids = torch.tensor([parity.prompts_for(512)[0]])
    shifted = copy.deepcopy(ref)
    table = shifted.model.decoder.embed_positions.weight
    with torch.no_grad():
        table.copy_(torch.roll(table, 1, dims=0))
        assert (shifted(ids).logits - ref(ids).logits).abs().max() > 0.1


def test_unsupported_config_is_a_clear_error() -> None:
    config = dict(mf.arch_config("opt"), architectures=["OPTForCausalLM"], activation_function="gelu")
    with pytest.raises(ModelLoadError, match="activation_function"):
        spec_from_hf_config(config)


def test_gguf_opt_is_refused(tmp_path: Path) -> None:
    """llama.cpp has no OPT architecture: a GGUF naming one gets the clear error, not a half load."""
    import gguf

    from flashdecode.errors import UnsupportedArchitectureError

    path = tmp_path / "opt.gguf"
    writer = gguf.GGUFWriter(path=None, arch="opt")
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedArchitectureError, match="Hugging Face folders only"):
        load_model(path)
