"""Feature capture: UNet taps vs PyTorch forward hooks / attention probabilities, presets, jit."""

import re
from collections import OrderedDict

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from datasetdm_jax import features
from datasetdm_jax.convert import load_torch_state_dict
from datasetdm_jax.models import presets
from datasetdm_jax.models.unet import UNet2DConditionModel

import diffusers
import torch
from tiny_sd import rel_err

# Cross-attention at every level so resolution 8 gets up, mid and down layers (ordering check).
TINY = {
    "sample_size": 16,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "attention_head_dim": 2,
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
}
B = 3  # images; the CFG batch has 2B rows
TOKENS = 7


class RecordingProcessor:
    """Plain softmax attention that also stores cross-attention probabilities (B, H, Lq, Lk)."""

    def __init__(self, store: dict, name: str):
        self.store, self.name = store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(context))
        v = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(q, k, None)
        if encoder_hidden_states is not None:
            b = hidden_states.shape[0]
            self.store[self.name] = probs.reshape(b, attn.heads, *probs.shape[1:]).numpy()
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def our_name(torch_name: str) -> str:
    """`down_blocks.0.attentions.1.transformer_blocks.0.attn2.processor` -> `down0.layer1.block0`."""
    p = torch_name.split(".")
    if p[0] == "mid_block":
        return f"mid.layer{p[2]}.block{p[4]}"
    return f"{p[0].split('_')[0]}{p[1]}.layer{p[3]}.block{p[5]}"


def torch_taps(model, x, t, ctx):
    """Reference taps via forward hooks on the modules DatasetDM reads, in call order."""
    maps, attn, handles = OrderedDict(), {}, []

    def hook(name):
        def fn(module, args, output):
            out = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
            maps[name] = out.permute(0, 2, 3, 1).numpy()
        return fn

    handles.append(model.conv_in.register_forward_hook(hook("conv_in")))
    for kind, blocks in (("down", model.down_blocks), ("up", model.up_blocks)):
        for i, block in enumerate(blocks):
            layers = block.attentions if getattr(block, "attentions", None) is not None else block.resnets
            for j, layer in enumerate(layers):
                handles.append(layer.register_forward_hook(hook(f"{kind}{i}.layer{j}")))
            for sampler in ("downsamplers", "upsamplers"):
                if getattr(block, sampler, None) is not None:
                    handles.append(getattr(block, sampler)[0].register_forward_hook(hook(f"{kind}{i}.{sampler[:-2]}")))
    handles.append(model.mid_block.register_forward_hook(hook("mid")))
    model.set_attn_processor({n: RecordingProcessor(attn, n) for n in model.attn_processors})
    with torch.no_grad():
        eps = model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.tensor(t), torch.from_numpy(ctx)).sample
    for h in handles:
        h.remove()
    cross = OrderedDict((our_name(n), p) for n, p in attn.items())  # insertion = call order
    return eps.permute(0, 2, 3, 1).numpy(), maps, cross


@pytest.fixture(scope="module")
def run():
    torch.manual_seed(0)
    pt = diffusers.UNet2DConditionModel.from_config(TINY).eval()
    with torch.no_grad():
        for name, p in pt.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
    model = UNet2DConditionModel(TINY, rngs=nnx.Rngs(0))
    load_torch_state_dict(model, {k: v.numpy() for k, v in pt.state_dict().items()})
    graphdef, state = nnx.split(model)

    @jax.jit
    def apply_capture(state, x, t, ctx):
        eps, taps = nnx.merge(graphdef, state)(x, t, ctx, capture=True)
        return eps, taps, features.extract(taps, "datasetdm", B), features.extract(taps, "lean", B)

    @jax.jit
    def apply_plain(state, x, t, ctx):  # the fused kernel: capture must not change the result
        return nnx.merge(graphdef, state)(x, t, ctx, attention_kernel="dot_product")

    rng = np.random.default_rng(0)
    x = np.tile(rng.standard_normal((B, 16, 16, 4)).astype(np.float32), (2, 1, 1, 1))  # same latent per image
    ctx = rng.standard_normal((2 * B, TOKENS, 32)).astype(np.float32)
    t = np.float32(1.0)
    ref = torch_taps(pt, x, t, ctx)
    ours = apply_capture(state, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx))
    plain = apply_plain(state, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx))
    return ref, ours, plain


def test_taps_match_torch_hooks(run):
    (eps_pt, maps_pt, cross_pt), (eps, taps, _, _), _ = run
    assert rel_err(eps, eps_pt) < 1e-4
    assert list(taps["maps"]) == list(maps_pt)  # same names, same forward order
    assert list(taps["maps"])[:4] == ["conv_in", "down0.layer0", "down0.downsample", "down1.layer0"]
    for name, ref in maps_pt.items():
        assert taps["maps"][name].shape == ref.shape, name
        assert rel_err(taps["maps"][name], ref) < 1e-4, name
    assert list(taps["cross_attention"]) == list(cross_pt)
    for name, ref in cross_pt.items():
        got = taps["cross_attention"][name]
        assert got.dtype == jnp.float32 and got.shape == ref.shape, name
        assert rel_err(got, ref) < 1e-4, name


def test_datasetdm_preset_rows_are_per_image(run):
    (_, maps_pt, cross_pt), (_, _, feats, _), _ = run
    buckets = {}
    for name, x in maps_pt.items():  # forward order
        buckets.setdefault(x.shape[1], []).append(np.concatenate([x[:B], x[B:]], axis=-1))
    assert sorted(feats.maps) == sorted(buckets) == [8, 16]
    for res, xs in buckets.items():
        assert rel_err(feats.maps[res], np.concatenate(xs, axis=-1)) < 1e-4
        # Row b holds image b only: uncond row b then cond row b of the first tensor.
        first = maps_pt[next(n for n, v in maps_pt.items() if v.shape[1] == res)]
        c = first.shape[-1]
        for b in range(B):
            np.testing.assert_allclose(feats.maps[res][b, ..., :c], first[b], rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(feats.maps[res][b, ..., c:2 * c], first[B + b], rtol=1e-4, atol=1e-4)
    # Cross-attention: conditional half, locations up, mid, down (forward order inside), heads within a layer.
    location = lambda n: ["up", "mid", "down"].index(re.match(r"[a-z]+", n).group(0))
    for res in (16, 8):
        names = sorted((n for n, p in cross_pt.items() if p.shape[2] == res * res), key=location)  # stable
        expect = np.concatenate(
            [cross_pt[n][B:].reshape(B, -1, res, res, TOKENS).transpose(0, 2, 3, 1, 4) for n in names], axis=3
        )
        assert rel_err(feats.cross_attention[res], expect) < 1e-4
        if res == 8:
            assert names == ["up0.layer0.block0", "up0.layer1.block0", "mid.layer0.block0", "down1.layer0.block0"]


def test_preset_shapes(run):
    _, (_, _, feats, lean), _ = run
    # res 16: conv_in 32, down0.layer0 32, up0.upsample 64, up1.layer0/1 32 each;
    # res 8: down0.downsample 32, down1.layer0 64, mid 64, up0.layer0/1 64 each. Doubled by uncond|cond.
    assert {r: v.shape for r, v in feats.maps.items()} == {16: (B, 16, 16, 2 * 192), 8: (B, 8, 8, 2 * 288)}
    heads = {16: 3 * 2, 8: 4 * 2}  # (down0, up1 x2) and (down1, mid, up0 x2) layers x 2 heads
    assert {r: v.shape for r, v in feats.cross_attention.items()} == {
        r: (B, r, r, lh, TOKENS) for r, lh in heads.items()
    }
    # lean: up layers + mid only, attention averaged over layers and heads.
    assert {r: v.shape for r, v in lean.maps.items()} == {16: (B, 16, 16, 2 * 64), 8: (B, 8, 8, 2 * 192)}
    for res in heads:
        assert lean.cross_attention[res].shape == (B, res, res, 1, TOKENS)
        np.testing.assert_allclose(lean.cross_attention[res], feats.cross_attention[res].mean(3, keepdims=True),
                                   rtol=1e-5, atol=1e-6)


def test_capture_off_matches_capture_on(run):
    _, (eps, _, _, _), plain = run
    # Two different XLA programs: fp32 reassociation moves a few values by ~1e-6 (seen: 1.3e-6).
    np.testing.assert_allclose(plain, eps, rtol=1e-5, atol=1e-5)


def test_sd15_channel_counts():
    """Abstract SD 1.5 forward on a 64x64 latent reproduces the paper's decoder input widths."""
    abstract = nnx.eval_shape(lambda: UNet2DConditionModel(presets.SD15_UNET, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)

    def f(state, x, ctx):
        _, taps = nnx.merge(graphdef, state)(x, 1.0, ctx, capture=True)
        return features.extract(taps, "datasetdm", 1), features.extract(taps, "lean", 1), taps

    full, lean, taps = jax.eval_shape(f, state, jax.ShapeDtypeStruct((2, 64, 64, 4), jnp.float32),
                                      jax.ShapeDtypeStruct((2, 77, 768), jnp.float32))
    assert len(taps["maps"]) == 28 and len(taps["cross_attention"]) == 16
    assert {r: v.shape[-1] for r, v in full.maps.items()} == {64: 5120, 32: 9600, 16: 16640, 8: 17920}
    assert {r: v.shape for r, v in full.cross_attention.items()} == {
        r: (1, r, r, 8 if r == 8 else 40, 77) for r in (64, 32, 16, 8)
    }
    assert {r: v.shape[-1] for r, v in lean.maps.items()} == {64: 1920, 32: 3840, 16: 7680, 8: 10240}
