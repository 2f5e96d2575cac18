"""Helpers the tests import: starting mcrd (daemon), packets built by hand
(packets), what a received stream must look like (streams), a classic BPF
interpreter (cbpf), strict mode (strict, a pytest plugin)."""

import pytest

# Their asserts fail tests: pytest explains them as it does the tests' own.
pytest.register_assert_rewrite("tests.helpers.streams")
