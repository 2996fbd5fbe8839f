"""Hugging Face integrations: the MIXTURE datasets builder and export, Hub cards, push and pull."""
