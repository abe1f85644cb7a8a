"""A tiny Stable Diffusion trained from scratch on the shapes world (docs/experiments/shapes_sd.md).

Run: ``datasetdm pretrain --config configs/shapes_sd.py --workdir runs/shapes_sd`` (rerun the same
command to resume). Variants: ``configs/shapes_sd.py:tiny`` (seconds; tests and smoke runs).

Two stages share one workdir: ``vae`` (an AutoencoderKL, 64 px images -> 16x16x4 latents, trained
first) and ``diffusion`` (UNet2DConditionModel + CLIPTextModel trained jointly on the frozen VAE's
latents). The model configs below are diffusers / transformers ``config.json`` contents, so the
exported folder is read exactly like Stable Diffusion 1.5.
"""

import ml_collections


def _vae(block_out_channels, norm_num_groups, sample_size):
    """diffusers AutoencoderKL config.json; len(block_out_channels) - 1 halvings of the image."""
    n = len(block_out_channels)
    return dict(
        _class_name="AutoencoderKL",
        act_fn="silu",
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
        # Replaced at export by 1/std of the trained encoder's latents (as SD's 0.18215 was chosen).
        scaling_factor=1.0,
    )


def _unet(block_out_channels, down_block_types, up_block_types, norm_num_groups, heads,
                    cross_attention_dim, sample_size, layers_per_block):
    """diffusers UNet2DConditionModel config.json (SD 1.x layout, smaller widths)."""
    return dict(
        _class_name="UNet2DConditionModel",
        act_fn="silu",
        # diffusers quirk kept from SD 1.x: this is the number of heads, not the head width.
        attention_head_dim=heads,
        block_out_channels=tuple(block_out_channels),
        center_input_sample=False,
        cross_attention_dim=cross_attention_dim,
        down_block_types=tuple(down_block_types),
        up_block_types=tuple(up_block_types),
        downsample_padding=1,
        flip_sin_to_cos=True,
        freq_shift=0,
        in_channels=4,
        out_channels=4,
        layers_per_block=layers_per_block,
        mid_block_scale_factor=1,
        norm_eps=1e-5,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
    )


def _text_encoder(hidden_size, layers, heads, max_length):
    """transformers CLIPTextModel config.json; vocab and special-token ids are filled in from the
    closed-vocabulary tokenizer when training starts."""
    return dict(
        architectures=("CLIPTextModel",),
        model_type="clip_text_model",
        attention_dropout=0.0,
        hidden_act="quick_gelu",
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        initializer_factor=1.0,
        layer_norm_eps=1e-5,
        max_position_embeddings=max_length,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        projection_dim=hidden_size,
        vocab_size=0,  # set from the tokenizer
        bos_token_id=0,  # set from the tokenizer
        eos_token_id=0,  # set from the tokenizer
        pad_token_id=0,  # set from the tokenizer
    )


# Stable Diffusion 1.x's scheduler_config.json: generation with the exported folder uses PNDM
# (PLMS), SD's default, and training uses its scaled_linear betas over 1000 steps.
SD1_SCHEDULER = dict(
        _class_name="PNDMScheduler",
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
        clip_sample=False,
        timestep_spacing="leading",
        trained_betas=None,
)


def get_config(arg=None):
    """Default: 64 px, VAE (16, 32, 64) -> 16x16x4, UNet (32, 64, 128) x 2 layers per block,
    24-token captions. ``arg='tiny'``: 16 px."""
    c = ml_collections.ConfigDict()
    c.seed = 0                    # model init, noise, timesteps, caption dropout (folded with step)
    c.stages = ("vae", "vae_decoder", "diffusion")  # run in order; each resumes from workdir/<stage>/
    c.export = True               # write the diffusers folder at the end of the diffusion stage
    c.export_dir = ""             # default: <workdir>/model
    c.export_dtype = "float16"    # safetensors dtype of the shipped folder (halves its size)
    c.max_seconds = 0.0           # >0: stop (with a checkpoint) after this much training time
    c.max_steps = 0               # >0: stop (with a checkpoint) after this many steps in this run
    c.keep_checkpoints = 2        # orbax max_to_keep per stage
    # Warm start from a diffusers folder (e.g. datasetdm_jax/assets/shapes_sd): its VAE and tokenizer
    # are used as they are (the vae stage is skipped) and its UNet + text encoder start the diffusion
    # stage with a fresh optimiser; how training continues when the workdir is lost.
    c.init_from = ""

    # --- data: the procedural shapes world, item i of a split is a pure function of (seed, i), so
    # the data position is just the number of examples consumed (saved with every checkpoint).
    c.data = ml_collections.ConfigDict()
    c.data.image_size = 64
    c.data.min_objects = 1
    c.data.max_objects = 3
    c.data.classes = ()           # () = the shapes world's default classes
    c.data.split = "pretrain"     # the large captioned corpus (full domain)
    c.data.heldout_split = "test"  # fixed held-out batch for PSNR / eps-MSE tracking
    c.data.heldout_size = 64
    c.data.seed = 0
    c.data.prefetch = 4           # batches rendered ahead in a background thread

    # --- tokenizer: closed CLIP-style vocabulary built from the shapes world's caption words.
    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.max_length = 24   # captions are <= 19 tokens; 77 (SD's) made the text encoder cost
                                  # more than the UNet (pilot: 37 -> 48 img/s)

    # --- stage 1: autoencoder (no perceptual or GAN loss: flat-coloured shapes need neither).
    c.vae = ml_collections.ConfigDict()
    c.vae.model = _vae((16, 32, 64), 16, 64)  # pilot: 34 img/s on 2 host devices; (32, 64, 64): 15
    c.vae.steps = 600
    c.vae.batch_size = 32
    c.vae.lr = 1e-3
    c.vae.warmup_steps = 100
    c.vae.final_lr_fraction = 0.1  # cosine decay to lr * this at `steps`
    c.vae.weight_decay = 0.0
    c.vae.grad_clip = 1.0
    c.vae.l1_weight = 1.0         # reconstruction loss = l1 * |x - x'| + mse * (x - x')^2 (per pixel)
    c.vae.mse_weight = 1.0
    c.vae.kl_weight = 1e-6        # times the KL summed over a latent, per image (SD used 1e-6)
    c.vae.ema_decay = 0.0         # VAE keeps raw weights
    c.vae.log_every = 25
    c.vae.eval_every = 250        # reconstruction PSNR on the held-out batch
    c.vae.checkpoint_every_s = 300.0

    # --- stage 1b: the decoder fine-tuned with the encoder frozen (latents unchanged, so it can
    # follow a trained UNet too: `stages="('vae_decoder',)" init_from=<folder>` re-exports that
    # folder with the new decoder).
    c.vae_decoder = ml_collections.ConfigDict()
    c.vae_decoder.steps = 2000
    c.vae_decoder.batch_size = 32
    c.vae_decoder.lr = 5e-4
    c.vae_decoder.warmup_steps = 100
    c.vae_decoder.final_lr_fraction = 0.1
    c.vae_decoder.weight_decay = 0.0
    c.vae_decoder.grad_clip = 1.0
    c.vae_decoder.l1_weight = 1.0
    c.vae_decoder.mse_weight = 1.0
    c.vae_decoder.ema_decay = 0.0
    c.vae_decoder.log_every = 25
    c.vae_decoder.eval_every = 250
    c.vae_decoder.checkpoint_every_s = 300.0

    # --- stage 2: latent diffusion, UNet + text encoder from scratch, VAE frozen.
    c.unet = _unet((32, 64, 128),
                   ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                   ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                   norm_num_groups=32, heads=4, cross_attention_dim=192, sample_size=16,
                   layers_per_block=2)
    c.text_encoder = _text_encoder(hidden_size=192, layers=4, heads=4, max_length=24)
    c.scheduler = dict(SD1_SCHEDULER)

    c.diffusion = ml_collections.ConfigDict()
    # A single 14,000-step run is the plain recipe (a resume with a larger diffusion.steps recomputes
    # the cosine: a warm restart). The shipped model went further in warm-started legs (init_from,
    # lr 5e-4) to 25,500 steps with one layer per block, then 5,000 more with the UNet grown to two
    # (models/deepen.py): 30,500 in all; the legs and their commands are in docs/experiments/shapes_sd.md.
    c.diffusion.steps = 14000
    c.diffusion.batch_size = 32   # pilots: batch 64 gave no img/s gain on 2 CPU cores; more steps win
    c.diffusion.lr = 1e-3
    c.diffusion.warmup_steps = 300
    c.diffusion.final_lr_fraction = 0.1
    c.diffusion.weight_decay = 0.01
    c.diffusion.grad_clip = 1.0
    c.diffusion.ema_decay = 0.999  # effective decay min(this, (1 + s) / (10 + s))
    c.diffusion.min_snr_gamma = 5.0  # loss weight min(SNR, gamma) / SNR (eps-prediction); 0 = off
    c.diffusion.caption_dropout = 0.1  # fraction of captions replaced by "" (classifier-free guidance)
    c.diffusion.sample_posterior = True  # latents = posterior sample (as SD) rather than its mean
    c.diffusion.log_every = 25
    # Honest fidelity proxy: EMA eps-MSE on the fixed held-out batch at fixed timesteps and noise,
    # with the true caption and with "" (the gap shows how much the caption is used).
    c.diffusion.eval_every = 500
    c.diffusion.eval_timesteps = (50, 250, 500, 750, 950)
    # The real yardstick as a curve: every `fidelity_every` steps (0 = off), sample
    # `fidelity_prompts` one-object prompts (and a quarter as many two-object ones) from the EMA
    # weights and score them with a judge file (`datasetdm exp fidelity ... --judge train` writes one):
    # eval/class_fidelity, eval/colour_fidelity, eval/multi_object_presence. ~40 s for 64 prompts here.
    c.diffusion.fidelity_every = 0
    c.diffusion.fidelity_judge = ""
    c.diffusion.fidelity_prompts = 64
    c.diffusion.fidelity_steps = 25
    c.diffusion.fidelity_guidance = 3.0
    c.diffusion.checkpoint_every_s = 600.0

    if arg == "tiny":
        c.data.image_size = 16
        c.data.max_objects = 2
        c.data.heldout_size = 8
        c.data.prefetch = 2
        c.vae.model = _vae((8, 16), 4, 16)  # 16 px -> 8x8x4
        c.vae.steps = 6
        c.vae.batch_size = 4
        c.vae.warmup_steps = 2
        c.vae.log_every = 2
        c.vae.eval_every = 3
        c.vae_decoder.steps = 4
        c.vae_decoder.batch_size = 4
        c.vae_decoder.warmup_steps = 1
        c.vae_decoder.log_every = 2
        c.vae_decoder.eval_every = 2
        c.unet = _unet((16, 32), ("CrossAttnDownBlock2D", "DownBlock2D"),
                       ("UpBlock2D", "CrossAttnUpBlock2D"),
                       norm_num_groups=4, heads=2, cross_attention_dim=32, sample_size=8,
                       layers_per_block=1)
        c.text_encoder = _text_encoder(hidden_size=32, layers=2, heads=2, max_length=77)
        c.diffusion.steps = 6
        c.diffusion.batch_size = 4
        c.diffusion.warmup_steps = 2
        c.diffusion.log_every = 2
        c.diffusion.eval_every = 3
        c.diffusion.eval_timesteps = (100, 900)
    elif arg not in (None, "", "default"):
        raise ValueError(f"configs/shapes_sd.py: unknown variant {arg!r} (expected 'tiny' or none)")
    return c
