"""Helpers shared by the tests (and, for processes, by the benchmarks). Test modules import from here, never from
one another."""
