"""The model registry: NAME@VERSION -> a frozen copy of a finished run; aliases, the promotion gate, rollback.

    reg = Registry()                        # $TUNELAB_REGISTRY, else $TUNELAB_HOME/registry
    reg.register("runs/banking77-...", "banking")    # -> Version banking@1
    reg.promote("banking@1", alias="production")     # only if its eval.json beats the base (gate.py)
    reg.resolve("banking@production").path           # the version's folder: adapter/, tokenizer/, ...
"""

from tunelab.registry.gate import GateResult, eval_summary, gate
from tunelab.registry.store import DEFAULT_ALIAS, Event, Registry, Version, parse_ref

__all__ = ["DEFAULT_ALIAS", "Event", "GateResult", "Registry", "Version", "eval_summary", "gate", "parse_ref"]
