"""position op family (being written)."""
