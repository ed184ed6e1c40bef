"""Response cache for deterministic requests: in memory by default, Redis when configured."""
