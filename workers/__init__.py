"""latprune: workers."""
