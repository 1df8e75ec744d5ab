"""Training: strategy registry, request checks, and the worker-side runner."""
