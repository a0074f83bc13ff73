"""Full networks built on the fast blocks."""
