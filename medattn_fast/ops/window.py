"""window op family (being written)."""
