"""Integrations with other libraries (peft, transformers)."""
