"""Serving: bundles read and applied with numpy (torch only to score with the dense model).

Nothing under ``recemb.serving`` imports torch at module level, so a serving process can
look up embeddings from a bundle without the training stack.
"""
