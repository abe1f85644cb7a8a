"""Downstream depth estimation on NYU Depth V2 with generated data (DatasetDM Table 1: 50 real images).

    datasetdm downstream --config configs/downstream_nyu.py synthetic.records=runs/generate_nyu/records \
        real.root=data/nyu_depth_v2

Rows: (a) 50 real train images, (b) generated only, (c) both; evaluated on the 654 test images
(REL, RMSE, delta1 over 1e-3 < depth <= 10 m) on the centre 480x480 square of each frame. Shared
settings: datasetdm_jax/config_common.py.
"""

from datasetdm_jax import config_common as common


def get_config(arg=None):
    common.check_variant(arg)
    c = common.downstream(
        "downstream_nyu", ("depth",),
        real=dict(source="nyu", root="data/nyu_depth_v2", split="train", num_images=50, seed=0, image_size=480,
                  resize="crop"),
        test=dict(source="nyu", root="data/nyu_depth_v2", splits=("test",), num=0, seed=0, image_size=480,
                  resize="crop"),
        scale=(1.0, 1.25), crop=(416, 416), eval_batch_size=8, max_depth=10.0,
    )
    c.depth = common.downstream_task("depth", 1, 20000,
                                     dict(widths=(32, 64, 128, 256, 512), depth=3, init_depth=3.0, stem_stride=2))
    return c
