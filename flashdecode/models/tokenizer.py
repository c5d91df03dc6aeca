"""Text <-> token ids, and chat templates, for GGUF files and Hugging Face folders.

Everything is built on the ``tokenizers`` library (never sentencepiece or pickled objects):

* A Hugging Face folder ships a ``tokenizer.json``, which ``tokenizers`` loads as it is.
* A GGUF file ships only the pieces (tokens, merges or scores, token types, special ids) under
  llama.cpp's key names, so we rebuild the tokenizer from them, the way llama.cpp and
  ``transformers.integrations.gguf`` read the same keys:

  - ``tokenizer.ggml.model == "gpt2"``: byte-level BPE. The merges come with the file; the regex
    that cuts text into words before BPE does not, only its name in ``tokenizer.ggml.pre``, so
    ``_PRE_TOKENIZERS`` maps those names to the split the model was trained with.
  - ``tokenizer.ggml.model == "llama"``: SentencePiece BPE with byte fallback. Spaces become "▁",
    one is prepended to the text, and characters with no piece are spelled as ``<0xNN>`` byte
    tokens. When the file has no merges they are recovered from the piece scores, since
    SentencePiece merges the highest-scoring pair first.

Chat templates are rendered the way Hugging Face renders them (a sandboxed jinja2 environment
with the same globals and filters), so a prompt matches what the model was fine-tuned on.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from ..errors import FlashDecodeError, ModelLoadError

__all__ = ["Tokenizer"]

logger = logging.getLogger(__name__)

# llama.cpp's token types (``tokenizer.ggml.token_type``).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_SPM_SPACE = "\u2581"  # "▁": how SentencePiece spells a space inside a piece

# Tokens llama.cpp treats as end-of-generation by their text, for files whose eos id is the
# end-of-document token while the chat template ends turns with another one (older Llama 3 GGUFs:
# eos <|end_of_text|>, turns end with <|eot_id|>). Without this such a model never stops.
_EOG_TEXTS = frozenset(
    {
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
        "<EOT>", "_<EOT>", "<|eom_id|>", "<｜end▁of▁sentence｜>", "<|return|>", "<|call|>",
    }
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Byte-level BPE pre-tokenizers, keyed by ``tokenizer.ggml.pre``
# --------------------------------------------------------------------------------------------

# GPT-2's word split, which ``pre_tokenizers.ByteLevel(use_regex=True)`` applies on its own.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2 differs from Llama 3 only in cutting numbers into single digits.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3.5 also keeps combining marks with their letter.
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# DeepSeek V3 applies three splits in turn: numbers, CJK runs, then words.
_DEEPSEEK_V3_SPLITS = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)


@dataclass(frozen=True)
class _PreTokenizer:
    splits: tuple[str, ...] = ()  # regexes applied in turn; () means GPT-2's built-in split
    digits: bool = False  # cut numbers into single digits first (StarCoder, SmolLM)
    nfc: bool = False  # NFC-normalize the text first (Qwen2's tokenizer.json does)
    ignore_merges: bool = False  # a word that is itself a token is taken whole (Llama 3, Tekken)
    add_bos: bool = False  # llama.cpp's default for add_bos_token when the file does not say


_GPT2 = _PreTokenizer()
_DIGITS = _PreTokenizer(digits=True)
_LLAMA3 = _PreTokenizer((_LLAMA3_SPLIT,), ignore_merges=True, add_bos=True)
_LLAMA3_NO_IGNORE = _PreTokenizer((_LLAMA3_SPLIT,))
_QWEN2 = _PreTokenizer((_QWEN2_SPLIT,), nfc=True)

# Names as llama.cpp's converter writes them (``convert_hf_to_gguf.py: get_vocab_base_pre``),
# grouped as llama.cpp's ``llama-vocab.cpp`` groups them by regex.
_PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano"),
        _LLAMA3,
    ),
    **dict.fromkeys(("dbrx", "smaug-bpe", "chatglm-bpe", "glm4"), _LLAMA3_NO_IGNORE),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2),
    "qwen35": _PreTokenizer((_QWEN35_SPLIT,), nfc=True),
    **dict.fromkeys(("megrez", "stablelm2", "hunyuan", "grok-2"), _PreTokenizer((_QWEN2_SPLIT,))),
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), _PreTokenizer((_GPT4O_SPLIT,))),
    "tekken": _PreTokenizer((_TEKKEN_SPLIT,), ignore_merges=True, add_bos=True),
    **dict.fromkeys(("deepseek-v3", "hunyuan-dense"), _PreTokenizer(_DEEPSEEK_V3_SPLITS)),
    # StarCoder-style tokenizer.json: Digits(individual_digits=True) then GPT-2's ByteLevel split.
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"), _DIGITS
    ),
    **dict.fromkeys(
        ("gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais", "roberta-bpe", "trillion", "gigachat", "exaone4",
         "jina-v1-en", "jina-v2-code", "jina-v2-es", "jina-v2-de", "jina-es", "jina-de", "default"),
        _GPT2,
    ),
}  # fmt: skip


def _byte_level_pre_tokenizer(pre: _PreTokenizer) -> pre_tokenizers.PreTokenizer:
    if not pre.splits:
        steps = [pre_tokenizers.Digits(individual_digits=True)] if pre.digits else []
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
        return pre_tokenizers.Sequence(steps)
    steps = [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in pre.splits]
    # The words are already cut; ByteLevel only has to respell their bytes.
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)


@functools.cache
def _byte_alphabet() -> tuple[str, ...]:
    """GPT-2's byte -> printable character table: byte-level vocabularies spell every token in it."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:  # control bytes, space, ... are moved past U+00FF so no token holds a blank
            table[byte] = chr(256 + extra)
            extra += 1
    return tuple(table[byte] for byte in range(256))


# --------------------------------------------------------------------------------------------
# Reading GGUF metadata
# --------------------------------------------------------------------------------------------


def _string_list(meta: dict[str, Any], key: str, required: bool) -> list[str] | None:
    value = meta.get(key)
    if value is None:
        if required:
            raise ModelLoadError(f"GGUF tokenizer metadata is missing {key!r}")
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ModelLoadError(f"GGUF tokenizer metadata {key!r} must be an array of strings")
    if not all(isinstance(item, str) for item in value):
        raise ModelLoadError(f"GGUF tokenizer metadata {key!r} holds a value that is not a string")
    return list(value)


def _number_list(meta: dict[str, Any], key: str, length: int) -> list | None:
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise ModelLoadError(f"GGUF tokenizer metadata {key!r} must be an array")
    if len(value) != length:
        raise ModelLoadError(
            f"GGUF tokenizer metadata {key!r} has {len(value)} entries but there are {length} tokens"
        )
    return list(value)


def _token_id(meta: dict[str, Any], key: str, n_tokens: int) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelLoadError(f"GGUF tokenizer metadata {key!r} must be an integer, got {value!r}")
    if value < 0 or value >= n_tokens:
        # llama.cpp writes -1 (as uint32 max) for "none" in some converters; treat any id past the
        # vocabulary as absent rather than refusing the file, as llama.cpp does.
        logger.warning("%s = %d is outside the vocabulary of %d tokens; ignoring it", key, value, n_tokens)
        return None
    return value


def _flag(meta: dict[str, Any], key: str, default: bool) -> bool:
    value = meta.get(key)
    return default if value is None else bool(value)


def _merge_pairs(merges: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for index, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ModelLoadError(
                f"GGUF tokenizer merge #{index} {merge!r} is not two tokens split by a space"
            )
        pairs.append((parts[0], parts[1]))
    return pairs


def _merges_from_scores(
    tokens: list[str], scores: list[float], types: list[int] | None
) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's "merge the best-scoring pair" rule.

    Every way of cutting a piece into two pieces that are both in the vocabulary is a merge, ranked
    by the score of the piece it makes (best first). Ties go to the longer left half, then to file
    order, as in ``transformers``' ``generate_merges``, so the two libraries agree token for token.
    Control, byte and unused tokens are not text pieces SentencePiece ever builds, so they take
    part in no merge.
    """
    mergeable = {
        token: index
        for index, token in enumerate(tokens)
        if types is None or types[index] in (_NORMAL, _USER_DEFINED)
    }
    ranked: list[tuple[float, int, int, str, str]] = []
    for token in dict.fromkeys(tokens):  # first occurrence order, like a dict built from the list
        index = mergeable.get(token)
        if index is None or len(token) < 2:
            continue
        cuts = [
            (token[:cut], token[cut:])
            for cut in range(1, len(token))
            if token[:cut] in mergeable and token[cut:] in mergeable
        ]
        cuts.sort(key=lambda pair: (mergeable[pair[0]], mergeable[pair[1]]))
        score = float(scores[index])
        ranked.extend((-score, -len(left), -len(right), left, right) for left, right in cuts)
    ranked.sort(key=lambda item: item[:3])  # stable: equal keys keep the order built above
    return [(left, right) for _, _, _, left, right in ranked]


def _backend_error(what: str, error: Exception) -> ModelLoadError:
    return ModelLoadError(f"cannot build the tokenizer from {what}: {error}")


# --------------------------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------------------------


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}``: Hugging Face marks assistant text with it (to
    build loss masks); rendering only needs the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson HTML-escapes "<", ">" and "&", which would change the prompt.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    # Templates come from model files, i.e. untrusted: the immutable sandbox keeps them from
    # touching Python internals or mutating what they are given.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


@functools.lru_cache(maxsize=16)
def _template_variables(source: str) -> frozenset[str]:
    """The variables a template reads from its caller (asked per chat request: cached)."""
    try:
        env = _compile_template(source).environment
        return frozenset(meta.find_undeclared_variables(env.parse(source)))
    except jinja2.TemplateError:
        return frozenset()


# --------------------------------------------------------------------------------------------
# Reading a Hugging Face folder
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from error
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _id_list(value: Any, where: str) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ModelLoadError(f"{where} must be an integer or a list of integers, got {value!r}")
    return values


def _bos_eos_processor(bos_id: int | None, eos_id: int | None) -> processors.TemplateProcessing:
    """``[BOS] text [EOS]``, either end optional. The names are placeholders: only ids come out."""
    bos, eos = (["[BOS]"] if bos_id is not None else []), (["[EOS]"] if eos_id is not None else [])
    single = [f"{t}:0" for t in bos] + ["$A:0"] + [f"{t}:0" for t in eos]
    pair = single + [f"{t}:1" for t in bos] + ["$B:1"] + [f"{t}:1" for t in eos]
    special = [(t, i) for t, i in (("[BOS]", bos_id), ("[EOS]", eos_id)) if i is not None]
    return processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair), special_tokens=special)


# --------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------


class Tokenizer:
    """A model's tokenizer: ``encode``/``decode`` plus its special ids and chat template.

    Build it with :meth:`from_gguf_metadata` or :meth:`from_hf_folder`.
    """

    def __init__(
        self,
        backend: _Backend,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        stop_token_ids: set[int],
        chat_templates: dict[str, str],
        vocab_size: int | None = None,
        template_tokens: dict[str, str] | None = None,
    ) -> None:
        # Encoding must return every token: a tokenizer.json may ask for truncation or padding.
        backend.no_truncation()
        backend.no_padding()
        self._backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.stop_token_ids = frozenset(stop_token_ids)
        self._chat_templates = dict(chat_templates)
        self.chat_template: str | None = self._chat_templates.get("default")
        added = backend.get_added_tokens_decoder()
        # Exactly what decode(skip_special_tokens=True) drops.
        self.all_special_ids = frozenset(index for index, token in added.items() if token.special)
        if vocab_size is None:
            vocab_size = max(backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self.vocab_size = vocab_size
        # bos_token, eos_token, ... as the chat template sees them.
        self._template_tokens = dict(template_tokens or {})

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        """Rebuild the tokenizer a GGUF file describes, from its metadata as plain Python values
        (``{key: field.contents() for key, field in GGUFReader(path).fields.items()}``)."""
        model = meta.get("tokenizer.ggml.model")
        if model is None:
            raise ModelLoadError("GGUF file has no tokenizer (no 'tokenizer.ggml.model')")
        tokens = _string_list(meta, "tokenizer.ggml.tokens", required=True)
        if not tokens:
            raise ModelLoadError("GGUF tokenizer metadata 'tokenizer.ggml.tokens' is empty")
        n = len(tokens)
        scores = _number_list(meta, "tokenizer.ggml.scores", n)
        types = _number_list(meta, "tokenizer.ggml.token_type", n)
        merges = _string_list(meta, "tokenizer.ggml.merges", required=False)
        ids = {
            name: _token_id(meta, f"tokenizer.ggml.{name}_token_id", n)
            for name in ("bos", "eos", "eot", "eom", "unknown", "padding")
        }

        # Control tokens (and the named special ones) are matched whole in the text and dropped by
        # decode(skip_special_tokens=True); user-defined ones are matched whole but kept. Both are
        # added under the spelling stored in the file, which the vocabulary also uses for them, so
        # adding them binds their existing ids and never grows the vocabulary.
        named = {i for i in ids.values() if i is not None}
        special = sorted(
            i for i in range(n)
            if tokens[i] and (i in named or (types is not None and types[i] in (_CONTROL, _UNKNOWN)))
        )  # fmt: skip
        user_defined = [i for i in range(n) if types is not None and types[i] == _USER_DEFINED and tokens[i]]

        if model == "gpt2":
            if not merges:
                raise ModelLoadError("GGUF byte-level BPE tokenizer has no 'tokenizer.ggml.merges'")
            pre_name = meta.get("tokenizer.ggml.pre")
            pre = _PRE_TOKENIZERS.get(pre_name) if isinstance(pre_name, str) else None
            if pre is None:
                logger.warning("unknown GGUF pre-tokenizer %r; splitting words the GPT-2 way", pre_name)
                pre = _GPT2
            raw = frozenset(special) | frozenset(user_defined)
            backend = cls._gguf_byte_level(tokens, raw, _merge_pairs(merges), pre)
            add_bos_default = pre.add_bos  # (llama.cpp ignores add_space_prefix for byte-level BPE)
        elif model == "llama":
            if merges is None and scores is None:
                raise ModelLoadError(
                    "GGUF SentencePiece tokenizer has neither 'tokenizer.ggml.scores' "
                    "nor 'tokenizer.ggml.merges'"
                )
            add_space_prefix = _flag(meta, "tokenizer.ggml.add_space_prefix", True)
            pairs = _merge_pairs(merges) if merges else _merges_from_scores(tokens, scores, types)
            backend = cls._gguf_sentencepiece(tokens, pairs, ids["unknown"], add_space_prefix)
            add_bos_default = True  # llama.cpp and SentencePiece Llama add BOS unless told otherwise
        else:
            raise ModelLoadError(
                f"unsupported GGUF tokenizer model {model!r} (supported: 'gpt2' byte-level BPE, "
                "'llama' SentencePiece BPE)"
            )

        backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
        backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user_defined])
        if backend.get_vocab_size(with_added_tokens=True) > n:  # an added token missed its id
            raise ModelLoadError("GGUF tokenizer: a special token's text does not match its vocabulary entry")

        bos, eos = ids["bos"], ids["eos"]
        add_bos = _flag(meta, "tokenizer.ggml.add_bos_token", add_bos_default) and bos is not None
        add_eos = _flag(meta, "tokenizer.ggml.add_eos_token", False) and eos is not None
        backend.post_processor = _bos_eos_processor(bos if add_bos else None, eos if add_eos else None)

        stop = {i for i in (eos, ids["eot"], ids["eom"]) if i is not None}
        stop.update(i for i in special if tokens[i] in _EOG_TEXTS)

        templates = {}
        if isinstance(meta.get("tokenizer.chat_template"), str):
            templates["default"] = meta["tokenizer.chat_template"]
        for name in meta.get("tokenizer.chat_templates") or ():
            source = meta.get(f"tokenizer.chat_template.{name}")
            if isinstance(name, str) and isinstance(source, str):
                templates[name] = source

        template_tokens = {
            "bos_token": tokens[bos] if bos is not None else None,
            "eos_token": tokens[eos] if eos is not None else None,
            "unk_token": tokens[ids["unknown"]] if ids["unknown"] is not None else None,
            "pad_token": tokens[ids["padding"]] if ids["padding"] is not None else None,
        }
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_id=eos,
            stop_token_ids=stop,
            chat_templates=templates,
            vocab_size=n,
            template_tokens=template_tokens,
        )

    @staticmethod
    def _gguf_byte_level(
        tokens: list[str], raw: frozenset[int], merges: list[tuple[str, str]], pre: _PreTokenizer
    ) -> _Backend:
        """``raw``: ids of the special and user-defined tokens, which are stored as plain text."""
        alphabet = frozenset(_byte_alphabet())
        vocab: dict[str, int] = {}
        for index, token in enumerate(tokens):
            if index not in raw and not set(token) <= alphabet:
                # A text piece the file stores as raw text rather than in the byte alphabet:
                # respell it so BPE, which works in that alphabet, can produce it.
                table = _byte_alphabet()
                token = "".join(table[b] for b in token.encode("utf-8"))
            vocab[token] = index  # a repeated spelling keeps its last id, as llama.cpp does
        try:
            backend = _Backend(
                models.BPE(
                    vocab=vocab,
                    merges=merges,
                    fuse_unk=False,
                    byte_fallback=False,
                    ignore_merges=pre.ignore_merges,
                )
            )
        except Exception as error:  # tokenizers raises a bare Exception for a bad merge
            raise _backend_error("the GGUF byte-level vocabulary", error) from error
        if pre.nfc:
            backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
        # Bytes of a character split across tokens decode to U+FFFD, as in Hugging Face.
        backend.decoder = decoders.ByteLevel()
        return backend

    @staticmethod
    def _gguf_sentencepiece(
        tokens: list[str], merges: list[tuple[str, str]], unk_id: int | None, add_space_prefix: bool
    ) -> _Backend:
        vocab = {token: index for index, token in enumerate(tokens)}
        try:
            backend = _Backend(
                models.BPE(
                    vocab=vocab,
                    merges=merges,
                    unk_token=tokens[unk_id] if unk_id is not None else None,
                    fuse_unk=True,
                    byte_fallback=True,  # characters with no piece become <0xNN> tokens
                )
            )
        except Exception as error:
            raise _backend_error("the GGUF SentencePiece vocabulary", error) from error
        # "first": only the start of the text gets the "▁" prefix, not text after a special token,
        # matching Hugging Face's (non-legacy) Llama tokenizer.
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=_SPM_SPACE, prepend_scheme="first" if add_space_prefix else "never", split=False
        )
        steps = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_space_prefix:
            steps.append(decoders.Strip(" ", 1, 0))  # drop the space the encoder prepended
        backend.decoder = decoders.Sequence(steps)
        return backend

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` plus the settings Hugging Face keeps beside it."""
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelLoadError(f"{folder} has no tokenizer.json")
        try:
            backend = _Backend.from_file(str(tokenizer_file))
        except Exception as error:
            raise _backend_error(str(tokenizer_file), error) from error

        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        generation = _read_json(folder / "generation_config.json")

        # special_tokens_map.json, when present, wins over tokenizer_config.json (as in transformers).
        names: dict[str, str | None] = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            text = _token_text(special_map.get(name)) or _token_text(config.get(name))
            if text is not None and backend.token_to_id(text) is None:
                logger.warning("%s %r is not in the vocabulary; ignoring it", name, text)
                text = None
            names[name] = text
        # The named tokens must be special (matched whole, skipped on decode) even when
        # tokenizer.json lists them as plain vocabulary; they keep their vocabulary ids.
        added = {token.content for token in backend.get_added_tokens_decoder().values()}
        missing = [text for text in names.values() if text is not None and text not in added]
        backend.add_special_tokens(
            [AddedToken(text, special=True, normalized=False) for text in dict.fromkeys(missing)]
        )

        bos_id = backend.token_to_id(names["bos_token"]) if names["bos_token"] else None
        eos_id = backend.token_to_id(names["eos_token"]) if names["eos_token"] else None
        gen_eos = _id_list(generation.get("eos_token_id"), "generation_config.json eos_token_id")
        if bos_id is None:
            bos_ids = _id_list(generation.get("bos_token_id"), "generation_config.json bos_token_id")
            bos_id = bos_ids[0] if bos_ids else None
        if eos_id is None and gen_eos:
            eos_id = gen_eos[0]

        # BOS/EOS come from tokenizer.json's post-processor alone. add_bos_token / add_eos_token in
        # tokenizer_config.json are ignored when a tokenizer.json exists, as transformers (v5) does:
        # the two disagree in some checkpoints, and tokenizer.json is what the model ships to encode.
        templates: dict[str, str] = {}
        source = config.get("chat_template")
        if isinstance(source, str):
            templates["default"] = source
        elif isinstance(source, list):  # [{"name": ..., "template": ...}, ...]
            for entry in source:
                if isinstance(entry, dict) and isinstance(entry.get("template"), str):
                    templates[str(entry.get("name", "default"))] = entry["template"]
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():  # newer checkpoints keep the template in its own file
            try:
                templates["default"] = jinja_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                raise ModelLoadError(f"cannot read {jinja_file}: {error}") from error

        stop = {i for i in (eos_id, *gen_eos) if i is not None}
        return cls(
            backend,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            stop_token_ids=stop,
            chat_templates=templates,
            template_tokens=names,
        )

    # -- encoding and decoding ---------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. Special tokens written in the text (``<|im_start|>``) become
        their ids; ``add_special_tokens`` adds BOS/EOS as the model's settings ask."""
        if not isinstance(text, str):
            raise FlashDecodeError(f"encode expects a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``. Any subsequence decodes; bytes of a character cut across the ends
        come out as U+FFFD, so an incremental detokenizer can hold those back."""
        ids = [int(i) for i in ids]
        if ids and min(ids) < 0:
            raise FlashDecodeError(f"cannot decode negative token id {min(ids)}")
        # An id past the vocabulary (a model whose embedding is padded) decodes to nothing, as in HF.
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        out = []
        for i in ids:
            token = self._backend.id_to_token(int(i)) if int(i) >= 0 else None
            if token is None:
                raise FlashDecodeError(f"token id {int(i)} is not in the vocabulary")
            out.append(token)
        return out

    def get_vocab(self) -> dict[str, int]:
        """Every token, added ones included, and its id (as transformers' ``get_vocab``)."""
        return self._backend.get_vocab(with_added_tokens=True)

    def backend_json(self) -> str:
        """The wrapped ``tokenizers`` tokenizer as tokenizer.json text (grammar libraries build their
        vocabulary from it)."""
        return self._backend.to_str()

    # -- chat --------------------------------------------------------------------------------

    @property
    def chat_template_takes_tools(self) -> bool:
        """Whether the chat template ``apply_chat_template(..., tools=...)`` renders reads ``tools``
        (Hermes, Qwen, Llama 3.1 templates do); for one that does not, a caller has to describe the
        tools some other way, or the model never sees them."""
        source = self._chat_templates.get("tool_use") or self.chat_template
        return source is not None and "tools" in _template_variables(source)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """Render ``messages`` with the model's chat template, as Hugging Face does.

        Extra keyword arguments are template variables (``tools``, ``enable_thinking``, ...). With
        ``tokenize=True`` the ids are returned, encoded without adding BOS/EOS: the template
        writes them itself where the model wants them.
        """
        template = self.chat_template
        if template_kwargs.get("tools") and "tool_use" in self._chat_templates:
            template = self._chat_templates["tool_use"]
        if template is None:
            raise FlashDecodeError("model has no chat template")
        # Like transformers: a key set to None (OpenAI's content=None) is treated as absent.
        messages = [{k: v for k, v in dict(message).items() if v is not None} for message in messages]
        variables = {"tools": None, "documents": None}
        variables.update({k: v for k, v in self._template_tokens.items() if v is not None})
        variables.update(template_kwargs)
        try:
            text = _compile_template(template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.TemplateError as error:
            raise FlashDecodeError(f"chat template error: {error}") from error
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as error:
            raise FlashDecodeError(f"chat template failed: {type(error).__name__}: {error}") from error
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_token_id={self.bos_token_id}, "
            f"eos_token_id={self.eos_token_id}, stop_token_ids={sorted(self.stop_token_ids)})"
        )
