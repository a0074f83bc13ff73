"""hypothesis profiles of the property and fuzzing tests, chosen by ``MEDATTN_HYPOTHESIS_PROFILE``.

* ``ci`` (default): a few examples per test, derandomized (the same examples on every run and in
  every xdist worker, so CI time is bounded and a failure reproduces), no per-example deadline
  (Triton interpreter and first C++ calls are slow, not hung).
* ``thorough``: many more random examples, for a local or nightly hunt
  (``MEDATTN_HYPOTHESIS_PROFILE=thorough pytest tests/test_properties.py tests/test_bad_input_fuzz.py``).

``--hypothesis-show-statistics`` prints how many examples each test tried.
"""
import os

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               print_blob=True)
settings.register_profile("ci", max_examples=6, derandomize=True, database=None, **_COMMON)
settings.register_profile("thorough", max_examples=200, **_COMMON)
settings.load_profile(os.environ.get("MEDATTN_HYPOTHESIS_PROFILE", "ci"))


def examples(ci: int) -> dict:
    """``@settings(**examples(n))``: ``n`` examples in the ``ci`` profile, the profile's own count otherwise."""
    if os.environ.get("MEDATTN_HYPOTHESIS_PROFILE", "ci") == "ci":
        return dict(max_examples=ci)
    return {}
