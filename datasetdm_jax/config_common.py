"""Blocks shared by the ``configs/*.py`` files (as big_vision's ``configs/common.py``).

Each config file builds its base here and sets only what is its own, so a default shared by the
four shapes tasks, the five paper-scale P-Decoders or the downstream comparisons is written once.
Values marked "official" are those of the official DatasetDM code (github.com/showlab/DatasetDM).
"""

from __future__ import annotations

from typing import Any

import ml_collections

__all__ = ["check_variant", "shapes_pdecoder", "shapes_generate", "shapes_tiny", "sd14_pdecoder",
           "sd14_generate", "downstream", "downstream_task", "deeplab_v3plus"]

ConfigDict = ml_collections.ConfigDict


def check_variant(arg: str | None, *known: str) -> None:
    """Refuse a variant (``file.py:arg``) the config does not define, naming the ones it does."""
    if arg in (None, "") or arg in known:
        return
    expected = " or ".join([", ".join(repr(k) for k in known), "none"] if known else ["none"])
    raise ValueError(f"unknown variant {arg!r} (expected {expected})")


# --- P-Decoder training on the shapes world (configs/shapes_<task>.py) ---------------------------

def shapes_pdecoder(task: str, **training: Any) -> ConfigDict:
    """The shapes-world P-Decoder recipe for ``task``; ``training`` holds the task's own loss
    fields (set after ``lr``, in the given order). The caller adds ``decoder`` and ``generate``."""
    c = ConfigDict()
    c.task = task
    c.name = f"shapes_{task}"
    c.pipeline = ""                  # "" = the shipped shapes-world SD (datasetdm_jax/assets/shapes_sd)
    c.dtype = "auto"                 # the frozen SD's: bfloat16 on TPU/GPU, float32 on CPU (pretrained.DTYPES)
    c.workdir = f"runs/shapes_{task}"
    c.capture = "datasetdm"          # features preset: 'datasetdm' or 'lean'
    c.vae_features = ()              # VAE-decoder map resolutions added above the latent's (features.vae_maps)
    # Features of the latent noised to timestep 400, not the official 0 (DDPM set_timesteps(50) ->
    # timesteps[-1]): semantic test mIoU 0.411 against 0.362 at 0 (3,000 steps, deep supervision,
    # 14,000-step model; docs/experiments/decoder_recipes.md); generation reads them with
    # `generate.feature_pass=renoise`.
    c.timestep = 400
    c.cache_features = True          # SD pass once per (image, mirror) into a feature bank (train.py)
    c.seed = 42
    c.steps = 3000
    c.max_steps = 0                  # > 0: stop this invocation after that many steps (resumable)
    c.batch_size = 4
    # Adam, no weight decay (official); lr 1e-3, not the official 1e-4: semantic test mIoU 0.295
    # against 0.257 at 1,000 steps, depth REL 0.137 against 0.136 at 2,000.
    c.lr = 1e-3
    c.update(training)
    c.log_every = 10
    c.eval_every = 500
    # A val metric (e.g. 'AP'; 'rel' and 'rmse' are minimised): the decoder of its best score is the one
    # tested and loaded (early stopping); '' = the last step's.
    c.select_metric = ""
    # `datasetdm baseline`: the scratch backbone's base width; vae_round_trip: a control that shows
    # the scratch model only what the SD's latent keeps of each image (baselines.input_transform).
    c.baseline = ConfigDict(dict(width=32, vae_round_trip=False))
    c.checkpoint_every_s = 300.0
    c.keep_checkpoints = 2
    c.data = ConfigDict(dict(split="train_labelled", num_images=100, seed=0, image_size=64, flip=True))
    # val: scored every eval_every steps (test-distribution scenes of another seed); eval: the test
    # split, scored once at the end into results.json.
    c.val = ConfigDict(dict(split="test", seed=1, num_images=32, batch_size=8))
    c.eval = ConfigDict(dict(split="test", seed=0, num_images=256, batch_size=8))
    return c


def shapes_generate(prompts: dict[str, Any] | None = None, **labels: Any) -> ConfigDict:
    """``datasetdm generate`` settings for a shapes config: prompts (kind shapes, templates or file;
    see datasetdm_jax/prompts.py; ``prompts`` changes or adds fields), sampler, and the labeller
    ('decoder': the P-Decoder `datasetdm train` wrote to `workdir`; other names come from
    datasetdm_jax.labelers). ``labels``: the task's label post-processing settings (and any of the
    defaults here that the task sets otherwise)."""
    p = dict(kind="shapes", seed=0, domain="full", path="", classes=(), templates=(), max_classes=1)
    p.update(prompts or {})
    g = dict(
        prompts=ConfigDict(p),
        steps=25, guidance=7.5, scheduler="pndm", negative_prompt="", batch_size=16, seed=0,
        labeler="decoder", shard_size=256, image_format="png", formats=("tfrecord", "array_record"),
        feature_pass="renoise",      # the decoders read features at their training timestep (400)
        # labels follow the prompt (datasetdm_jax/labelers/grounding.py); "none": argmax over all classes
        grounding="prompt", grounding_threshold=0.0,
        param_sharding="replicated",  # or "fsdp": large SD weights split over the devices (sharding.py)
    )
    return ConfigDict({**g, **labels})


def shapes_tiny(c: ConfigDict) -> ConfigDict:
    """The ``:tiny`` variant's shared part (few steps and images, 32 px; for tests), in place; the
    caller shrinks its decoder and task fields."""
    c.steps, c.batch_size, c.log_every, c.eval_every, c.lr = 4, 2, 1, 2, 1e-3
    c.data.num_images, c.data.image_size = 8, 32
    c.eval.num_images, c.eval.batch_size = 4, 2
    c.val.num_images, c.val.batch_size = 2, 2
    c.generate.steps, c.generate.batch_size, c.generate.shard_size = 2, 2, 3
    return c


# --- P-Decoders on the paper's datasets through SD 1.4 (voc_semantic.py, coco_pose.py, ...) -------

def sd14_pdecoder(task: str, name: str, *, steps: int, eval_every: int, data: dict[str, Any], eval_split: str,
                  eval_images: int, **training: Any) -> ConfigDict:
    """The official recipe for ``task`` on a real dataset; ``training`` holds the task's own
    fields (set after ``max_steps``, in the given order), ``data`` the training-set selection, and
    ``eval_split``/``eval_images`` the split scored at the end (100 of its images every
    ``eval_every`` steps). The caller adds ``decoder`` and ``generate``."""
    c = ConfigDict()
    c.task = task
    c.name = name
    # A Hugging Face repo id (safetensors fetched once into the HF cache) or a local diffusers folder.
    c.pipeline = "CompVis/stable-diffusion-v1-4"  # official
    c.dtype = "auto"                 # the frozen SD's: bfloat16 on TPU/GPU, float32 on CPU (pretrained.DTYPES)
    c.workdir = f"runs/{name}"
    c.capture = "datasetdm"          # official: 28 UNet maps + cond cross-attention of all 16 layers
    c.vae_features = ()              # not in the paper: VAE-decoder maps, e.g. (128,) (features.vae_maps)
    c.timestep = 0                   # official: DDPM set_timesteps(50) -> timesteps[-1] = 0
    c.cache_features = False         # 200 rows of 512 px SD features take GBs of device memory
    c.seed = 42                      # official: seed_everything(42)
    c.batch_size = 1                 # official: batch 1 (ours works at any batch size)
    # Official: Adam, no weight decay; StepLR x0.1 every 350 epochs (400 for NYU and pose), not yet in
    # train.py (constant lr).
    c.lr = 1e-4
    c.steps = steps
    c.max_steps = 0
    c.update(training)
    c.log_every = 50
    c.eval_every = eval_every
    c.select_metric = ""             # off: val here is drawn from the split that is tested
    c.checkpoint_every_s = 600.0
    c.keep_checkpoints = 2
    c.data = ConfigDict(data)
    c.val = ConfigDict(dict(split=eval_split, seed=1, num_images=100, batch_size=1))  # every eval_every
    c.eval = ConfigDict(dict(split=eval_split, seed=0, num_images=eval_images, batch_size=1))  # at end
    return c


def sd14_generate(guidance: float = 5.0, prompts: dict[str, Any] | None = None, **labels: Any) -> ConfigDict:
    """The whole ``datasetdm generate`` section of a paper-scale config: generation as in the official
    code (PNDM/PLMS, 50 steps, CFG ``guidance``, features of the last step, i.e. timestep 0, where the
    decoders were trained), one prompt per image naming one class, labels that follow the prompt.

    ``prompts`` changes or adds prompt-source fields (datasetdm_jax/prompts.py); the default is the
    official form "a photo of a {class}" over the dataset's own classes (``classes=()``: the classes
    the decoder knows, background left out; COCO's come from its annotation file). ``labels``: the
    task's label post-processing settings (``min_area``, ``score_threshold``, ``keypoint_threshold``,
    ...; datasetdm_jax/decoders/postprocess.py) and any default here the dataset sets otherwise.
    Every key is present, so any of them can be set from the command line (``generate.batch_size=16``).
    """
    p = dict(kind="templates", classes=(), templates=("a photo of {a_class}",), max_classes=1, seed=0, path="")
    p.update(prompts or {})
    g = dict(
        prompts=ConfigDict(p),
        scheduler="pndm", steps=50, guidance=guidance,   # official: PLMS 50 steps (CFG 5; VOC 7)
        negative_prompt="", batch_size=8, seed=0,
        labeler="decoder",            # the P-Decoder `datasetdm train` wrote to `workdir`
        feature_pass="last_step",     # official: the last sampler step's features (timestep 0)
        # labels follow the prompt (datasetdm_jax/labelers/grounding.py): classes a prompt does not
        # name are removed before the argmax; grounding_always lists classes allowed in every image
        grounding="prompt", grounding_threshold=0.0, grounding_always=(),
        shard_size=256,
        image_format="jpeg",          # 512 px photos: JPEG (quality 95); labels are always PNG
        formats=("tfrecord", "array_record"),  # shard files written: either or both
        param_sharding="replicated",  # or "fsdp": large SD weights split over the devices (sharding.py)
    )
    return ConfigDict({**g, **labels})


# --- Downstream comparisons (configs/downstream_<dataset>.py) ------------------------------------

def downstream(name: str, tasks: tuple[str, ...], *, real: dict[str, Any], test: dict[str, Any],
               scale: tuple[float, float], crop: tuple[int, int], eval_batch_size: int,
               max_depth: float = 0.0) -> ConfigDict:
    """Rows (a) real, (b) synthetic, (c) real + synthetic (half of each batch synthetic) for
    ``tasks``; ``real``/``test`` are the data-source settings, ``scale``/``crop`` the training
    augmentation, ``max_depth`` the depth evaluation cap (0: none). The caller adds one
    :func:`downstream_task` block per task."""
    c = ConfigDict()
    c.name = name
    c.workdir = f"runs/{name}"
    c.tasks = tasks
    c.rows = ("real", "synthetic", "real+synthetic")
    c.synthetic_fraction = 0.5          # share of each (c) batch drawn from the synthetic set
    c.real = ConfigDict(real)
    # records: the folder `datasetdm generate` wrote; num 0 = all records; min_quality > 0 leaves
    # out records below that annotation confidence (0 = no filter).
    c.synthetic = ConfigDict(dict(records="", num=0, min_quality=0.0))
    c.test = ConfigDict(test)
    c.augment = ConfigDict(dict(enabled=True, flip=True, scale=scale, crop=crop, scale_depth=True))
    c.eval = ConfigDict(dict(batch_size=eval_batch_size, min_depth=1e-3, max_depth=max_depth))
    return c


def downstream_task(task: str, num_classes: int, steps: int, model: dict[str, Any], *, batch_size: int = 16,
                    lr: float = 1e-3, warmup_steps: int = 500, log_every: int = 50) -> ConfigDict:
    """One downstream model's training (AdamW, weight decay 1e-4, grad clip 1, SILog depth loss);
    the defaults are the paper-scale ones."""
    return ConfigDict(dict(
        task=task, num_classes=num_classes, steps=steps, batch_size=batch_size, lr=lr, weight_decay=1e-4,
        warmup_steps=warmup_steps, grad_clip=1.0, seed=0, log_every=log_every, depth_loss="silog", model=model))


def deeplab_v3plus() -> dict[str, Any]:
    """DeepLabv3+-like segmenter widths (trained from scratch, no ImageNet backbone)."""
    return dict(stages=((64, 2, 1), (128, 2, 1), (256, 2, 1), (512, 1, 2)), depth=3, aspp_width=256,
                aspp_rates=(6, 12, 18), skip_stage=1, skip_width=48, decoder_width=256)
