"""models.deepen: a UNet grown to more layers per block computes what the trained one did."""

import jax
import numpy as np
import pytest
from flax import nnx

from datasetdm_jax.models.deepen import deepen_unet_params
from datasetdm_jax.models.unet import UNet2DConditionModel
from test_unet import SD1_TINY, SD2_TINY, inputs, jax_unet, torch_unet


def _params(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("config,layers", [(SD1_TINY, 2), (SD1_TINY, 3), (SD2_TINY, 2)],
                         ids=["sd1-2", "sd1-3", "sd2-linear-2"])
def test_deepened_unet_is_the_same_function(config, layers):
    trained = jax_unet(config, torch_unet(config))  # random weights, no zero convs anywhere
    fresh = UNet2DConditionModel({**config, "layers_per_block": layers}, rngs=nnx.Rngs(3))
    grown = deepen_unet_params(_params(trained), _params(fresh), 1, layers)
    graph, state = nnx.split(fresh)
    nnx.update(state, grown)
    deep = nnx.merge(graph, state)

    x, ctx = inputs(config)
    t = np.array([10, 900])
    want, got = np.asarray(trained(x, t, ctx)), np.asarray(deep(x, t, ctx))
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # ...yet the new layers are not all zero: their first convs keep the fresh random weights.
    new_conv1 = grown["down_blocks"][0]["resnets"][layers - 1]["conv1"]["kernel"]
    assert np.array_equal(new_conv1, _params(fresh)["down_blocks"][0]["resnets"][layers - 1]["conv1"]["kernel"])
    assert np.abs(new_conv1).max() > 0


def test_deepening_cannot_shrink():
    p = _params(UNet2DConditionModel(SD1_TINY, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="cannot go from 2 to 1"):
        deepen_unet_params(p, p, 2, 1)
