"""Anomaly models over categorical events (APE) and their noise sampler, one per file.

``registry`` registers them in ``recemb.models.registry``; each model owns its objective
(noise-contrastive loss) and its metrics (ROC AUC and average precision with the anomaly
as positive, precision@k, recall@k).
"""
