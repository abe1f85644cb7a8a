"""CLIP text encoder: parity with transformers' CLIPTextModel, SD parameter counts, weight-loading errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from datasetdm_jax.convert import WeightsError, load_torch_state_dict, torch_key
from datasetdm_jax.models import presets
from datasetdm_jax.models.clip_text import POSITION_IDS_KEY, CLIPTextConfig, CLIPTextModel
from tiny_sd import rel_err

BATCH, SEQ, VOCAB = 3, 77, 100
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    layer_norm_eps=1e-5,
    bos_token_id=VOCAB - 2,
    pad_token_id=1,
    projection_dim=16,
)
# quick_gelu with the legacy eos_token_id == 2 (argmax pooling, as SD's configs);
# gelu with a real, non-maximal eos id (first-occurrence pooling; padding repeats the eos id), so the
# two pooling rules pick different tokens.
LEGACY_EOS_ID, EOS_ID = VOCAB - 1, 3
CASES = {
    "quick_gelu": dict(hidden_act="quick_gelu", eos_token_id=2),
    "gelu": dict(hidden_act="gelu", eos_token_id=EOS_ID),
}


def _torch_model(config: dict) -> transformers.CLIPTextModel:
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(**config)
    cfg._attn_implementation = "eager"
    model = transformers.CLIPTextModel(cfg).eval()
    with torch.no_grad():  # random everything, so every LayerNorm scale/bias is exercised
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.2 * torch.randn_like(p))
    return model


def _checkpoint_sd(model: transformers.CLIPTextModel) -> dict[str, np.ndarray]:
    """State dict as stored on disk: transformers >= 5 dropped the `text_model.` prefix in memory."""
    sd = {}
    for k, v in model.state_dict().items():
        k = k if k.startswith("text_model.") else "text_model." + k
        sd[k] = v.numpy()
    sd[POSITION_IDS_KEY] = np.arange(model.config.max_position_embeddings)[None]  # legacy buffer
    return sd


def _input_ids(config_eos: int) -> np.ndarray:
    """BOS, random words, EOS, then padding: like CLIP's vocabulary, the legacy EOS is the largest id."""
    rng = np.random.default_rng(0)
    ids = rng.integers(EOS_ID + 1, VOCAB - 2, size=(BATCH, SEQ))
    eos_id, pad_id = (LEGACY_EOS_ID, 1) if config_eos == 2 else (EOS_ID, EOS_ID)
    ids[:, 0] = VOCAB - 2
    for b, n in enumerate([5, 40, SEQ - 1]):
        ids[b, n] = eos_id
        ids[b, n + 1 :] = pad_id
    return ids


@pytest.fixture(scope="module", params=sorted(CASES))
def parity(request):
    config = {**TINY, **CASES[request.param]}
    pt = _torch_model(config)
    ids = _input_ids(config["eos_token_id"])
    with torch.no_grad():
        ref = pt(input_ids=torch.from_numpy(ids), output_hidden_states=True)
    model = CLIPTextModel(config, rngs=nnx.Rngs(0))
    load_torch_state_dict(model, _checkpoint_sd(pt), ignore={POSITION_IDS_KEY})
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids):
        m = nnx.merge(graphdef, state)
        return m(ids, output_hidden_states=True), m.encode(ids, clip_skip=1)

    out, skip1 = run(state, jnp.asarray(ids))
    with torch.no_grad():
        ref_skip1 = pt.final_layer_norm(ref.hidden_states[-2]).numpy()
    return ref, out, skip1, ref_skip1


def test_last_hidden_state_and_pooler_match_transformers(parity):
    ref, out, _, _ = parity
    assert out.last_hidden_state.shape == (BATCH, SEQ, TINY["hidden_size"])
    assert rel_err(out.last_hidden_state, ref.last_hidden_state.numpy()) < 1e-4
    assert rel_err(out.pooler_output, ref.pooler_output.numpy()) < 1e-4


def test_hidden_states_match_transformers(parity):
    ref, out, _, _ = parity
    assert len(out.hidden_states) == len(ref.hidden_states) == TINY["num_hidden_layers"] + 1
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        assert rel_err(ours, theirs.numpy()) < 1e-4


def test_clip_skip_matches_penultimate_layer_through_final_norm(parity):
    _, _, skip1, ref_skip1 = parity
    assert rel_err(skip1, ref_skip1) < 1e-4


@pytest.mark.parametrize(
    "config, expected",
    [
        (presets.SD15_TEXT_ENCODER, presets.SD15_TEXT_ENCODER_PARAMS),
        (presets.SD21_TEXT_ENCODER, presets.SD21_TEXT_ENCODER_PARAMS),
    ],
    ids=["sd15", "sd21"],
)
def test_sd_text_encoder_param_count_and_keys(config, expected):
    abstract = nnx.eval_shape(lambda: CLIPTextModel(config, rngs=nnx.Rngs(0)))
    flat = list(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    ours = sum(int(np.prod(v.shape)) for _, v in flat)
    with torch.device("meta"):
        pt = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config))
    theirs = sum(p.numel() for p in pt.parameters())
    assert ours == theirs == expected
    assert {torch_key(p) for p, _ in flat} == {"text_model." + k for k, _ in pt.named_parameters()}


@pytest.fixture(scope="module")
def tiny():
    config = {**TINY, **CASES["quick_gelu"]}
    sd = _checkpoint_sd(_torch_model(config))
    return config, sd


def test_missing_tensor_is_named(tiny):
    config, sd = tiny
    key = "text_model.encoder.layers.1.mlp.fc1.weight"
    sd = {k: v for k, v in sd.items() if k != key}
    with pytest.raises(WeightsError, match=f"missing {key}"):
        load_torch_state_dict(CLIPTextModel(config, rngs=nnx.Rngs(0)), sd, ignore={POSITION_IDS_KEY})


def test_misshaped_tensor_is_named(tiny):
    config, sd = tiny
    key = "text_model.embeddings.token_embedding.weight"
    sd = {**sd, key: sd[key][:-1]}
    before = dict(sd)
    model = CLIPTextModel(config, rngs=nnx.Rngs(0))
    with pytest.raises(WeightsError, match=key):
        load_torch_state_dict(model, sd, ignore={POSITION_IDS_KEY})
    assert sd.keys() == before.keys()  # nothing consumed, nothing half-loaded


def test_loading_moves_the_tensors_out_of_the_state_dict(tiny):
    """Each tensor leaves the state dict as its device copy enters the model: loading never holds
    the weights twice (numpy and device), only the ignored buffers stay behind."""
    config, sd = tiny
    sd = dict(sd)
    model = CLIPTextModel(config, rngs=nnx.Rngs(0))
    load_torch_state_dict(model, sd, ignore={POSITION_IDS_KEY})
    assert set(sd) <= {POSITION_IDS_KEY}
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_config_validation():
    assert CLIPTextConfig.from_dict(presets.SD21_TEXT_ENCODER).hidden_act == "gelu"
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig.from_dict({**TINY, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="clip_skip"):
        CLIPTextModel(TINY, rngs=nnx.Rngs(0)).encode(jnp.zeros((1, 4), jnp.int32), clip_skip=4)


def test_bf16_compute_stays_close_to_fp32(tiny):
    config, sd = tiny
    ids = jnp.asarray(_input_ids(2)[:1, :16])
    outs = []
    for dtype in (jnp.float32, jnp.bfloat16):
        model = CLIPTextModel(config, dtype=dtype, rngs=nnx.Rngs(0))
        load_torch_state_dict(model, dict(sd), ignore={POSITION_IDS_KEY})
        outs.append(model.encode(ids))
    assert outs[1].dtype == jnp.bfloat16
    assert rel_err(outs[1].astype(jnp.float32), outs[0]) < 5e-2
