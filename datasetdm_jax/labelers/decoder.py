"""DatasetDM's labeller: the sampler with features captured, trained P-Decoder(s), post-processing.

One jit per batch over a `data` mesh of the local devices: sampling, capture, every decoder and
the label post-processing run on device; only images and labels leave it. Semantic and instance
labels follow the prompt by default (`labelers.grounding`).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from datasetdm_jax import devices, generate, sharding
from datasetdm_jax.decoders import inference, postprocess, tasks
from datasetdm_jax.labelers import grounding
from datasetdm_jax.labelers.examples import LabelledExamples

__all__ = ["DecoderLabeler", "params_sha256"]


class DecoderLabeler:
    """DatasetDM's labeller: sampler (features captured) -> trained P-Decoder(s) -> post-processing,
    all in one jit over a `data` mesh of the local devices; features never leave the device.

    ``also``: more task configs (e.g. depth beside semantic) whose trained decoders label the same
    images, so one sampler pass yields every annotation. Each decoder reads the feature pass of its
    own config's ``generate.feature_pass`` (`feature_pass`); decoders sharing a pass share its
    features, each distinct re-noised timestep costs one more UNet call per image.

    Semantic and instance labels follow the prompt (``generate.grounding``, `labelers.grounding`):
    each image's allowed classes, from the classes its prompt names, enter the jit beside its tokens."""

    name = "decoder"

    def __init__(self, config, pipe=None, config_path: str | None = None, *, also: Sequence[Any] = ()):
        from datasetdm_jax import train

        g = config.generate
        self.trainer, params, step = train.load_trained_decoder(config, pipe=pipe, config_path=config_path)
        tr = self.trainer
        self.pipe = tr.pipe
        decoders = [(tr, params, step, config)]
        for cfg in also:
            t2, p2, s2 = train.load_trained_decoder(cfg, pipe=tr.pipe)
            if t2.capture != tr.capture:
                raise ValueError(f"{cfg.name}: capture {t2.capture!r} differs from {config.name}'s {tr.capture!r}; "
                                 "decoders labelling one sampler pass must read the same features")
            decoders.append((t2, p2, s2, cfg))
        self.size = int(config.data.image_size)
        self.batch_size = int(g.batch_size)
        self.grounding = grounding.settings(g)
        from datasetdm_jax.data import sources
        self.class_names = tuple(sources.class_names(config.data))
        for t, _, _, c in decoders[1:]:
            if t.task in ("semantic", "instance") and tuple(sources.class_names(c.data)) != self.class_names:
                raise ValueError(f"{c.name}: its classes differ from {config.name}'s; decoders grounded in one "
                                 "prompt must share the class list")
        # Its own mesh: the decoder trained at another batch size (the papers' 1) than it labels at.
        self.mesh = devices.data_mesh(self.batch_size)
        self.repl, self.data_sharding = devices.data_shardings(self.mesh)
        # The frozen SD replicated, or FSDP-sharded over the mesh (``generate.param_sharding``, sharding.py).
        frozen_shardings = sharding.param_shardings(tr.frozen, self.mesh, str(g.get("param_sharding", "replicated")))
        self.frozen = jax.device_put(tr.frozen, frozen_shardings)
        self.params = jax.device_put([p for _, p, _, _ in decoders], self.repl)
        passes = [generate.feature_pass(c.generate, t.t) for t, _, _, c in decoders]
        self.feature_passes = tuple(dict.fromkeys(passes))  # distinct, in decoder order
        # VAE-decoder levels any decoder reads (a decoder's stem takes only its own resolutions)
        self.vae_features = tuple(sorted({r for t, _, _, _ in decoders for r in t.vae_features}))
        slots = [self.feature_passes.index(q) for q in passes]
        self.parts = [{"task": t.task, "workdir": os.path.abspath(str(c.workdir)), "checkpoint_step": s,
                       "params_sha256": params_sha256(p), "feature_pass": generate.describe_pass(q)}
                      for (t, p, s, c), q in zip(decoders, passes)]
        self.uncond = tr.pipe.tokenize([str(g.negative_prompt)])[0]
        sampler = self._build_sampler(tr.pipe, g, tr.capture)
        min_area = int(g.get("min_area", 0))  # semantic only (pose configs have none)
        weak = self.grounding["grounding_threshold"]
        size = self.size
        finish = postprocess.finisher([(t.task, t.config) for t, _, _, _ in decoders], size)  # pose (per person)

        def label(t, params, feats, allowed):
            out = nnx.merge(t.graph, params, t.rest)(feats)
            if t.task == "semantic":
                scores = tasks.semantic_class_scores(t.spec, out, size)
                seg, confidence = inference.grounded_class_map(scores, allowed, min_area=min_area, weak_threshold=weak)
                return {"segmentation": seg, "quality": confidence.mean((1, 2))}
            if t.task == "depth":
                return {"depth": out.astype(jnp.float32)}
            if t.task in ("instance", "pose"):  # padded to fixed slots here, trimmed on the host
                out = tasks.pose_heatmaps(t.spec, out) if t.task == "pose" else out
                return postprocess.task_labels(t.task, out, size, postprocess.label_settings(t.config), allowed)
            raise ValueError(f"generation labels tasks semantic, instance, depth and pose, not {t.task!r}")

        def run(frozen, dec_params, cond, uncond, indices, seed, allowed, extra):
            images, feats, labels = sampler(frozen, cond, uncond, indices, seed, extra)
            for (t, _, _, _), p, slot in zip(decoders, dec_params, slots):
                labels.update(label(t, p, feats[slot], allowed))
            return jnp.round(images * 255).astype(jnp.uint8), finish(labels)

        data, repl = self.data_sharding, self.repl
        self.fn = devices.MeshJit(run, self.mesh, out_shardings=data,
                                  in_shardings=(frozen_shardings, repl, data, data, data, repl, data, data))

    def _build_sampler(self, pipe, g, capture: str):
        """(frozen, cond, uncond, indices, seed, extra) -> (images, features per pass, labels): the
        sampler with `feature_passes` captured; a subclass (labelers/composite.py) also labels inside
        it from `extra`."""
        fn = generate.build_sampler_fn(pipe, steps=int(g.steps), guidance=float(g.guidance),
                                       scheduler=str(g.scheduler),
                                       latent_hw=generate.latent_size(pipe, self.size, self.size), capture=capture,
                                       feature_passes=self.feature_passes, vae_features=self.vae_features)
        return lambda frozen, cond, uncond, indices, seed, extra: (*fn(frozen, cond, uncond, indices, seed), {})

    def _inputs(self, prompts, batch: int) -> tuple[list[str], Any]:
        """The generation texts (padded to `batch`) and the sampler's `extra` inputs (batch-leading arrays)."""
        return [p.text for p in prompts] + [prompts[-1].text] * (batch - len(prompts)), ()

    def __call__(self, prompts, indices: np.ndarray, seed: int) -> LabelledExamples:
        n, b = len(indices), self.batch_size
        pad = list(indices) + [indices[-1]] * (b - n)
        texts, extra = self._inputs(prompts, b)
        cond = np.asarray(self.pipe.tokenize(texts), np.int32)
        uncond = np.broadcast_to(np.asarray(self.uncond, np.int32), cond.shape)
        named = [list(p.classes) for p in prompts]
        allowed = grounding.allowed_classes(named + named[-1:] * (b - n), self.class_names or ("background",),
                                            self.grounding["grounding"], self.grounding.get("grounding_always", ()))
        # explicit placement: jit refuses sharded numpy inputs under jax.distributed
        cond, uncond, idx, allowed, extra = jax.device_put(
            (cond, uncond, np.asarray(pad, np.int32), allowed, extra), self.data_sharding)
        seed_arr = jax.device_put(np.int32(seed), self.repl)
        images, labels = jax.device_get(self.fn(self.frozen, self.params, cond, uncond, idx, seed_arr, allowed, extra))
        rows = [postprocess.trim({k: v[i] for k, v in labels.items()}) for i in range(n)]
        return LabelledExamples(np.asarray(images[:n]), rows, texts[:n])

    def describe(self) -> dict[str, Any]:
        first = self.parts[0]
        desc = {"name": self.name, **first, "capture": self.trainer.capture, **self.grounding}
        if len(self.parts) > 1:
            desc["also"] = self.parts[1:]
        return desc


def params_sha256(params: Any) -> str:
    """A decoder's identity for the manifest: sha256 over its parameters' bytes."""
    leaves = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(params))]
    return hashlib.sha256(b"".join(x.tobytes() for x in leaves)).hexdigest()
