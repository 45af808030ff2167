"""One module per CLI command; see ``toolkit/__main__.py``."""
