"""The shapes world: a procedural, seed-deterministic scene generator with exact ground truth.

It is the offline proving ground for the whole method (docs/experiments/): RGB images with a
caption and exact labels for all four perception tasks (semantic classes, instances, depth,
keypoints). A large captioned corpus of the full distribution stands in for the web data Stable
Diffusion was trained on; the 100 labelled images come from a narrower background slice; the test
splits cover the full distribution and a domain-shifted slice.

Conventions
- Pixel coordinates are continuous: pixel ``(row i, col j)`` covers ``[j, j+1) x [i, i+1)``, so its
  centre is ``(j + 0.5, i + 0.5)``. Keypoints use ``(x, y)`` in these units.
- Objects are ordered **far -> near** (painter's order) in ``instances``, ``instance_classes``,
  ``objects`` and ``keypoints``; instance ``k`` has id ``k + 1`` in ``instance_map``.
- Instance masks are the *visible* parts (after occlusion), so they are disjoint.
- Everything is drawn at ``supersample`` x resolution; the RGB image is box-downsampled (anti-aliased)
  and every label map comes from the same supersampled instance-id map by a per-pixel majority vote,
  so labels are exact for the geometry and consistent with each other.
- Depth is metres-like: objects are fronto-parallel at one depth each in [2, 8] (apparent size
  follows 1/depth, so depth is inferable from the image), the background is a plane from about 9
  (bottom) to 14 (top), always further than every object.

Longer than 400 lines: one world generator (scenes, rendering, every label, the splits) whose
parts only make sense together.
"""

from __future__ import annotations

import colorsys
import dataclasses
import math
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

# Class 0 is background; names are the words used in captions. Class ids never depend on the
# subset a config enables.
CLASSES: tuple[str, ...] = (
    "background", "circle", "square", "triangle", "cross", "ring", "star", "person",
)
CLASS_TO_ID: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}
# Star is kept out of the default set: near a circle/cross at small sizes, and every class costs
# the CPU-trained generator many samples.
DEFAULT_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "person")

# Named object colours (caption words) and their RGB values.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 40),
    "purple": (145, 60, 195),
    "orange": (250, 140, 30),
    "white": (248, 248, 248),
}
COLOUR_NAMES: tuple[str, ...] = tuple(PALETTE)

# COCO keypoint names and order; the stick figure shares head points (nose, eyes, ears) on its head disk.
KEYPOINT_NAMES: tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)
# COCO skeleton (0-based index pairs), for drawing previews.
SKELETON: tuple[tuple[int, int], ...] = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7),
    (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)

BACKGROUND_KINDS: tuple[str, ...] = ("flat", "gradient", "stripes", "checker", "noise")
BACKGROUND_TONES: tuple[str, ...] = ("light", "dark")
_KIND_WORDS = {"flat": "plain", "gradient": "gradient", "stripes": "striped",
               "checker": "checkered", "noise": "mottled"}
_TONE_WORDS = {"light": "", "dark": "dark "}

_ALL_BACKGROUNDS = tuple((k, t) for k in BACKGROUND_KINDS for t in BACKGROUND_TONES)
_LABELLED_BACKGROUNDS = (("flat", "light"), ("gradient", "light"))
# domain -> the (kind, tone) background pairs it draws from; 'shifted' is the complement of 'labelled'.
DOMAINS: dict[str, tuple[tuple[str, str], ...]] = {
    "full": _ALL_BACKGROUNDS,
    "labelled": _LABELLED_BACKGROUNDS,
    "shifted": tuple(p for p in _ALL_BACKGROUNDS if p not in _LABELLED_BACKGROUNDS),
}

# split name -> (domain, stream code). Example i of a split is a pure function of (seed, code, i).
SPLITS: dict[str, tuple[str, int]] = {
    "pretrain": ("full", 0),
    "train_labelled": ("labelled", 1),
    "test": ("full", 2),
    "test_shifted": ("shifted", 3),
}

MIN_DEPTH, MAX_DEPTH = 2.0, 8.0  # objects
# The background plane's depth at its bottom and top rows, each drawn per scene from these ranges.
BACKGROUND_NEAR, BACKGROUND_FAR = (9.0, 10.0), (11.5, 14.0)
SCENE_MAX_DEPTH = BACKGROUND_FAR[1]  # no pixel is further: a depth head's range must reach it


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    """What a scene may contain. Frozen so it can key caches and travel to grain workers."""

    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 3
    classes: tuple[str, ...] = DEFAULT_CLASSES
    domain: str = "full"
    supersample: int = 4
    # An object less visible than this (fraction of its own area) makes the layout be redrawn.
    min_visible_fraction: float = 0.5
    caption_background: bool = True

    def __post_init__(self):
        if self.domain not in DOMAINS:
            raise ValueError(f"domain must be one of {sorted(DOMAINS)}, got {self.domain!r}")
        unknown = [c for c in self.classes if c not in CLASS_TO_ID or c == "background"]
        if unknown or not self.classes:
            raise ValueError(f"unknown or empty classes: {unknown or self.classes}")
        if not 1 <= self.min_objects <= self.max_objects <= len(PALETTE):
            raise ValueError("need 1 <= min_objects <= max_objects <= number of colours")
        if self.image_size < 16:
            raise ValueError("image_size must be >= 16")

    @property
    def class_ids(self) -> tuple[int, ...]:
        return tuple(CLASS_TO_ID[c] for c in self.classes)


# ----------------------------------------------------------------------------------------------
# Geometry: every shape is drawn into a supersampled 'L' mask with PIL.


def _rot(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _regular_polygon(n: int, radius: float, angle: float) -> np.ndarray:
    t = angle - math.pi / 2 + 2 * math.pi * np.arange(n) / n
    return radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _star(radius: float, angle: float) -> np.ndarray:
    t = angle - math.pi / 2 + math.pi * np.arange(10) / 5
    rr = np.where(np.arange(10) % 2 == 0, radius, 0.42 * radius)
    return np.stack([rr * np.cos(t), rr * np.sin(t)], axis=1)


def _cross(radius: float, angle: float) -> np.ndarray:
    a, w = radius, 0.32 * radius
    pts = np.array([(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a),
                    (-w, w), (-a, w), (-a, -w), (-w, -w)], dtype=np.float64)
    return _rot(pts, angle)


def _person_joints(rng: np.random.Generator, r: float, angle: float) -> dict[str, np.ndarray]:
    """Joint positions (relative to the figure centre) of a randomly posed stick figure."""
    j: dict[str, np.ndarray] = {}
    head_r = 0.3 * r
    j["head"] = np.array([0.0, -1.0 * r])
    j["neck"] = np.array([0.0, -1.0 * r + head_r])
    j["pelvis"] = np.array([0.0, 0.22 * r])
    for side, sgn in (("left", 1.0), ("right", -1.0)):  # the figure faces the viewer
        sh = np.array([sgn * 0.3 * r, -0.56 * r])
        up = math.radians(rng.uniform(10, 150))  # 0 = hanging down, 90 = horizontal, 180 = up
        bend = up + math.radians(rng.uniform(-50, 60))
        el = sh + 0.48 * r * np.array([sgn * math.sin(up), math.cos(up)])
        wr = el + 0.44 * r * np.array([sgn * math.sin(bend), math.cos(bend)])
        hip = np.array([sgn * 0.2 * r, 0.22 * r])
        th = math.radians(rng.uniform(3, 35))
        shin = th + math.radians(rng.uniform(-25, 15))
        kn = hip + 0.55 * r * np.array([sgn * math.sin(th), math.cos(th)])
        an = kn + 0.55 * r * np.array([sgn * math.sin(shin), math.cos(shin)])
        j.update({f"{side}_shoulder": sh, f"{side}_elbow": el, f"{side}_wrist": wr,
                  f"{side}_hip": hip, f"{side}_knee": kn, f"{side}_ankle": an})
    h = j["head"]
    j["nose"] = h + np.array([0.0, 0.1 * r])
    j["left_eye"], j["right_eye"] = h + [0.12 * r, -0.06 * r], h + [-0.12 * r, -0.06 * r]
    j["left_ear"], j["right_ear"] = h + [0.27 * r, 0.0], h + [-0.27 * r, 0.0]
    return {k: _rot(v[None], angle)[0] for k, v in j.items()}


def _draw_object(obj: dict[str, Any], size: int, ss: int) -> np.ndarray:
    """Boolean amodal coverage mask of one object at ``size * ss`` resolution."""
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(canvas)
    centre = np.asarray(obj["center"])
    r, ang, cls = obj["radius"], obj["rotation"], obj["class_name"]

    def to_px(pts):  # continuous 1x coordinates -> supersampled pixel-index coordinates
        return [tuple(p) for p in ((np.asarray(pts) + centre) * ss - 0.5)]

    def disk(p, rad, fill=255):
        (x, y), = to_px(np.asarray(p)[None])
        draw.ellipse((x - rad * ss, y - rad * ss, x + rad * ss, y + rad * ss), fill=fill)

    if cls == "circle":
        disk((0, 0), r)
    elif cls == "ring":
        disk((0, 0), r)
        disk((0, 0), 0.55 * r, fill=0)
    elif cls == "square":
        draw.polygon(to_px(_regular_polygon(4, 0.8 * r * math.sqrt(2), ang + math.pi / 4)), fill=255)
    elif cls == "triangle":
        draw.polygon(to_px(_regular_polygon(3, 1.12 * r, ang)), fill=255)
    elif cls == "star":
        draw.polygon(to_px(_star(1.12 * r, ang)), fill=255)
    elif cls == "cross":
        draw.polygon(to_px(_cross(r, ang)), fill=255)
    elif cls == "person":
        j = obj["joints"]
        limb = max(0.2 * r, 2.2)
        torso = max(0.3 * r, 3.0)
        segs = [("neck", "pelvis", torso), ("left_shoulder", "right_shoulder", limb),
                ("left_hip", "right_hip", limb)]
        for s in ("left", "right"):
            segs += [(f"{s}_shoulder", f"{s}_elbow", limb), (f"{s}_elbow", f"{s}_wrist", limb),
                     (f"{s}_hip", f"{s}_knee", limb), (f"{s}_knee", f"{s}_ankle", limb)]
        for a, b, w in segs:
            draw.line(to_px([j[a], j[b]]), fill=255, width=max(1, round(w * ss)))
            disk(j[a], w / 2)
            disk(j[b], w / 2)
        disk(j["head"], 0.3 * r)
    else:  # pragma: no cover - guarded by ShapesConfig
        raise ValueError(cls)
    return np.asarray(canvas) > 127


# ----------------------------------------------------------------------------------------------
# Backgrounds, drawn at supersampled resolution as float RGB.


def _tone_colour(rng: np.random.Generator, tone: str) -> np.ndarray:
    h = rng.uniform()
    if tone == "light":
        s, v = rng.uniform(0.05, 0.3), rng.uniform(0.55, 0.8)
    else:
        s, v = rng.uniform(0.1, 0.45), rng.uniform(0.1, 0.3)
    return 255.0 * np.array(colorsys.hsv_to_rgb(h, s, v))


def _background(rng: np.random.Generator, kind: str, tone: str, n: int) -> np.ndarray:
    """(n, n, 3) float background of the given kind and tone."""
    c0 = _tone_colour(rng, tone)
    c1 = _tone_colour(rng, tone)
    if kind == "flat":
        return np.broadcast_to(c0, (n, n, 3)).copy()
    yy, xx = (np.mgrid[0:n, 0:n] + 0.5) / n  # in [0, 1)
    theta = rng.uniform(0, 2 * math.pi)
    u = xx * math.cos(theta) + yy * math.sin(theta)
    if kind == "gradient":
        t = (u - u.min()) / (u.max() - u.min())
    elif kind == "stripes":
        period = rng.uniform(0.1, 0.22)
        t = (np.floor(u / period) % 2).astype(np.float64)
    elif kind == "checker":
        cell = rng.uniform(0.1, 0.2)
        v = -xx * math.sin(theta) + yy * math.cos(theta)
        t = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float64)
    elif kind == "noise":
        g = rng.integers(4, 9)
        low = Image.fromarray((rng.uniform(size=(g, g)) * 255).astype(np.uint8))
        t = np.asarray(low.resize((n, n), Image.BICUBIC), dtype=np.float64) / 255.0
    else:  # pragma: no cover
        raise ValueError(kind)
    return c0 + t[..., None] * (c1 - c0)


# ----------------------------------------------------------------------------------------------
# Captions.


def caption_for(objects: Sequence[dict[str, Any]], background: tuple[str, str] | None = None) -> str:
    """Caption naming each object (left to right) with its colour, e.g.
    'a red circle and an orange person on a dark striped background'."""
    parts = []
    for o in sorted(objects, key=lambda o: o["center"][0]):
        phrase = f"{o['colour']} {o['class_name']}"
        parts.append(("an " if phrase[0] in "aeiou" else "a ") + phrase)
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    if background is not None:
        kind, tone = background
        text += f" on a {_TONE_WORDS[tone]}{_KIND_WORDS[kind]} background"
    return text


def caption_vocabulary() -> list[str]:
    """Every word `caption_for` can write: the closed vocabulary of the shapes-world tokenizer."""
    words = ["a", "an", "and", "on", "background", *_TONE_WORDS["dark"].split()]
    words += [c for c in CLASSES if c != "background"] + list(COLOUR_NAMES) + list(_KIND_WORDS.values())
    return list(dict.fromkeys(words))


# ----------------------------------------------------------------------------------------------
# Scenes.


def _size_range(n: int) -> tuple[float, float]:
    """Object 'radius' as a fraction of the image side: ~35-60 % diameter when alone."""
    return {1: (0.175, 0.3), 2: (0.13, 0.22)}.get(n, (0.11, 0.19))


def _sample_layout(rng: np.random.Generator, cfg: ShapesConfig, n: int,
                   colours: np.ndarray, classes: Sequence[str]) -> list[dict[str, Any]]:
    size = cfg.image_size
    lo, hi = _size_range(n)
    objs = []
    for k in range(n):
        frac = rng.uniform(lo, hi)
        r = frac * size
        cls = classes[k]
        depth = float(np.clip(0.9 / frac * rng.uniform(0.9, 1.1), MIN_DEPTH, MAX_DEPTH))
        m = 0.9 * r
        if cls == "person":
            m = np.array([0.7 * r, 1.1 * r])  # tall figure: keep most of it in view
        centre = rng.uniform(m, size - m, size=2)
        if cls in ("circle", "ring"):
            rot = 0.0
        elif cls == "person":
            rot = rng.uniform(-0.35, 0.35)
        else:
            rot = rng.uniform(0, 2 * math.pi)
        colour = COLOUR_NAMES[colours[k]]
        rgb = np.clip(np.array(PALETTE[colour]) + rng.integers(-10, 11, size=3), 0, 255)
        obj = {"class_name": cls, "class_id": CLASS_TO_ID[cls], "colour": colour,
               "rgb": tuple(int(c) for c in rgb), "center": (float(centre[0]), float(centre[1])),
               "radius": float(r), "rotation": float(rot), "depth": depth}
        if cls == "person":
            obj["joints"] = _person_joints(rng, r, rot)
        objs.append(obj)
    # Painter's order: far first. Ties are impossible in practice (continuous depths).
    return sorted(objs, key=lambda o: -o["depth"])


def render_scene(seed_or_rng: int | Sequence[int] | np.random.Generator,
                 config: ShapesConfig | None = None) -> dict[str, Any]:
    """Render one scene. Deterministic in the seed (an int, a sequence of ints or a Generator).

    Returns a dict: ``image`` uint8 (H,W,3); ``caption`` str; ``segmentation`` uint8 (H,W) class
    ids; ``instance_map`` uint8 (H,W) (0 background, k+1 instance k); ``instances`` bool (N,H,W)
    visible masks far->near; ``instance_classes`` int32 (N,); ``depth`` float32 (H,W);
    ``keypoints`` float32 (P,17,3) x, y, visibility for each person (far->near; COCO flags: 2
    visible, 1 hidden by a nearer object, 0 outside the image with x = y = 0); ``objects`` list of
    metadata dicts (far->near); ``background`` (kind, tone).
    """
    cfg = config or ShapesConfig()
    rng = seed_or_rng if isinstance(seed_or_rng, np.random.Generator) else np.random.default_rng(seed_or_rng)
    size, ss = cfg.image_size, cfg.supersample
    big = size * ss

    domain_bgs = DOMAINS[cfg.domain]
    bg_kind, bg_tone = domain_bgs[rng.integers(len(domain_bgs))]
    counts = np.arange(cfg.min_objects, cfg.max_objects + 1)
    weights = np.linspace(1.0, 0.625, len(counts))
    n = int(rng.choice(counts, p=weights / weights.sum()))
    colours = rng.choice(len(PALETTE), size=n, replace=False)
    classes = [cfg.classes[i] for i in rng.integers(len(cfg.classes), size=n)]

    # Redraw the layout until every object is visible enough; drop the last object if it never is.
    for attempt in range(40):
        if attempt and attempt % 10 == 0 and n > cfg.min_objects:
            n -= 1
            colours, classes = colours[:n], classes[:n]
        objs = _sample_layout(rng, cfg, n, colours, classes)
        masks = [_draw_object(o, size, ss) for o in objs]
        id4 = np.zeros((big, big), np.uint8)
        for k, m in enumerate(masks):
            id4[m] = k + 1
        vis = [(id4 == k + 1).sum() / max(m.sum(), 1) for k, m in enumerate(masks)]
        if min(vis) >= cfg.min_visible_fraction and all(m.sum() > 0 for m in masks):
            break
    for o, v in zip(objs, vis):
        o["visible_fraction"] = float(v)

    # RGB: supersampled composite, box-downsampled.
    rgb4 = _background(rng, bg_kind, bg_tone, big)
    for o, m in zip(objs, masks):
        rgb4[m] = o["rgb"]
    image = rgb4.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)

    # Labels: per-pixel majority of the supersampled instance ids (ties -> the farther id).
    votes = np.stack([(id4 == k).reshape(size, ss, size, ss).sum(axis=(1, 3)) for k in range(n + 1)])
    instance_map = votes.argmax(axis=0).astype(np.uint8)
    class_lut = np.array([0] + [o["class_id"] for o in objs], np.uint8)
    segmentation = class_lut[instance_map]
    instances = instance_map[None] == np.arange(1, n + 1, dtype=np.uint8)[:, None, None]

    rows = (np.arange(size, dtype=np.float32) + 0.5) / size
    bg_near, bg_far = rng.uniform(*BACKGROUND_NEAR), rng.uniform(*BACKGROUND_FAR)
    bg_depth = np.broadcast_to((bg_far - (bg_far - bg_near) * rows)[:, None], (size, size))
    depth_lut = np.array([0.0] + [o["depth"] for o in objs], np.float32)
    depth = np.where(instance_map > 0, depth_lut[instance_map], bg_depth).astype(np.float32)

    keypoints = []
    for k, o in enumerate(objs):
        if o["class_name"] != "person":
            continue
        kp = np.zeros((len(KEYPOINT_NAMES), 3), np.float32)
        for q, name in enumerate(KEYPOINT_NAMES):
            x, y = np.asarray(o["center"]) + o["joints"][name]
            if not (0 <= x < size and 0 <= y < size):
                continue  # v = 0: outside the image (COCO: x = y = 0)
            owner = id4[min(int(y * ss), big - 1), min(int(x * ss), big - 1)]
            kp[q] = (x, y, 1.0 if owner > k + 1 else 2.0)
        keypoints.append(kp)
        o["joints"] = {name: tuple(float(c) for c in o["joints"][name] + o["center"])
                       for name in o["joints"]}  # absolute coordinates, plain floats
    keypoints = np.stack(keypoints) if keypoints else np.zeros((0, len(KEYPOINT_NAMES), 3), np.float32)

    return {
        "image": image,
        "caption": caption_for(objs, (bg_kind, bg_tone) if cfg.caption_background else None),
        "segmentation": segmentation,
        "instance_map": instance_map,
        "instances": instances,
        "instance_classes": class_lut[1:].astype(np.int32),
        "depth": depth,
        "keypoints": keypoints,
        "objects": objs,
        "background": (bg_kind, bg_tone),
    }


# ----------------------------------------------------------------------------------------------
# Splits.


def split_config(name: str, config: ShapesConfig | None = None) -> ShapesConfig:
    """The config of a named split: ``config`` with the split's domain."""
    if name not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {name!r}")
    return dataclasses.replace(config or ShapesConfig(), domain=SPLITS[name][0])


class ShapesSource:
    """Random-access source of one split: item i is ``render_scene((seed, code, i), config)``.

    It has ``__len__``/``__getitem__``, so grain's ``MapDataset.source`` reads it directly; a huge
    ``num`` gives an effectively infinite pretraining corpus.
    """

    def __init__(self, name: str, num: int, seed: int = 0, config: ShapesConfig | None = None):
        self.name, self.num, self.seed = name, int(num), int(seed)
        self.config = split_config(name, config)
        self._code = SPLITS[name][1]

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if not 0 <= i < self.num:
            raise IndexError(i)
        return render_scene((self.seed, self._code, i), self.config)

    def __repr__(self) -> str:
        return f"ShapesSource({self.name!r}, num={self.num}, seed={self.seed}, config={self.config})"


def make_split(name: str, num: int, seed: int = 0, config: ShapesConfig | None = None) -> ShapesSource:
    """Split ``name`` ('pretrain', 'train_labelled', 'test', 'test_shifted') of ``num`` scenes."""
    return ShapesSource(name, num, seed, config)


# ----------------------------------------------------------------------------------------------
# Preview.


def _overlay(scene: dict[str, Any]) -> Image.Image:
    """Segmentation overlay with keypoints, to eyeball label/image agreement."""
    rng = np.random.default_rng(1)
    lut = rng.integers(0, 256, size=(len(CLASSES), 3)).astype(np.float32)
    lut[0] = 0
    img = scene["image"].astype(np.float32)
    seg = scene["segmentation"]
    out = np.where(seg[..., None] > 0, 0.35 * img + 0.65 * lut[seg], 0.5 * img)
    pil = Image.fromarray(out.astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for kp in scene["keypoints"]:
        for x, y, v in kp:
            if v > 0:
                col = (255, 255, 255) if v == 2 else (255, 0, 0)
                draw.point((x - 0.5, y - 0.5), fill=col)
    return pil


def save_preview(path: str, n: int = 16, split: str = "pretrain", seed: int = 0,
                 config: ShapesConfig | None = None, scale: int = 3) -> None:
    """Write a PNG grid: per scene, the image above its segmentation overlay (keypoints white =
    visible, red = occluded). Captions are printed to stdout in grid order."""
    src = make_split(split, n, seed, config)
    size = src.config.image_size
    cols = min(n, 8)
    rows = -(-n // cols)
    grid = Image.new("RGB", (cols * size, rows * 2 * size), (0, 0, 0))
    for i in range(n):
        scene = src[i]
        x, y = (i % cols) * size, (i // cols) * 2 * size
        grid.paste(Image.fromarray(scene["image"]), (x, y))
        grid.paste(_overlay(scene), (x, y + size))
        print(f"{i}: {scene['caption']}")
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    grid.save(path)


if __name__ == "__main__":
    import sys

    save_preview(sys.argv[1] if len(sys.argv) > 1 else "shapes_preview.png",
                 int(sys.argv[2]) if len(sys.argv) > 2 else 16)
