"""CTR models (LR, FM, DeepFM, DCN-V2, DLRM, Wide & Deep), one per file, and their registry.

Every model is an ``nn.Module`` over an ``EmbeddingLayer`` (``self.embedding``)
and, for first-order terms, a 1-dim layer (``self.linear``; None where FM, DeepFM
or WDL take the term from the main embeddings, ``first_order: embedding``);
``forward(batch)`` returns logits ``[B]``. ``build_model`` assembles one from the config.
"""

from recemb.models.ctr.registry import MODELS, ModelNeeds, build_model, embedding_layers, model_needs

__all__ = ["MODELS", "ModelNeeds", "build_model", "embedding_layers", "model_needs"]
