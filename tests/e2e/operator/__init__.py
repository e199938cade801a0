"""The operator's commands and the README's walkthrough, on real services; no session worker pool.

Collected before the other end-to-end modules (pytest goes through a directory by name), so that
the session's worker pools are not started yet while these run: a pool left idle for a minute or
more loses its publishing connection to missed heartbeats, and test_wire_options counts pika's
logged reset as a crash sign.
"""
