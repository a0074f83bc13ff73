"""Benchmarks: ``python -m bench.run`` (or ``medattn-fast bench``); cases in ``bench/cases_*.py``."""
