"""Caldera: a serving engine for LLaVA vision-language models."""

__version__ = "0.1.0"
