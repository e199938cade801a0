"""The dramatiq actors: one per queue, each a few lines that decode, call a handler and return.

They are registered on a broker by :func:`workers.registry.register_all` when a
process boots, never at import, so importing this package needs no broker.
"""
