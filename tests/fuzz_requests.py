"""Hypothesis strategies for hostile completion requests, shared by the parser's unit fuzz test
and the live-server fuzz test."""
from hypothesis import strategies as st

FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream",
          "stream_options", "user", "n", "best_of", "echo", "logprobs", "logit_bias", "bogus"]

# Any JSON value, including huge and negative numbers, NaN-free floats, deep-ish nesting.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2 ** 70, max_value=2 ** 70)
    | st.sampled_from([10 ** 309, -10 ** 400])  # past float's range: OverflowError was a 500
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=80),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20)
bodies = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8)
