"""tunelab: fine-tune an open language model on one team's task, and prove that it worked."""

__version__ = "0.1.0"
