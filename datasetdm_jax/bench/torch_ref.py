"""diffusers' PyTorch pipeline on the same folder (StableDiffusionPipeline, or StableDiffusionXLPipeline
for an SDXL folder), for side-by-side timings and images.

Torch and diffusers are imported here only, inside functions: the package never needs them.
"""

from __future__ import annotations

import json
from typing import Any, Callable

# our sampler name -> diffusers scheduler class
SCHEDULERS = {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
              "euler": "EulerDiscreteScheduler"}


def load(folder: str, dtype: str = "float32", scheduler: str = "pndm") -> Any:
    """The pipeline on CPU in `dtype` ('float32', diffusers' default, or 'bfloat16')."""
    import diffusers
    import torch
    import transformers

    for lib in (diffusers, transformers):  # no load-time progress bars or advice in the report
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    with open(f"{folder}/model_index.json") as f:
        sdxl = json.load(f)["_class_name"] == "StableDiffusionXLPipeline"
    if sdxl:
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, dtype=getattr(torch, dtype))
        pipe.watermark = None  # images as the model drew them, as ours
    else:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            folder, dtype=getattr(torch, dtype), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    cls = getattr(diffusers, SCHEDULERS[scheduler])
    if type(pipe.scheduler).__name__ != cls.__name__:
        kwargs = {"algorithm_type": "dpmsolver++", "solver_order": 2} if scheduler == "dpmpp_2m" else {}
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generator(pipe: Any, prompt: str, batch: int, size: int, steps: int, guidance: float,
              latents: Any) -> Callable[[], Any]:
    """A zero-argument callable: one full generation of `batch` images (decoded to numpy, NHWC in
    [0, 1]) from `latents`, JAX's x_T (NHWC numpy), and the empty negative prompt, as ours."""
    import numpy as np
    import torch

    x_T = torch.from_numpy(np.ascontiguousarray(np.asarray(latents, np.float32).transpose(0, 3, 1, 2)))
    x_T = x_T.to(pipe.unet.dtype)

    def run():
        with torch.inference_mode():
            return pipe([prompt] * batch, negative_prompt=[""] * batch, height=size, width=size,
                        num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                        latents=x_T.clone()).images
    return run


def info() -> dict[str, Any]:
    import diffusers
    import torch

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "threads": torch.get_num_threads()}
