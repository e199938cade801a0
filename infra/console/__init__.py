"""The review console (``accessflow console``): a small web app where admins review pending requests."""
