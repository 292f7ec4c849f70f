"""latprune: service."""
