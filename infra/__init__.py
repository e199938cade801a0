"""Adapters for the domain's ports, and the one composition root, :mod:`infra.bootstrap`."""
