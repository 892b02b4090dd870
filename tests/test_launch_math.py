"""The plain-Python launch-shape helpers compute what Triton's own do."""
import math

import pytest

from diffloss_fast.ops._triton_common import cdiv, next_power_of_2

triton = pytest.importorskip("triton")
VALUES = [*range(1, 4100), 2**20 - 1, 2**20, 2**20 + 1, 3 * 2**31, 2**40 + 7]


def test_next_power_of_2_matches_triton():
    for n in VALUES:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        assert next_power_of_2(n) >= n > next_power_of_2(n) // 2
    assert next_power_of_2(0) == 1


def test_cdiv_matches_triton_and_ceil():
    for x in [0, *VALUES[:300], *VALUES[-5:]]:
        for y in (1, 2, 3, 7, 16, 1024, 4096):
            assert cdiv(x, y) == triton.cdiv(x, y) == math.ceil(x / y), (x, y)
