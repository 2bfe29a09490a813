"""Orchestration: the only layer that knows Ray and MLflow; each verb one module."""
