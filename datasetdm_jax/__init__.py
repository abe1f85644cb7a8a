"""datasetdm-jax: DatasetDM in JAX/Flax.

Importing the package gives JAX's CPU backend one device per core (`devices.use_host_cores`, as the
CLI does), so a Python user's batches are split over the cores like the CLI's. Nothing changes on
accelerators, once JAX has started its backends, or where ``XLA_FLAGS`` or
``DATASETDM_HOST_DEVICES`` (1 = off) says otherwise.
"""

from datasetdm_jax import devices

__version__ = "0.1.0"

devices.use_host_cores()
