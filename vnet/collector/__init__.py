"""The collector: receives what agents ship and writes it to trace files."""
