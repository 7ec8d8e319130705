"""The ServerApp: samples clients, aggregates their weights, evaluates and records results."""
