"""utils/threads.py: the team size follows the load, and costs little where there is none."""

from __future__ import annotations

import pytest

from flashdecode.utils.threads import MAX_INTERVAL, AdaptiveTeam


class FakeMachine:
    """Step times per team size, changed by the test; the clock advances by each step's time."""

    def __init__(self, times: dict[int, float]):
        self.times, self.now, self.runs = times, 0.0, []

    def clock(self) -> float:
        return self.now

    def step(self, threads: int) -> int:
        self.now += self.times[threads]
        self.runs.append(threads)
        return threads


def steps(team: AdaptiveTeam, machine: FakeMachine, n: int, key: int = 1) -> list[int]:
    start = len(machine.runs)
    for _ in range(n):
        assert team.run(key, machine.step) == machine.runs[-1]  # the step's result comes back
    return machine.runs[start:]


def test_a_quiet_machine_keeps_the_whole_team() -> None:
    machine = FakeMachine({2: 1.0, 1: 1.7})
    team = AdaptiveTeam(2, clock=machine.clock, adaptive=True)
    runs = steps(team, machine, 2000)
    assert team.size(1) == 2
    assert runs.count(1) <= 2 * (7 + 2000 // MAX_INTERVAL)  # probes back off to one in MAX_INTERVAL
    assert runs[-MAX_INTERVAL // 2 :].count(1) <= 2


def test_a_busy_core_moves_the_team_to_one_thread_and_back() -> None:
    machine = FakeMachine({2: 1.0, 1: 1.7})
    team = AdaptiveTeam(2, clock=machine.clock, adaptive=True)
    steps(team, machine, 1000)
    machine.times = {2: 4.0, 1: 1.8}  # another process takes a core: the barriers wait
    runs = steps(team, machine, 40)
    assert team.size(1) == 1 and runs[-20:].count(1) >= 16
    machine.times = {2: 1.0, 1: 1.7}  # and leaves: a probe finds two threads faster again
    steps(team, machine, 4 * MAX_INTERVAL)
    assert team.size(1) == 2


def test_each_step_shape_has_its_own_record() -> None:
    machine = FakeMachine({2: 1.0, 1: 1.7})
    team = AdaptiveTeam(2, clock=machine.clock, adaptive=True)
    steps(team, machine, 50, key=1)
    machine.times = {2: 4.0, 1: 1.8}
    steps(team, machine, 60, key=9)
    assert team.size(9) == 1 and team.size(1) == 2


@pytest.mark.parametrize("most", [1, 4])
def test_pinned_or_single_teams_never_probe(most: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASHDECODE_ADAPTIVE_THREADS", "0")
    machine = FakeMachine({most: 1.0, most // 2 or 1: 0.1, 1: 0.1})
    team = AdaptiveTeam(most, clock=machine.clock)
    assert set(steps(team, machine, 300)) == {most}
