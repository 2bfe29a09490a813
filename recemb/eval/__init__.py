"""Evaluation of trained models: exact, distributed-safe metrics for binary CTR prediction."""
