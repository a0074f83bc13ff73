"""channel op family (being written)."""
