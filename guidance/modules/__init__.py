"""Built-in guidance modules, one per file."""
