"""The shapes-world Stable Diffusion: trained from scratch, resumably, by ``datasetdm pretrain``
(the shipped model's legs: docs/experiments/shapes_sd.md).

``run(config, workdir)`` (``main.py``) runs the stages named in ``config.stages`` in order, each in
its own orbax checkpoint folder ``workdir/<stage>/``:

1. ``vae`` (``vae_stages.py``): an AutoencoderKL on shapes images (L1 + L2 reconstruction, tiny KL);
   tracks reconstruction PSNR on a fixed held-out batch.
1b. ``vae_decoder`` (``vae_stages.py``): the VAE's decoder fine-tuned with its encoder frozen. The
   latents do not change, so a UNet trained on them stays valid: this is how a shipped model's
   images get sharper without retraining its UNet (a round trip through the first VAE cost the judge
   14 points of class accuracy).
2. ``diffusion`` (``diffusion.py``): VAE frozen; UNet2DConditionModel and CLIPTextModel trained
   jointly from scratch on (latent, caption) with eps-prediction, Min-SNR-gamma weighting, AdamW
   with warmup + cosine, grad clipping, an EMA of the weights and caption dropout for
   classifier-free guidance. Tracks the EMA model's eps-MSE on a fixed held-out batch at fixed timesteps and
   noise, with the true caption and with the empty one: an honest, cheap proxy. With
   ``diffusion.fidelity_every`` and a judge file it also samples prompts from the EMA weights and
   logs the judged class and colour fidelity (``research/judge.py``), the yardstick itself, as a curve.

Then the EMA weights are exported as a diffusers-format folder (``export.py``). The loop the stages
share is ``loop.py``, their data ``data.py``, model building and warm starts ``models.py``, the
training-curve plot ``curves.py``.

Warm start (``config.init_from``, a diffusers folder such as the shipped model): its VAE is used
frozen (the ``vae`` stage is skipped; ``vae_decoder`` starts from its decoder), its tokenizer is
copied, and its UNet and text encoder weights start the ``diffusion`` stage with a fresh optimiser
and schedule. Checkpoints live in ``workdir`` (lost with an ephemeral machine); the shipped
folder is not, so this is how training continues on a new machine.

Every stage can be stopped at any time and rerun with the same command: the step, params, EMA,
optimiser state and the grain iterator position are checkpointed every ``checkpoint_every_s``
seconds, at the end and on SIGTERM / Ctrl-C, and randomness is a pure function of
``(config.seed, step)``, so an interrupted-and-resumed run equals an uninterrupted one.
Train steps are pure jitted functions of ``(params, opt state, batch)`` over a data-parallel
``('data',)`` mesh of the local devices (batch sharded, params replicated).
"""

from datasetdm_jax.shapes_sd.loop import STAGES
from datasetdm_jax.shapes_sd.main import main_pretrain, run

__all__ = ["run", "main_pretrain", "STAGES"]
