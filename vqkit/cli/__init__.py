"""The ``vqkit`` command line: ``main(argv)`` in vqkit.cli.main, one module per command group."""

from vqkit.cli.main import main

__all__ = ["main"]
