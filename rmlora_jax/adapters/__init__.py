"""Adapter families, one module each, and the registry of fine-tuning methods."""
