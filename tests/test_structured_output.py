"""Structured output (constrained decoding) on the embedded SmolLM2-135M: whatever the temperature, the
output parses and matches its schema, regex or choice."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from flashdecode import LLM, SamplingParams
from flashdecode.engine.sampler import Sampler, SamplingRow
from flashdecode.errors import InvalidSamplingParamsError

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "zip": {"type": "integer", "minimum": 1000, "maximum": 9999},
                "country": {"enum": ["FR", "DE", "US"]},
            },
            "required": ["zip", "country"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}
POINTS = {
    "type": "object",
    "properties": {
        "points": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": -5, "maximum": 5},
                    "y": {"type": "integer", "minimum": 0, "maximum": 9},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            },
            "minItems": 1,
            "maxItems": 3,
        },
        "ok": {"type": "boolean"},
    },
    "required": ["points", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(max_model_len=512, kv_block_size=16)


def _params(constraint: dict, seed: int, n: int = 3, max_tokens: int = 96) -> SamplingParams:
    return SamplingParams(
        n=n, temperature=1.2, seed=seed, max_tokens=max_tokens, structured_output=constraint
    )


def _check_json(outputs, schema: dict) -> None:
    for c in outputs:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), schema)


@pytest.mark.parametrize("schema", [PERSON, POINTS], ids=["person", "points"])
def test_json_schema_outputs_validate_at_high_temperature(llm: LLM, schema: dict) -> None:
    prompts = ["Give a JSON record:", "Random data:"]
    outs = llm.generate(prompts, [_params({"json": schema}, seed) for seed in (1, 2)])
    for out in outs:
        assert len(out.outputs) == 3
        _check_json(out.outputs, schema)
    # the n siblings and the seeds really sample different outputs
    assert len({c.text for out in outs for c in out.outputs}) > 1


def test_json_schema_as_text_and_json_object(llm: LLM) -> None:
    out = llm.generate("JSON:", _params({"json": json.dumps(POINTS)}, seed=5, n=2))[0]
    _check_json(out.outputs, POINTS)
    out = llm.generate("An object:", _params({"json_object": True}, seed=6, n=2, max_tokens=64))[0]
    for c in out.outputs:
        if c.finish_reason == "stop":  # free-form objects may outgrow max_tokens; a finished one parses
            assert isinstance(json.loads(c.text), dict)
        else:
            assert c.text.startswith("{")


def test_choice_and_regex(llm: LLM) -> None:
    choices = ["yes", "no", "maybe so"]
    out = llm.generate("Is it raining?", _params({"choice": choices}, seed=3, n=4, max_tokens=16))[0]
    for c in out.outputs:
        assert c.text in choices and c.finish_reason == "stop"

    pattern = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"
    out = llm.generate("A date:", _params({"regex": pattern}, seed=4, n=3, max_tokens=32))[0]
    for c in out.outputs:
        assert re.fullmatch(pattern, c.text) and c.finish_reason == "stop"


def test_greedy_and_mixed_batch(llm: LLM) -> None:
    constrained = SamplingParams(temperature=0, max_tokens=96, structured_output={"json": PERSON})
    plain = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    reference = llm.generate("The capital of France is", plain)[0].outputs[0].token_ids
    outs = llm.generate(["Give a JSON record:", "The capital of France is"], [constrained, plain])
    _check_json(outs[0].outputs, PERSON)
    assert outs[1].outputs[0].token_ids == reference  # an unconstrained neighbour is untouched


def test_preemption_keeps_matchers_consistent(llm: LLM) -> None:
    params = [_params({"json": POINTS}, seed, n=2) for seed in range(4)]
    prompts = [f"Record {i}:" for i in range(4)]
    reference = [[c.text for c in o.outputs] for o in llm.generate(prompts, params)]
    spec = llm.engine.spec
    bytes_per_token = 2 * spec.num_layers * spec.kv_size * llm.engine.cache.kv.element_size()
    small = LLM(max_model_len=128, kv_block_size=16, kv_cache_bytes=128 * bytes_per_token)
    outs = small.generate(prompts, params)
    assert small.engine.stats().num_preemptions > 0
    for out in outs:
        _check_json(out.outputs, POINTS)
    # seeded rows draw batch-independent noise, so preemption changes nothing at all
    assert [[c.text for c in o.outputs] for o in outs] == reference


def test_abort_drops_a_constrained_request(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request("so-abort", "JSON:", _params({"json": PERSON}, seed=1, n=2))
    engine.step()
    engine.abort("so-abort")
    assert not engine.has_unfinished_requests()
    assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total


@pytest.mark.parametrize(
    "constraint",
    [
        {"json": {"type": "nonsense"}},
        {"json": "{not json"},
        {"json": 5},
        {"regex": "a(b"},
        {"choice": []},
        {"json_object": False},
        {"json": {"type": "object"}, "regex": "x"},
        {"grammar": "start: x"},
        "json",
    ],
)
def test_bad_constraints_are_refused(constraint) -> None:
    with pytest.raises(InvalidSamplingParamsError, match="structured_output"):
        SamplingParams(structured_output=constraint)


def test_sampler_applies_the_mask_only_to_constrained_rows() -> None:
    logits = torch.randn(3, 10)
    allowed = torch.zeros(10, dtype=torch.bool)
    allowed[[3, 7]] = True
    params = SamplingParams(temperature=1.0)
    rows = [
        SamplingRow(params, torch.Generator().manual_seed(i), [1], [], (), allowed if i != 1 else None)
        for i in range(3)
    ]
    for _ in range(20):
        ids = Sampler()(logits, rows).token_ids
        assert ids[0] in (3, 7) and ids[2] in (3, 7)
    # a row whose suppressed ids (min_tokens) cover everything the grammar allows: the grammar wins
    rows = [SamplingRow(SamplingParams(temperature=0), None, [1], [], (3, 7), allowed)]
    assert Sampler()(logits[:1], rows).token_ids[0] in (3, 7)
