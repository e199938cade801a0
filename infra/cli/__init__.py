"""The ``accessflow`` command line: :mod:`infra.cli.main` assembles one module per command group."""
