"""latprune: latency."""
