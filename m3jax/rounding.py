"""Rounding of sizes up to a multiple or a power of two: padded shapes, so that few of them compile."""
from __future__ import annotations


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` >= n."""
    if multiple < 1:
        raise ValueError(f"round_up needs a positive multiple, got {multiple}")
    return -(-n // multiple) * multiple


def power_of_two_at_least(n: int, floor: int = 1) -> int:
    """The smallest power of two >= n, and >= floor (itself a power of two)."""
    if floor < 1 or floor & (floor - 1):
        raise ValueError(f"power_of_two_at_least needs a power-of-two floor, got {floor}")
    return max(floor, 1 << max(n - 1, 0).bit_length())
