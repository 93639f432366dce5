import pytest

from m3jax.rounding import power_of_two_at_least, round_up


@pytest.mark.parametrize("multiple", [1, 3, 8, 128])
def test_round_up_is_the_smallest_multiple_not_below(multiple):
    for n in range(0, 300):
        expected = next(m for m in range(0, 400, multiple) if m >= n)
        assert round_up(n, multiple) == expected


@pytest.mark.parametrize("floor", [1, 8, 16])
def test_power_of_two_at_least_by_search(floor):
    powers = [1 << b for b in range(12)]
    for n in range(0, 1025):
        assert power_of_two_at_least(n, floor) == next(p for p in powers if p >= max(n, floor))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="positive multiple"):
        round_up(5, 0)
    with pytest.raises(ValueError, match="power-of-two floor"):
        power_of_two_at_least(5, 12)
