"""Speed work: attention backends, caches."""
