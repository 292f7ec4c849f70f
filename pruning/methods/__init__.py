"""latprune: pruning/methods."""
