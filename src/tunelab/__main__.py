"""`python -m tunelab ...` is the same as the `tunelab` command."""

from tunelab.cli import main

main()
