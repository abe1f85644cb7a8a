"""Package discovery beside pyproject.toml (which holds everything else).

The repository's top-level ``configs/`` folder ships inside the package as ``datasetdm_jax.configs``,
in wheels and editable installs alike; pyproject.toml alone cannot add a folder mapped from elsewhere
to an automatic package search.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["datasetdm_jax", "datasetdm_jax.*"]) + ["datasetdm_jax.configs"],
    package_dir={"datasetdm_jax.configs": "configs"},
)
