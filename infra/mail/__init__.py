"""Emails: rendered from Jinja2 templates into checked bytes, delivered by SMTP or to files."""
