"""Former home of a method's chunked call, now :mod:`evidencemap.methods.call` (the whole call
path in one module); these names stay importable from here."""

from evidencemap.methods.call import INPUTS_STEP, concat, explain_in_chunks, graph_bytes, one_run

__all__ = ["INPUTS_STEP", "concat", "explain_in_chunks", "graph_bytes", "one_run"]
