"""SamplingParams validation and the sampler's semantics (vLLM's), on small hand-checkable logits."""

from __future__ import annotations

import math

import pytest
import torch

from flashdecode.engine.sampler import Sampler, SamplingRow, _apply_penalties, prompt_logprobs
from flashdecode.errors import InvalidSamplingParamsError
from flashdecode.sampling_params import SamplingParams

# ---------------------------------------------------------------------------------------------------------
# SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (1, 0.0, 0.0, 1.0)
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (1.0, 1.0, 0, 0.0, None)
    assert (p.stop, p.stop_token_ids, p.ignore_eos, p.max_tokens, p.min_tokens) == ([], [], False, 16, 0)
    assert (p.logprobs, p.prompt_logprobs) == (None, None)
    assert p.skip_special_tokens is True and p.include_stop_str_in_output is False
    assert not p.greedy


def test_normalisation():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]
    assert SamplingParams(max_tokens=None).max_tokens is None
    p = SamplingParams(temperature=0)
    assert p.greedy and isinstance(p.temperature, float)
    assert SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=1e-4).greedy
    assert SamplingParams(top_k=-1).top_k == -1
    assert SamplingParams(logprobs=0, prompt_logprobs=20).prompt_logprobs == 20
    assert SamplingParams(min_tokens=16, max_tokens=16).min_tokens == 16


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 0),
        ("n", 1.5),
        ("n", True),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", "hot"),
        ("temperature", None),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", "1"),
        ("top_k", -2),
        ("top_k", 2.5),
        ("top_k", None),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.01),
        ("frequency_penalty", 3),
        ("frequency_penalty", -3),
        ("max_tokens", 0),
        ("max_tokens", -5),
        ("max_tokens", 2.0),
        ("min_tokens", -1),
        ("min_tokens", 17),  # > default max_tokens=16
        ("logprobs", -1),
        ("logprobs", 21),
        ("logprobs", "5"),
        ("prompt_logprobs", -1),
        ("prompt_logprobs", 21),
        ("stop", ""),
        ("stop", ["ok", ""]),
        ("stop", [1]),
        ("stop", 5),
        ("stop_token_ids", [1, -2]),
        ("stop_token_ids", ["a"]),
        ("stop_token_ids", 7),
        ("seed", 1.5),
        ("seed", "42"),
        ("ignore_eos", "yes"),
        ("skip_special_tokens", None),
        ("include_stop_str_in_output", 1),
    ],
)
def test_invalid_params_rejected(field, value):
    with pytest.raises(InvalidSamplingParamsError) as info:
        SamplingParams(**{field: value})
    assert isinstance(info.value, ValueError)
    assert field in str(info.value)
    assert repr(value) in str(info.value)


def test_min_tokens_above_max_tokens_names_both():
    with pytest.raises(InvalidSamplingParamsError, match="min_tokens.*max_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)
    SamplingParams(min_tokens=100, max_tokens=None)  # no cap: any min_tokens is fine


# ---------------------------------------------------------------------------------------------------------
# Sampler

sampler = Sampler()


def row(prompt=(), output=(), generator=None, suppressed=(), **kwargs) -> SamplingRow:
    return SamplingRow(SamplingParams(**kwargs), generator, list(prompt), list(output), list(suppressed))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(8, 50)
    out = sampler(logits, [row(temperature=0.0) for _ in range(8)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 8
    assert all(type(t) is int for t in out.token_ids)


def test_greedy_rows_mixed_with_random_rows_stay_argmax():
    torch.manual_seed(1)
    logits = torch.randn(6, 40)
    rows = [row(temperature=0.0) if i % 2 == 0 else row(temperature=1.5) for i in range(6)]
    out = sampler(logits, rows)
    assert [out.token_ids[i] for i in (0, 2, 4)] == logits[[0, 2, 4]].argmax(-1).tolist()


def test_logits_not_modified():
    torch.manual_seed(2)
    logits = torch.randn(3, 20)
    before = logits.clone()
    sampler(
        logits,
        [
            row(output=[1, 2], repetition_penalty=1.5, frequency_penalty=0.5, top_k=5, top_p=0.5),
            row(suppressed=[3], temperature=0.7, min_p=0.2, logprobs=2),
            row(temperature=0.0, presence_penalty=1.0, output=[4]),
        ],
    )
    assert torch.equal(logits, before)


def test_top_k_1_equals_greedy():
    torch.manual_seed(3)
    logits = torch.randn(64, 100)
    out = sampler(logits, [row(temperature=1.0, top_k=1) for _ in range(64)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_tiny_top_p_equals_greedy():
    torch.manual_seed(4)
    logits = torch.randn(64, 100)
    out = sampler(logits, [row(temperature=1.0, top_p=1e-9) for _ in range(64)])
    assert out.token_ids == logits.argmax(-1).tolist()


# probs 0.5, 0.3, 0.15, 0.05
FOUR = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()


def sample_counts(logits_row: torch.Tensor, n: int, **kwargs) -> torch.Tensor:
    out = sampler(logits_row.expand(n, -1).clone(), [row(**kwargs) for _ in range(n)])
    return torch.bincount(torch.tensor(out.token_ids), minlength=logits_row.shape[0])


def test_top_k_keeps_k_most_likely():
    torch.manual_seed(5)
    counts = sample_counts(FOUR, 4000, top_k=2)
    assert counts[2:].sum() == 0 and counts[0] > 0 and counts[1] > 0
    # renormalised over the survivors: 0.5 / 0.8
    assert abs(counts[0].item() / 4000 - 0.625) < 0.04


def test_top_p_keeps_smallest_set_reaching_p():
    torch.manual_seed(6)
    # 0.5 < 0.7 <= 0.5 + 0.3: exactly the top two survive.
    counts = sample_counts(FOUR, 4000, top_p=0.7)
    assert counts[2:].sum() == 0 and counts[0] > 0 and counts[1] > 0
    counts = sample_counts(FOUR, 4000, top_p=0.81)
    assert counts[3] == 0 and counts[2] > 0


def test_top_p_reached_exactly_keeps_the_smaller_set():
    # probs 0.5, 0.25, 0.25 (exact in float32): the top token alone already has mass >= 0.5.
    logits = torch.tensor([math.log(2), 0.0, 0.0])
    torch.manual_seed(15)
    counts = sample_counts(logits, 2000, top_p=0.5)
    assert counts[0] == 2000


def test_min_p_drops_tokens_below_fraction_of_max():
    torch.manual_seed(7)
    # threshold 0.5 * 0.5 = 0.25: tokens with 0.15 and 0.05 go.
    counts = sample_counts(FOUR, 4000, min_p=0.5)
    assert counts[2:].sum() == 0 and counts[0] > 0 and counts[1] > 0
    counts = sample_counts(FOUR, 4000, min_p=0.2)  # threshold 0.1
    assert counts[3] == 0 and counts[2] > 0


def test_disabled_filters_are_no_ops():
    logits = torch.randn(16, 30, generator=gen(8))
    ref = sampler(logits, [row(generator=gen(i)) for i in range(16)]).token_ids
    for kwargs in ({"top_k": -1}, {"top_k": 30}, {"top_k": 1000}, {"top_p": 1.0}, {"min_p": 0.0}):
        assert sampler(logits, [row(generator=gen(i), **kwargs) for i in range(16)]).token_ids == ref


def test_penalties_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, 0.0]])
    r = row(
        prompt=[1], output=[0, 0, 2], repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25
    )
    x = logits.clone()
    _apply_penalties(x, [r])
    expected = torch.tensor(
        [
            [
                2.0 / 2 - 0.5 * 2 - 0.25,  # in output twice: repetition, then frequency x2, presence
                -1.0 * 2,  # prompt only: repetition penalty only (negative -> multiplied)
                0.5 / 2 - 0.5 * 1 - 0.25,
                1.0,  # never seen
                0.0,
            ]
        ]
    )
    torch.testing.assert_close(x, expected)
    # argmax moves from token 0 to token 3
    greedy = row(
        prompt=[1],
        output=[0, 0, 2],
        repetition_penalty=2.0,
        frequency_penalty=0.5,
        presence_penalty=0.25,
        temperature=0.0,
    )
    assert sampler(logits, [greedy]).token_ids == [3]


def test_penalties_apply_only_to_their_rows():
    logits = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    rows = [row(output=[0], presence_penalty=2.0, temperature=0.0), row(output=[0], temperature=0.0)]
    assert sampler(logits, rows).token_ids == [1, 0]


def test_negative_penalties_encourage_repeats():
    logits = torch.tensor([[1.0, 1.2]])
    assert sampler(logits, [row(output=[0], frequency_penalty=-1.0, temperature=0.0)]).token_ids == [0]


def test_seeded_sampling_reproducible_and_batch_independent():
    torch.manual_seed(9)
    logits = torch.randn(5, 64)
    target = logits[2:3]

    def run_alone(seed, steps=5):
        g = gen(seed)
        return [
            sampler(target, [row(generator=g, temperature=0.9, top_p=0.95)]).token_ids[0]
            for _ in range(steps)
        ]

    alone = run_alone(1234)
    assert alone == run_alone(1234)
    assert alone != run_alone(4321)  # 64^-5 odds of a false failure

    # Same request at a different batch position, next to unseeded rows, other seeded rows and other params.
    g = gen(1234)
    batched = []
    for _ in range(5):
        rows = [
            row(temperature=1.3),
            row(generator=gen(7), top_k=3),
            row(temperature=0.0),
            row(generator=g, temperature=0.9, top_p=0.95),
            row(min_p=0.1),
        ]
        batch = torch.cat([logits[:3], target, logits[4:]])
        batched.append(sampler(batch, rows).token_ids[3])
    assert batched == alone


def test_seeded_sampling_independent_of_global_rng():
    logits = torch.randn(1, 64, generator=gen(10))
    torch.manual_seed(0)
    a = sampler(logits, [row(generator=gen(5))]).token_ids
    torch.manual_seed(999)
    torch.rand(100)
    b = sampler(logits, [row(generator=gen(5))]).token_ids
    assert a == b


@pytest.fixture(params=["native", "torch"])
def sampling_path(request, monkeypatch: pytest.MonkeyPatch) -> str:
    """Plain temperature sampling runs natively where the kernels load (fd_sample), else in torch."""
    from flashdecode.engine import sampler as sampler_module

    if request.param == "torch":
        monkeypatch.setattr(sampler_module.cpu, "load", lambda *a, **k: None)
    elif sampler_module.cpu.load() is None:
        pytest.skip("the native kernels are not available here")
    return request.param


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_empirical_distribution_matches_softmax(temperature, sampling_path):
    torch.manual_seed(11)
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.3])
    n = 20_000
    counts = sample_counts(logits, n, temperature=temperature).double()
    expected = torch.softmax(logits.double() / temperature, -1) * n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    # 4 degrees of freedom: P(chi2 > 18.47) = 0.001 under the right distribution; a wrong temperature or
    # an off-by-one in the race gives chi2 in the hundreds.
    assert chi2 < 18.47, (counts, expected)


def test_native_and_torch_sampling_invert_the_same_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    """For the same uniform draws, the native one-pass inversion picks the torch path's tokens (they
    differ only in summation order, so at most a draw landing within rounding of a boundary moves)."""
    from flashdecode.engine import sampler as sampler_module

    if sampler_module.cpu.load() is None:
        pytest.skip("the native kernels are not available here")
    logits = torch.randn(400, 3000, generator=gen(21)) * 3
    logits[:, ::7] = float("-inf")  # masked tokens: never drawn by either

    def draw() -> list[int]:
        rows = [row(temperature=0.8, generator=gen(100 + i)) for i in range(logits.shape[0])]
        return sampler(logits, rows).token_ids

    native = draw()
    monkeypatch.setattr(sampler_module.cpu, "load", lambda *a, **k: None)
    reference = draw()
    assert all(t % 7 for t in native)
    assert sum(a != b for a, b in zip(native, reference)) <= 2


def test_logprobs_raw_values_and_ranks():
    torch.manual_seed(12)
    logits = torch.randn(3, 30)
    rows = [
        row(logprobs=4, temperature=0.8, top_k=10, output=[0, 1], repetition_penalty=1.3),
        row(),  # no logprobs requested
        row(logprobs=0, temperature=0.0),
    ]
    out = sampler(logits, rows)
    assert out.logprobs[1] is None
    raw = torch.log_softmax(logits, -1)

    lp0 = out.logprobs[0]
    order = raw[0].argsort(descending=True).tolist()
    sampled = out.token_ids[0]
    assert set(lp0) == set(order[:4]) | {sampled}
    for rank, tid in enumerate(order[:4], start=1):
        assert lp0[tid].rank == rank
    assert lp0[sampled].rank == order.index(sampled) + 1
    for tid, lp in lp0.items():
        assert lp.logprob == pytest.approx(raw[0, tid].item(), abs=1e-5)
        assert lp.decoded_token is None
    assert next(iter(lp0)) == sampled  # vLLM puts the sampled token first

    # logprobs=0: only the sampled token
    assert list(out.logprobs[2]) == [out.token_ids[2]]
    assert out.logprobs[2][out.token_ids[2]].rank == 1


def test_logprobs_of_sampled_token_outside_top_n_are_raw():
    # Penalties make token 2 the greedy pick; its logprob and rank still come from the raw logits.
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    r = row(output=[0, 0, 0, 1, 1, 1], frequency_penalty=2.0, temperature=0.0, logprobs=1)
    out = sampler(logits, [r])
    assert out.token_ids == [2]
    raw = torch.log_softmax(logits[0], -1)
    lp = out.logprobs[0]
    assert set(lp) == {0, 2}
    assert lp[0].rank == 1 and lp[2].rank == 3
    assert lp[0].logprob == pytest.approx(raw[0].item(), abs=1e-6)
    assert lp[2].logprob == pytest.approx(raw[2].item(), abs=1e-6)


def test_prompt_logprobs_small_example():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 0.0, 0.0, 1.0], [0.0, 0.0, 5.0, 0.0]])
    next_ids = [0, 0, 2]
    res = prompt_logprobs(logits, next_ids, 2)
    raw = torch.log_softmax(logits, -1)
    assert len(res) == 3
    # position 0: top-2 are 3, 2; the actual token 0 is the least likely -> rank 4
    assert set(res[0]) == {0, 2, 3}
    assert (res[0][3].rank, res[0][2].rank, res[0][0].rank) == (1, 2, 4)
    # position 1: actual token is the argmax, so it appears once, rank 1
    assert set(res[1]) == {0, 3} and res[1][0].rank == 1 and res[1][3].rank == 2
    # position 2: top-2 has a tie (three logits of 0); the actual token 2 is rank 1
    assert res[2][2].rank == 1 and len(res[2]) == 2
    for t, d in enumerate(res):
        for tid, lp in d.items():
            assert lp.logprob == pytest.approx(raw[t, tid].item(), abs=1e-6)
    assert [list(d) for d in prompt_logprobs(logits, next_ids, 0)] == [[0], [0], [2]]
    assert prompt_logprobs(logits[:0], [], 3) == []
    with pytest.raises(ValueError):
        prompt_logprobs(logits, [0, 1], 2)


def test_suppressed_ids_never_sampled():
    torch.manual_seed(13)
    logits = torch.tensor([0.0, 10.0, 0.0, 9.0, 0.0])
    # greedy: the argmax and runner-up are suppressed
    out = sampler(logits.unsqueeze(0), [row(temperature=0.0, suppressed=[1, 3])])
    assert out.token_ids[0] in (0, 2, 4)
    # random: thousands of draws never hit a suppressed id, and the rest are all reachable
    counts = sample_counts(logits, 5000, suppressed=[1, 3], temperature=2.0)
    assert counts[1] == 0 and counts[3] == 0 and (counts[[0, 2, 4]] > 0).all()
    # suppression comes before penalties: a negative presence penalty cannot revive it
    r = row(temperature=0.0, suppressed=[1], output=[1], presence_penalty=-2.0)
    assert sampler(logits.unsqueeze(0), [r]).token_ids == [3]


def test_half_precision_logits_and_empty_batch():
    logits = torch.randn(4, 32, generator=gen(14)).half()
    out = sampler(logits, [row(temperature=0.7, top_k=5, logprobs=2) for _ in range(4)])
    assert len(out.token_ids) == 4 and all(0 <= t < 32 for t in out.token_ids)
    assert all(math.isfinite(lp.logprob) for d in out.logprobs for lp in d.values())
    assert sampler(torch.empty(0, 32), []) == type(out)([], [])
    with pytest.raises(ValueError):
        sampler(torch.randn(2, 8), [row()])
