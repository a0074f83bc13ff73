"""gaussian_axial op family (being written)."""
