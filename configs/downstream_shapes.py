"""Downstream comparison on the shapes world: ``datasetdm downstream --config configs/downstream_shapes.py``.

Trains the small DeepLab-style segmenter and the depth net on (a) the 100 labelled real images,
(b) generated records, (c) both (half of each batch synthetic), and evaluates on the real test and
domain-shifted splits. ``synthetic.records`` is the folder written by generation; without it only
row (a) can run (``rows=('real',)``). Variant ``:tiny`` is for tests. Shared settings:
datasetdm_jax/config_common.py.
"""

from datasetdm_jax import config_common as common


def task_config(task, num_classes, steps, model, batch_size=16, lr=2e-3):
    """Shapes-scale training: short warmup, frequent logs."""
    return common.downstream_task(task, num_classes, steps, model, batch_size=batch_size, lr=lr,
                                  warmup_steps=min(100, steps // 10), log_every=25)


def get_config(arg=None):
    common.check_variant(arg, "tiny")
    c = common.downstream(
        "downstream_shapes", ("semantic", "depth"),
        real=dict(source="shapes", root="", split="train_labelled", num_images=100, seed=0, image_size=64),
        test=dict(source="shapes", root="", splits=("test", "test_shifted"), num=256, seed=0, image_size=64),
        scale=(0.75, 1.5), crop=(64, 64), eval_batch_size=32,
        max_depth=0.0,               # 0: no cap
    )
    # 8 classes: shapes.CLASSES (background + 7 shapes; 'star' is absent from the default world).
    # lr 2e-2: the rate that trains the real-only baseline (a) best, so synthetic data is measured
    # against a strong baseline, not an undertrained one. Picked on held-out real images (256 scenes
    # of each test split drawn with seed 1, not the test images), 1,000 steps, mean mIoU over both
    # splits: 2e-3 53.5, 6e-3 67.3, 1e-2 68.7, 2e-2 71.2, 4e-2 70.8, 8e-2 65.3
    # (docs/experiments/downstream.md). The depth net keeps 2e-3 (not swept).
    c.semantic = task_config("semantic", 8, 1500, dict(
        stages=((16, 2, 1), (32, 2, 1), (64, 2, 1), (96, 1, 2)), depth=2, aspp_width=64, aspp_rates=(2, 4, 6),
        skip_stage=1, skip_width=24, decoder_width=64), lr=2e-2)
    c.depth = task_config("depth", 8, 1500, dict(widths=(16, 32, 64, 96), depth=2, init_depth=8.0, stem_stride=2))
    if arg == "tiny":
        c.real.num_images, c.test.num, c.real.image_size, c.test.image_size = 8, 8, 32, 32
        c.augment.crop = (32, 32)
        c.eval.batch_size = 4
        c.semantic = task_config("semantic", 8, 3, dict(stages=((8, 2, 1), (8, 2, 1), (16, 1, 2)), depth=1,
                                 aspp_width=8, aspp_rates=(2,), skip_stage=0, skip_width=4, decoder_width=8),
                                 batch_size=4)
        c.depth = task_config("depth", 8, 3, dict(widths=(8, 8, 16), depth=1), batch_size=4)
    return c
