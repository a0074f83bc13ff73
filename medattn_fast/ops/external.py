"""external op family (being written)."""
