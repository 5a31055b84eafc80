"""Method families, one package (or one file) each; its front file holds the Method record(s)
that registry.py lists."""
