"""`edgellm bench` statistics: p90 is the slow tail whichever way a metric points."""

from edgellm.bench import Stat


def test_p90_is_the_slow_tail_for_times_and_rates() -> None:
    ms = [float(v) for v in range(1, 11)]  # 1..10 ms
    assert Stat.of(ms).p90 == 9.0  # 90% of runs took at most 9 ms
    rates = [1000 / v for v in ms]
    assert Stat.of(rates, higher_is_better=True).p90 == round(1000 / 9, 2)  # 90% ran at least this fast
    assert Stat.of(rates, higher_is_better=True).p90 < Stat.of(rates, higher_is_better=True).median
