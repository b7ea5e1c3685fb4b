"""The `vnet` command line (typer): one module per command group."""
