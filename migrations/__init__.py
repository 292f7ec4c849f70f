"""latprune: migrations."""
