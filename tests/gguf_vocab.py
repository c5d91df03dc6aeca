"""Test helpers: build small tokenizer vocabularies and write them into GGUF files.

``write_gguf`` writes a GGUF holding minimal Llama-architecture metadata, the tokenizer fields
llama.cpp defines and one tiny tensor, so both our loader and transformers'
``AutoTokenizer.from_pretrained(folder, gguf_file=...)`` can read it. ``read_gguf_metadata``
returns the metadata in the form ``Tokenizer.from_gguf_metadata`` takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPM_SPACE = "\u2581"

DEFAULT_TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello there, how are you doing today?",
    "def main():\n    return sum(x * x for x in range(10))",
    "Numbers like 12345 and 3.14159 appear in text.",
    "Café, naïve, résumé: accented letters are common in French words.",
    "Tokenizers split words into pieces; pieces merge into tokens.",
    "She sells sea shells by the sea shore, and the shells she sells are sea shells.",
]


@dataclass
class GGUFVocab:
    """The tokenizer fields of a GGUF file (llama.cpp's key names, minus ``tokenizer.ggml.``)."""

    model: str  # "llama" (SentencePiece BPE) or "gpt2" (byte-level BPE)
    tokens: list[str]
    scores: list[float] | None = None
    token_types: list[int] | None = None
    merges: list[str] | None = None
    pre: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    unknown_token_id: int | None = None
    padding_token_id: int | None = None
    eot_token_id: int | None = None
    add_bos_token: bool | None = None
    add_eos_token: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        """The dict ``{key: field.contents()}`` a GGUFReader would give for these fields."""
        meta: dict[str, Any] = {"general.architecture": "llama", "tokenizer.ggml.model": self.model}
        for name in (
            "tokens", "scores", "token_type", "merges", "pre", "bos_token_id", "eos_token_id",
            "unknown_token_id", "padding_token_id", "eot_token_id", "add_bos_token", "add_eos_token",
            "add_space_prefix",
        ):  # fmt: skip
            value = getattr(self, "token_types" if name == "token_type" else name)
            if value is not None:
                meta[f"tokenizer.ggml.{name}"] = value
        if self.chat_template is not None:
            meta["tokenizer.chat_template"] = self.chat_template
        meta.update(self.extra)
        return meta


def train_spm_vocab(
    texts: Sequence[str] = DEFAULT_TRAINING_TEXT,
    vocab_size: int = 420,
    user_defined: Sequence[str] = ("<tool>",),
    chat_template: str | None = None,
) -> GGUFVocab:
    """A SentencePiece-style vocabulary laid out like Llama's.

    ``<unk>``, ``<s>``, ``</s>``, the 256 ``<0xNN>`` byte tokens, then BPE pieces (trained with
    ``tokenizers`` on ``texts``, "▁" for spaces) in merge order, then single characters; each
    piece scores minus its position, so earlier merges win, as in a real SentencePiece model.
    No merges are stored: the reader has to recover them from the scores.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    trainee = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    trainee.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPM_SPACE, prepend_scheme="first", split=True
    )
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>"], show_progress=False)
    trainee.train_from_iterator(texts, trainer=trainer)
    trained = trainee.get_vocab()
    merged = [trained_piece for trained_piece, _ in sorted(trained.items(), key=lambda kv: kv[1])]
    chars = [p for p in merged if len(p) == 1]
    pieces = [p for p in merged if len(p) > 1 and p != "<unk>"]
    # Whitespace runs, as Llama's vocabulary has them.
    pieces += [SPM_SPACE * 2, SPM_SPACE * 4]

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
    for piece in [*pieces, *chars, *user_defined]:
        tokens.append(piece)
        types.append(USER_DEFINED if piece in user_defined else NORMAL)
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    return GGUFVocab(
        model="llama",
        tokens=tokens,
        scores=scores,
        token_types=types,
        bos_token_id=1,
        eos_token_id=2,
        unknown_token_id=0,
        add_bos_token=True,
        add_eos_token=False,
        add_space_prefix=True,
        chat_template=chat_template,
        pre="default",
    )


def byte_level_vocab(backend, pre: str, **fields: Any) -> GGUFVocab:
    """The GGUF fields of a ``tokenizers`` byte-level BPE tokenizer, as llama.cpp's converter
    writes them: tokens in id order, special added tokens as CONTROL, merges as "a b" strings."""
    import json

    vocab = backend.get_vocab(with_added_tokens=True)
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise ValueError("token ids must be contiguous")
    special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    merges = json.loads(backend.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return GGUFVocab(
        model="gpt2",
        tokens=tokens,
        token_types=[CONTROL if t in special else NORMAL for t in tokens],
        merges=merges,
        pre=pre,
        **fields,
    )


def write_gguf(path: str | Path, vocab: GGUFVocab, arch: str = "llama") -> Path:
    """Write ``vocab`` plus minimal model metadata and one tiny tensor to a GGUF file."""
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_name("tokenizer-test")
    writer.add_context_length(128)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_rope_dimension_count(4)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(vocab.tokens))

    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.token_types is not None:
        writer.add_token_types(vocab.token_types)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    for name in ("bos", "eos", "unk", "pad", "eot"):
        key = {"unk": "unknown", "pad": "padding"}.get(name, name)
        value = getattr(vocab, f"{key}_token_id")
        if value is not None:
            getattr(writer, f"add_{name}_token_id")(value)
    if vocab.add_bos_token is not None:
        writer.add_add_bos_token(vocab.add_bos_token)
    if vocab.add_eos_token is not None:
        writer.add_add_eos_token(vocab.add_eos_token)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)

    writer.add_tensor("token_embd.weight", np.zeros((len(vocab.tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """``{key: field.contents()}`` for every metadata field, the form our loader takes."""
    reader = gguf.GGUFReader(str(path))
    return {key: fld.contents() for key, fld in reader.fields.items()}
