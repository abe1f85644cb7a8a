"""The project's configs (``get_config(arg=None)`` files), installed as ``datasetdm_jax.configs``.

`datasetdm_jax.config_utils.load_config` reads them by path, so ``--config configs/voc_semantic.py``
works in a checkout and ``--config voc_semantic`` wherever the package is installed.
"""
