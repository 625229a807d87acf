"""Benchmarks: scripts that print tables of ratios, not tests. ``bash dev.sh bench`` runs them all."""
