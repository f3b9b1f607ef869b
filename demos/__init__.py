"""Demos built on the edgellm runtime; each runs with `python -m demos.<name>`."""
