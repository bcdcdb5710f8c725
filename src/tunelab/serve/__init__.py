"""Serve fine-tunes behind an OpenAI-compatible API."""
