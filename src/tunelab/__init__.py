"""tunelab: fine-tune an open language model on one team's task, and prove that it worked."""

import logging

__version__ = "0.1.0"

# bitsandbytes (the `quant` extra) warns on import, in every process, that it could not fetch a CPU NF4 kernel
# from the Hugging Face hub ("kernels-community"). tunelab never downloads at run time, and bitsandbytes'
# built-in CPU path is the one we measured (docs/benchmarks.md), so the warning only misleads.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
