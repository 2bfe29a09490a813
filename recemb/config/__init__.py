"""Typed config blocks and YAML loading: ``recemb.config.loader`` (generic, strict) and
``recemb.config.experiment`` (experiment blocks, ``load_experiment``)."""
