"""Secrets: issuing and hashing credentials, sealing them, and checking admins' signatures."""
