"""attention_gate op family (being written)."""
