"""latprune: pruning."""
