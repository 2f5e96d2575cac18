"""The test and demo harness: namespace networks, traffic, starting mcrd.

Runs from a checkout (the repository root on sys.path) and is not part of the
installed package: pyproject's package list takes `mcrd*` only.
"""
