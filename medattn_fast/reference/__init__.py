"""Faithful PyTorch implementations of every block: the oracle every fast path is checked
against. Slow and obvious on purpose; never optimised. Imports nothing of the package."""
