"""The interleaved timing that every benchmark uses: each contender is timed the asked number of times, after its
warm-up, and the order changes between rounds so that no contender always runs right after the same other one."""

from itertools import pairwise

from litebert.perf import interleaved_step_times


def test_interleaved_step_times_varies_who_runs_before_whom():
    calls: list[str] = []
    steps = {name: (lambda n=name: calls.append(n)) for name in "ABCD"}
    times = interleaved_step_times(steps, rounds=12, steps_per_round=2, warmup=1)
    assert calls[:4] == list("ABCD")  # the warm-up, once each
    timed = calls[4:]
    assert all(len(times[n]["wall"]) == len(times[n]["cpu"]) == 24 for n in steps)
    assert sorted(timed) == sorted(list("ABCD") * 24)
    # per round: each contender's calls back to back; across rounds, each one has more than one predecessor
    rounds = [timed[i:i + 8] for i in range(0, len(timed), 8)]
    assert all(r[0::2] == r[1::2] for r in rounds)
    # (a rotation would put every contender after the same neighbour in every round where it is not first)
    orders = [r[0::2] for r in rounds]
    predecessors = {n: {a for order in orders for a, b in pairwise(order) if b == n} for n in steps}
    assert all(len(p) >= 2 for p in predecessors.values()), predecessors
