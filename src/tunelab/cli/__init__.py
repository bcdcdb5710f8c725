"""The `tunelab` command line (see app.py)."""

from tunelab.cli.app import app, main

__all__ = ["app", "main"]
