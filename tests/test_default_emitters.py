"""The suite compiles with XLA:CPU's loop emitters (``tests/conftest.py``: about
2.5x faster compiles); users run its fusion emitters. Here the float64-oracle
tests of each path, the special values' and the temporaries' tests run again,
in a fresh process compiled with the fusion emitters."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# One or two parametrisations of each: values against the float64 oracle and
# the reference (logits, chunked logits, hidden states, the processed paths),
# gradients, NaN and -inf, and the compiled programs' temporaries.
UNDER_FUSION_EMITTERS = [
  "tests/test_logprobs.py::test_values_match_reference_and_oracle[V32003-bfloat16]",
  "tests/test_logprobs.py::test_values_match_reference_and_oracle[V40000-chunked-float16]",
  "tests/test_logprobs.py::test_value_and_grad_match_reference[chunked-per-row-softcap-bfloat16]",
  "tests/test_logprobs.py::test_value_and_grad_match_reference[one-chunk-one-softcap-float32]",
  "tests/test_scoring.py::test_matches_reference_and_oracle[1-3-32003-float32]",
  "tests/test_fused.py::test_values_match_materialised_and_oracle[default-block-3-32003-bfloat16]",
  "tests/test_policy.py::test_drawn_special_values_follow_the_oracle",
  "tests/test_sampling.py::test_kept_sets_and_values_equal_vllms_with_per_example_parameters[32003-logits]",
  "tests/test_sampling.py::test_kept_sets_and_values_equal_vllms_with_per_example_parameters[32003-hidden]",
  "tests/test_processed.py::test_gradients_with_softcap_and_per_example_temperature_match_float64[float32-logits]",
  "tests/test_processed.py::test_gradients_with_softcap_and_per_example_temperature_match_float64[bfloat16-hidden]",
  "tests/test_processed.py::test_impossible_tokens_give_minus_inf_and_nan_rows_nan[logits]",
  "tests/test_processed.py::test_group_maxima_stand_for_the_max_pass_on_whole_groups[float32]",
  "tests/test_processed.py::test_group_maxima_stand_for_the_max_pass_on_whole_groups[bfloat16]",
  "tests/test_memory.py::test_no_logits_sized_temporaries_under_any_option[bfloat16-fused]",
  "tests/test_processed.py::test_no_logits_sized_temporaries[top_k_top_p-bfloat16]",
  "tests/test_processed.py::test_no_large_temporaries_from_hidden_states_with_a_large_top_k[bfloat16]",
  "tests/test_logprobs.py::test_softcap_tanh_is_monotone_odd_and_within_its_rounding_bound",
  "tests/test_processed.py::test_a_saturated_softcap_keeps_the_references_sets[logits]",
]  # fmt: skip


@pytest.mark.long
def test_oracle_and_temporaries_tests_pass_under_the_fusion_emitters():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["LPKERNEL_TEST_EMITTERS"] = "fusion"
  command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0"]
  result = subprocess.run(
    [*command, *UNDER_FUSION_EMITTERS], env=env, cwd=ROOT, capture_output=True, text=True,
    timeout=900,
  )  # fmt: skip
  tail = result.stdout[-3000:] + result.stderr[-2000:]
  assert result.returncode == 0, tail
  assert f"{len(UNDER_FUSION_EMITTERS)} passed" in result.stdout, tail  # none missing or skipped
