"""vnet: a programmable packet tracer for virtualized networks."""

__version__ = "0.1.0"
