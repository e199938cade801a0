"""The gateway port's adapter: every credential change pushed to an API gateway, as a signed webhook."""
