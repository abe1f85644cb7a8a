"""`datasetdm exp proof`: P-Decoder vs a scratch model, all four tasks, on the shapes world
(results: docs/experiments/p_decoder_vs_scratch.md).

For each task (semantic, instance, depth, pose): the P-Decoder trained on 100 labelled real images
through the frozen shapes-world SD, and a plain Flax conv model + the same head trained from scratch
on the same images with the same recipe (``datasetdm_jax/research/baselines.py``); both scored on the test
and domain-shifted test splits by the same evaluator. One more row: the semantic P-Decoder without
Mask2Former deep supervision (on in the shapes configs). Stages are cached in ``workdir``: a rerun is fast, a killed one goes on.

Variants: ``:small`` (few steps, few test images: minutes, a check that it all runs) and ``:tiny``
(tiny task configs for a tiny random SD; tests, with ``model=PATH``).
"""

import ml_collections

TASKS = ("semantic", "instance", "depth", "pose")


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.workdir = "runs/proof"
    c.model = ""                     # "" = the shipped shapes-world SD (datasetdm_jax/assets/shapes_sd)
    # Per task: its train config (configs/<config>) and the steps both models train for (0: the
    # config's own). Everything else (batch, lr, flips, seed, decoder) comes from the task config.
    c.tasks = ml_collections.ConfigDict({t: ml_collections.ConfigDict(dict(config=f"shapes_{t}.py", steps=0))
                                         for t in TASKS})
    # Rows to run, comma-separated (e.g. `rows=depth,pose`): the four tasks (P-Decoder and scratch)
    # and the semantic P-Decoder with deep_supervision=False ('semantic_without_deep_supervision').
    c.rows = ",".join(TASKS + ("semantic_without_deep_supervision",))
    # Scratch model width: 'auto' = the width whose parameter count is closest to the P-Decoder's
    # trainable parameters (from `widths`), or an int.
    c.scratch = ml_collections.ConfigDict(dict(width="auto", widths=(8, 16, 24, 32, 48, 64)))
    # Test splits (same images for both models; pose keeps its one-person filter).
    c.eval = ml_collections.ConfigDict(dict(splits=("test", "test_shifted"), num_images=256, seed=0, batch_size=8))
    c.eval_every = 0                 # P-Decoder validation during training (0: off; the test split is scored)
    if arg == "small":
        c.workdir = "runs/proof_small"
        for t in TASKS:
            c.tasks[t].steps = 30
        c.eval.num_images = 32
    elif arg == "tiny":
        c.workdir = "runs/proof_tiny"
        for t in TASKS:
            c.tasks[t].config, c.tasks[t].steps = f"shapes_{t}.py:tiny", 2
        c.scratch.widths = (4, 8)
        c.eval.num_images, c.eval.batch_size = 2, 2
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r} (expected 'small', 'tiny' or none)")
    return c
