"""DatasetDM feature presets: UNet taps of a CFG batch -> per-resolution decoder inputs.

The UNet runs on a classifier-free-guidance batch of 2B rows, B unconditional then B
conditional. `extract(taps, preset, batch=B)` turns its taps into `Features`:

* `maps[res]`: (B, res, res, C_total). Each captured tensor x (2B, res, res, C) becomes
  [x[:B] | x[B:]] on channels (uncond C | cond C), i.e. an explicit split into halves. The
  official code reshapes (2, C, H, W) -> (1, 2C, H, W), which mixes images once B > 1; here row b
  is always image b. The tensors of one resolution are concatenated in forward order.
* `cross_attention[res]`: (B, res, res, L*H, T) probabilities of the conditional half, layers in
  the official `aggregate_attention` order (locations up, mid, down; forward order inside a
  location), heads within a layer.

SD 1.5 with a 64x64 latent (the paper's setting), `datasetdm` preset, 77 tokens, 8 heads:

| res | maps channels | tensors | cross-attention L*H x T |
|---|---|---|---|
| 64 | 5120  | conv_in, down0.layer0/1, up2.upsample, up3.layer0/1/2 | 40 x 77 (3080) |
| 32 | 9600  | down0.downsample, down1.layer0/1, up1.upsample, up2.layer0/1/2 | 40 x 77 (3080) |
| 16 | 16640 | down1.downsample, down2.layer0/1, up0.upsample, up1.layer0/1/2 | 40 x 77 (3080) |
| 8  | 17920 | down2.downsample, down3.layer0/1, mid, up0.layer0/1/2 | 8 x 77 (616) |

The presets read any UNet's taps, so they serve SDXL unchanged: its three levels at 1024 px (128x128
latents; no cross-attention at the first level, 10 transformer layers of 20 heads at the last):

| res | maps channels (`datasetdm`) | tensors | cross-attention L*H x T |
|---|---|---|---|
| 128 | 5120  | conv_in, down0.layer0/1, up1.upsample, up2.layer0/1/2 | none |
| 64  | 9600  | down0.downsample, down1.layer0/1, up0.upsample, up1.layer0/1/2 | 100 x 77 (7700) |
| 32  | 16640 | down1.downsample, down2.layer0/1, mid, up0.layer0/1/2 | 1200 x 77 (92400) |

The `lean` preset keeps only the up blocks' layer outputs and the mid block (64: 1920,
32: 3840, 16: 7680, 8: 10240 channels for SD 1.5; 128: 1920, 64: 3840, 32: 10240 for SDXL) and averages the cross-attention over layers
and heads: (B, res, res, 1, T).

Resolutions are keyed by the feature height; for non-square latents maps are (B, h, w, C).

VAE-decoder maps (`vae_maps`, a config's ``vae_features``): the UNet's finest map is at the
latent resolution (1/8 of a SD image, 1/4 of a 64 px shapes scene), too coarse for keypoints and
mask edges of small objects. The frozen VAE decoder turns the clean latent into the image through
maps at 2x, 4x, ... that resolution; `vae_maps` keeps the up-block outputs at the requested
resolutions (above the latent's), and `add_maps` adds them as extra `maps` levels. They cost
nothing extra in generation (the decoder runs anyway) and one VAE decode per image in training.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Features:
    """Decoder inputs per resolution (pytree; keys are the feature heights, e.g. 64, 32, 16, 8)."""

    maps: dict[int, jax.Array]
    cross_attention: dict[int, jax.Array]


@dataclasses.dataclass(frozen=True)
class Preset:
    """Which taps feed the decoder: a filter on map names and how cross-attention is reduced."""

    name: str
    keep_map: Callable[[str], bool]
    attention: Literal["all", "mean", "none"] = "all"


PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    """Adds a preset to the registry (name clash -> ValueError)."""
    if preset.name in PRESETS:
        raise ValueError(f"feature preset {preset.name!r} already registered")
    PRESETS[preset.name] = preset
    return preset


register_preset(Preset("datasetdm", keep_map=lambda name: True, attention="all"))
register_preset(Preset("lean", keep_map=lambda name: name == "mid" or bool(re.fullmatch(r"up\d+\.layer\d+", name)),
                       attention="mean"))

_LOCATION_RANK = {"conv_in": 0, "down": 1, "mid": 2, "up": 3}


def _forward_key(name: str) -> tuple:
    """Forward-execution order of a tap name (`conv_in`, `down1.layer0`, `up2.upsample`, `mid.layer0.block1`)."""
    loc, block, rest = re.fullmatch(r"(conv_in|down|mid|up)(\d*)\.?(.*)", name).groups()
    parts = []
    for piece in rest.split(".") if rest else []:
        m = re.fullmatch(r"(layer|block)(\d+)", piece)
        parts.append((0, int(m.group(2))) if m else (1, 0))  # (de)sampling comes after the layers
    return (_LOCATION_RANK[loc], int(block or 0), tuple(parts))


def _split_cfg(x: jax.Array, batch: int) -> jax.Array:
    if x.shape[0] != 2 * batch:
        raise ValueError(f"expected a CFG batch of {2 * batch} rows (uncond then cond), got {x.shape[0]}")
    return jnp.concatenate([x[:batch], x[batch:]], axis=-1)


def extract(taps: Mapping[str, Mapping[str, jax.Array]], preset: str | Preset, batch: int) -> Features:
    """UNet taps (from `capture=True` on a 2*`batch` CFG batch) -> `Features` of the named preset."""
    p = preset if isinstance(preset, Preset) else PRESETS.get(preset)
    if p is None:
        raise ValueError(f"unknown feature preset {preset!r} (known: {sorted(PRESETS)})")
    maps: dict[int, list] = {}
    shapes: dict[int, tuple[int, int]] = {}  # h*w -> (h, w), to fold attention rows back to 2-D
    for name in sorted(taps["maps"], key=_forward_key):
        x = taps["maps"][name]
        shapes[x.shape[1] * x.shape[2]] = x.shape[1:3]
        if p.keep_map(name):
            maps.setdefault(x.shape[1], []).append(_split_cfg(x, batch))
    attn: dict[int, dict[str, list]] = {}
    if p.attention != "none":
        for name in sorted(taps["cross_attention"], key=_forward_key):
            probs = taps["cross_attention"][name]  # (2B, H, h*w, T)
            if probs.shape[0] != 2 * batch:
                raise ValueError(f"expected a CFG batch of {2 * batch} rows, got {probs.shape[0]} in {name}")
            h, w = shapes[probs.shape[2]]
            cond = probs[batch:].reshape(batch, probs.shape[1], h, w, probs.shape[3]).transpose(0, 2, 3, 1, 4)
            loc = re.match(r"[a-z_]+", name).group(0)
            attn.setdefault(h, {"up": [], "mid": [], "down": []})[loc].append(cond)
    cross = {}
    for res, by_loc in attn.items():
        layers = by_loc["up"] + by_loc["mid"] + by_loc["down"]  # official aggregate_attention order
        a = jnp.concatenate(layers, axis=3)  # (B, h, w, L*H, T)
        cross[res] = a.mean(axis=3, keepdims=True) if p.attention == "mean" else a
    return Features(maps={res: jnp.concatenate(xs, axis=-1) for res, xs in maps.items()}, cross_attention=cross)


def vae_maps(taps: Mapping[str, jax.Array], resolutions: Sequence[int]) -> dict[int, jax.Array]:
    """VAE decoder taps (`AutoencoderKL.decode(z, capture=True)`) -> {res: (B, res, res, C)}: the
    up-block outputs at each requested resolution, concatenated in forward order."""
    by_res: dict[int, list] = {}
    for name in sorted(taps, key=lambda n: int(n[2:])):
        by_res.setdefault(int(taps[name].shape[1]), []).append(taps[name])
    missing = sorted(set(int(r) for r in resolutions) - set(by_res))
    if missing:
        raise ValueError(f"vae_features: the VAE decoder has maps at {sorted(by_res)}, not at {missing}")
    return {int(r): jnp.concatenate(by_res[int(r)], axis=-1) for r in resolutions}


def add_maps(feats: Features, extra: Mapping[int, jax.Array]) -> Features:
    """`feats` with more ``maps`` levels (e.g. `vae_maps`); a resolution it already has is an error."""
    clash = sorted(set(extra) & set(feats.maps))
    if clash:
        raise ValueError(f"feature maps at {clash} already come from the UNet; VAE maps must lie above them")
    return feats.replace(maps={**feats.maps, **{int(r): m for r, m in extra.items()}})


def with_capture(unet_apply: Callable, preset: str | Preset) -> Callable:
    """Wraps `unet_apply(latents, t, emb, capture=True) -> (eps, taps)` into `(eps, Features)` on a CFG batch."""

    def apply(latents: jax.Array, t, emb: jax.Array, **kwargs):
        eps, taps = unet_apply(latents, t, emb, capture=True, **kwargs)
        return eps, extract(taps, preset, latents.shape[0] // 2)

    return apply
