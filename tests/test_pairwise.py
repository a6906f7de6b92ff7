"""The covering design several tests draw their cases from (tests/helpers.py)."""

import itertools

from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import pairwise


@given(st.lists(st.integers(1, 4), min_size=0, max_size=5))
def test_every_pair_of_values_meets_in_some_case(sizes):
  factors = [[f"{a}{i}" for i in range(n)] for a, n in enumerate(sizes)]
  cases = pairwise(*factors)
  assert all(len(case) == len(factors) for case in cases)
  assert set(cases) <= set(itertools.product(*factors))
  for a, b in itertools.combinations(range(len(factors)), 2):
    assert {(c[a], c[b]) for c in cases} == set(itertools.product(factors[a], factors[b]))
  for a, values in enumerate(factors):
    assert {c[a] for c in cases} == set(values)
  assert pairwise(*factors) == cases  # the same cases every run


def test_fewer_cases_than_the_product():
  assert len(pairwise([1, 2, 3], "ab", "cd", "ef")) == 6  # of 24
  assert len(pairwise(range(3), range(3), range(2), range(2))) <= 10  # of 36
