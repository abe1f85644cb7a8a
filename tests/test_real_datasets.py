"""Real-dataset sources (VOC, Cityscapes, COCO, NYU) on tiny fake copies in their on-disk layouts."""

import json
import os

import numpy as np
import pytest
import scipy.io
from PIL import Image

from datasetdm_jax.config_utils import load_config
from datasetdm_jax.data import cityscapes, coco, nyu, pipeline, real_base as rb, sources, voc
from fake_voc import VOC_LABELS, write_fake_voc
from fake_voc import png as _png, rgb as _rgb, voc_label as _voc_label

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


# -- VOC -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return write_fake_voc(str(tmp_path_factory.mktemp("voc") / "VOC2012"))


def test_voc_selection_rule(voc_root):
    src = voc.VOCSource(voc_root, "train_aug", per_class=1, min_pixels=100)
    assert src.ids == ["2007_000001", "2007_000006"]
    assert len(voc.VOCSource(voc_root, "train_aug")) == 6
    assert voc.VOCSource(voc_root, "val").ids == ["2007_000001", "2007_000002"]


def test_voc_example_resized_and_captioned(voc_root):
    src = voc.VOCSource(voc_root, "train_aug", rb.SourceConfig(image_size=16))
    ex = src[2]  # bicycle (2) above bird (3), background on the right
    assert ex["image"].shape == (16, 16, 3) and ex["image"].dtype == np.uint8
    assert ex["segmentation"].shape == (16, 16)
    assert set(np.unique(ex["segmentation"]).tolist()) == {0, 2, 3}
    assert ex["caption"] == "a photo of a bicycle and a bird"
    assert ex["depth"].shape == (16, 16) and not ex["depth"].any()
    assert ex["instances"].shape == (0, 16, 16) and ex["keypoints"].shape == (0, 17, 3)
    # crop: 30x40 -> 16x21, centre window at x0 = 2: label rows 0..19 of 30 -> rows 0..10 of 16
    expect = rb.resize_nearest(VOC_LABELS["2007_000003"], rb.fit(30, 40, rb.SourceConfig(image_size=16)))
    np.testing.assert_array_equal(ex["segmentation"], expect)
    seg = ex["segmentation"]
    assert (seg[:11, :8] == 2).all() and (seg[11:, :8] == 3).all() and (seg[:, 8:] == 0).all()
    assert voc.VOCSource(voc_root, "train_aug", rb.SourceConfig(image_size=8))[0]["caption"] == \
        "a photo of an aeroplane"


def test_voc_pipeline_batches(voc_root):
    src = voc.VOCSource(voc_root, "train_aug", rb.SourceConfig(image_size=16, max_objects=2))
    b = next(iter(pipeline.grain_dataset(src, 2, None)))
    assert b["image"].shape == (2, 16, 16, 3) and b["image"].dtype == np.float32
    assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
    assert b["segmentation"].shape == (2, 16, 16) and b["instances"].shape == (2, 2, 16, 16)
    assert list(b["caption"]) == ["a photo of an aeroplane", "a photo of an aeroplane"]


def test_voc_errors(voc_root, tmp_path):
    import shutil
    root = str(tmp_path / "VOC2012")
    shutil.copytree(voc_root, root)
    bad = _voc_label(30, 40, [(30, (0, 2, 0, 2))])
    _png(os.path.join(root, "SegmentationClassAug", "2007_000002.png"), bad)
    src = voc.VOCSource(root, "train_aug")
    with pytest.raises(rb.DatasetError, match=r"2007_000002\.png: label values \[30\] out of range"):
        src[1]
    jpg = os.path.join(root, "JPEGImages", "2007_000003.jpg")
    data = open(jpg, "rb").read()
    open(jpg, "wb").write(data[: len(data) // 2])
    with pytest.raises(rb.DatasetError, match=r"2007_000003\.jpg: corrupt or unreadable image"):
        src[2]
    open(jpg, "wb").write(b"not an image")
    with pytest.raises(rb.DatasetError, match=r"2007_000003\.jpg: corrupt or unreadable image"):
        src[2]
    os.remove(os.path.join(root, "SegmentationClassAug", "2007_000004.png"))
    with pytest.raises(rb.DatasetError, match=r"2007_000004\.png: missing VOC label PNG"):
        src[3]
    with pytest.raises(rb.DatasetError, match=r"ImageSets/SegmentationAug/nope\.txt: missing VOC split list"):
        voc.VOCSource(root, "nope")
    _png(os.path.join(root, "SegmentationClassAug", "2007_000005.png"), _rgb(30, 40, 0))
    with pytest.raises(rb.DatasetError, match=r"2007_000005\.png: .*mode RGB"):
        src[4]


# -- Cityscapes ------------------------------------------------------------------------------------

CITY_FRAMES = ["aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000313"]


@pytest.fixture(scope="module")
def city_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cityscapes"))
    ids = [np.full((16, 16), 7, np.uint8), np.full((16, 16), 26, np.uint8), np.full((16, 16), 7, np.uint8)]
    ids[0][:4] = 0        # unlabelled -> 255
    ids[0][4:8] = 33      # bicycle -> 18
    ids[0][8:10] = 26     # car -> 13
    for frame, lab in zip(CITY_FRAMES, ids):
        city = frame.split("_")[0]
        _png(os.path.join(root, "leftImg8bit", "train", city, f"{frame}_leftImg8bit.png"), _rgb(16, 16, 1))
        _png(os.path.join(root, "gtFine", "train", city, f"{frame}_gtFine_labelIds.png"), lab)
    return root


def test_cityscapes_label_mapping(city_root):
    src = cityscapes.CityscapesSource(city_root, "train", rb.SourceConfig(image_size=16))
    assert [os.path.basename(f) for f in src.items] == CITY_FRAMES
    seg = src[0]["segmentation"]
    assert (seg[:4] == 255).all() and (seg[4:8] == 18).all() and (seg[8:10] == 13).all() and (seg[10:] == 0).all()
    assert src[0]["caption"] == "a photo of a road, a car and a bicycle in an urban street"
    np.testing.assert_array_equal(src[0]["image"], _rgb(16, 16, 1))  # 16 -> 16: untouched
    assert cityscapes.to_train_ids(np.arange(34, dtype=np.uint8), "x").tolist() == [
        cityscapes.LABEL_TO_TRAIN.get(i, 255) for i in range(34)]
    # per-class selection: frame 0 goes to road (first qualifying class), frame 1 to car, frame 2: road full
    sel = cityscapes.CityscapesSource(city_root, "train", per_class=1, min_pixels=50)
    assert [os.path.basename(f) for f in sel.items] == CITY_FRAMES[:2]


def test_cityscapes_errors(city_root, tmp_path):
    import shutil
    root = str(tmp_path / "cs")
    shutil.copytree(city_root, root)
    path = os.path.join(root, "gtFine", "train", "aachen", f"{CITY_FRAMES[1]}_gtFine_labelIds.png")
    _png(path, np.full((16, 16), 40, np.uint8))
    src = cityscapes.CityscapesSource(root, "train")
    with pytest.raises(rb.DatasetError, match=rf"{CITY_FRAMES[1]}_gtFine_labelIds\.png: label values \[40\]"):
        src[1]
    with pytest.raises(rb.DatasetError, match=r"gtFine/val: missing"):
        os.makedirs(os.path.join(root, "leftImg8bit", "val"))
        cityscapes.CityscapesSource(root, "val")


# -- COCO ------------------------------------------------------------------------------------------

def _box(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _coco_json(path, images, anns, cats):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("coco"))
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": 20, "width": 20} for i in (5, 3, 9)]
    for k, im in enumerate(images):
        os.makedirs(os.path.join(root, "val2017"), exist_ok=True)
        Image.fromarray(_rgb(20, 20, k)).save(os.path.join(root, "val2017", im["file_name"]))
    cats = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]
    anns = [  # image 5: big car, small dog in front, crowd person corner; image 3: big dog; image 9: small car
        {"id": 1, "image_id": 5, "category_id": 3, "segmentation": _box(0, 0, 20, 10), "area": 200, "iscrowd": 0,
         "bbox": [0, 0, 20, 10]},
        {"id": 2, "image_id": 5, "category_id": 18, "segmentation": _box(2, 2, 4, 4), "area": 16, "iscrowd": 0,
         "bbox": [2, 2, 4, 4]},
        {"id": 3, "image_id": 5, "category_id": 1, "segmentation": _box(0, 16, 4, 4), "area": 16, "iscrowd": 1,
         "bbox": [0, 16, 4, 4]},
        {"id": 4, "image_id": 3, "category_id": 18, "segmentation": _box(0, 0, 15, 15), "area": 225, "iscrowd": 0,
         "bbox": [0, 0, 15, 15]},
        {"id": 5, "image_id": 9, "category_id": 3, "segmentation": _box(0, 0, 3, 3), "area": 9, "iscrowd": 0,
         "bbox": [0, 0, 3, 3]},
    ]
    _coco_json(os.path.join(root, "annotations", "instances_val2017.json"), images, anns, cats)
    kp1 = [0] * 51
    kp1[0:3] = [4, 5, 2]      # nose visible
    kp1[15:18] = [10, 12, 1]  # left shoulder hidden
    kp1[30:33] = [19, 19, 2]  # left wrist, bottom-right pixel (leaves a 16 px crop? no: square image)
    persons = [
        {"id": 11, "image_id": 3, "category_id": 1, "segmentation": _box(2, 2, 12, 16), "area": 192, "iscrowd": 0,
         "bbox": [2, 2, 12, 16], "keypoints": kp1, "num_keypoints": 3},
        {"id": 12, "image_id": 9, "category_id": 1, "segmentation": _box(0, 0, 5, 5), "area": 25, "iscrowd": 0,
         "bbox": [0, 0, 5, 5], "keypoints": [0] * 51, "num_keypoints": 0},
    ]
    _coco_json(os.path.join(root, "annotations", "person_keypoints_val2017.json"), images, persons, cats[:1])
    return root


def test_coco_instances_class_aware(coco_root):
    src = coco.COCOSource(coco_root, "val2017", "instance", rb.SourceConfig(image_size=20, max_objects=4))
    assert src.classes == ("background", "person", "car", "dog") and src.items == [5, 3, 9]
    ex = src[0]
    assert ex["instance_classes"].tolist() == [2, 3]  # car (largest first), then dog
    assert ex["instances"].shape == (2, 20, 20)
    assert ex["instances"][0].sum() == 200 - 16 and ex["instances"][1].sum() == 16  # dog painted over car
    assert (ex["segmentation"][2:6, 2:6] == 3).all() and (ex["segmentation"][0, 10:] == 2).all()
    assert (ex["segmentation"][16:, :4] == 255).all() and (ex["segmentation"][12:16] == 0).all()  # crowd: ignore
    assert ex["caption"] == "a photo of a car and a dog"
    b = next(iter(pipeline.grain_dataset(src, 3, None)))
    assert b["num_instances"].tolist() == [2, 1, 1] and b["instance_classes"][0].tolist() == [2, 3, 0, 0]
    # selection, per class in id order: person none (crowd only), car -> 5, dog -> 3 (5's dog is small)
    sel = coco.COCOSource(coco_root, "val2017", "instance", per_class=1, min_area=100)
    assert sel.items == [5, 3]
    # max_objects keeps the largest; min_instance_area drops small ones
    assert coco.COCOSource(coco_root, "val2017", "instance", rb.SourceConfig(image_size=20, max_objects=1))[0][
        "instance_classes"].tolist() == [2]
    assert coco.COCOSource(coco_root, "val2017", "instance", rb.SourceConfig(image_size=20),
                           min_instance_area=50)[0]["instance_classes"].tolist() == [2]


def test_coco_keypoints(coco_root):
    src = coco.COCOSource(coco_root, "val2017", "pose", rb.SourceConfig(image_size=10))
    assert src.items == [3]  # image 9's only person has no labelled keypoints
    ex = src[0]
    kp = ex["keypoints"]
    assert kp.shape == (1, 17, 3) and ex["caption"] == "a photo of a person"
    np.testing.assert_allclose(kp[0, 0], [2.25, 2.75, 2])   # (4 + 0.5) / 2, (5 + 0.5) / 2
    np.testing.assert_allclose(kp[0, 5], [5.25, 6.25, 1])
    np.testing.assert_allclose(kp[0, 10], [9.75, 9.75, 2])
    assert kp[0, 1].tolist() == [0, 0, 0]
    assert ex["instance_classes"].tolist() == [1]
    assert coco.COCOSource(coco_root, "val2017", "pose", num_images=0).items == []


def test_coco_errors(coco_root, tmp_path):
    import shutil
    root = str(tmp_path / "coco")
    shutil.copytree(coco_root, root)
    path = os.path.join(root, "annotations", "person_keypoints_val2017.json")
    d = json.load(open(path))
    d["annotations"][0]["keypoints"][2] = 3
    json.dump(d, open(path, "w"))
    with pytest.raises(rb.DatasetError, match=r"person_keypoints_val2017\.json: annotation id 11 \(image 3\): "
                                              r"keypoint visibility"):
        coco.COCOSource(root, "val2017", "pose")[0]
    open(path, "w").write("{not json")
    with pytest.raises(rb.DatasetError, match=r"person_keypoints_val2017\.json: not valid JSON"):
        coco.COCOSource(root, "val2017", "pose")
    os.remove(os.path.join(root, "val2017", "000000000009.jpg"))
    with pytest.raises(rb.DatasetError, match=r"000000000009\.jpg: missing image"):
        coco.COCOSource(root, "val2017", "instance")[2]
    with pytest.raises(rb.DatasetError, match=r"instances_train2017\.json: missing COCO annotation file"):
        os.makedirs(os.path.join(root, "train2017"))
        coco.COCOSource(root, "train2017", "instance")


# -- NYU -------------------------------------------------------------------------------------------

NYU_H, NYU_W = 12, 16


def _nyu_frame(i):
    image = _rgb(NYU_H, NYU_W, 100 + i)
    depth = (np.arange(NYU_H * NYU_W, dtype=np.float32).reshape(NYU_H, NYU_W) + 1) / 100 + i
    return image, depth


@pytest.fixture(scope="module")
def nyu_mat_root(tmp_path_factory):
    import h5py
    root = str(tmp_path_factory.mktemp("nyu_mat"))
    frames = [_nyu_frame(i) for i in range(3)]
    with h5py.File(os.path.join(root, nyu.MAT_NAME), "w") as f:
        # MATLAB v7.3 stores column-major arrays: (N, 3, W, H) images and (N, W, H) depths.
        f["images"] = np.stack([im.transpose(2, 1, 0) for im, _ in frames])
        f["depths"] = np.stack([d.T for _, d in frames])
        refs = []
        for k, name in enumerate(["kitchen", "living_room", "bedroom"]):
            f[f"#refs#/{k}"] = np.array([[ord(ch)] for ch in name], np.uint16)
            refs.append(f[f"#refs#/{k}"].ref)
        f.create_dataset("sceneTypes", data=np.array([refs], dtype=h5py.ref_dtype))
    scipy.io.savemat(os.path.join(root, nyu.SPLITS_NAME), {"trainNdxs": np.array([[1], [3]]),
                                                          "testNdxs": np.array([[2]])})
    return root


def test_nyu_mat(nyu_mat_root):
    src = nyu.NYUDepthSource(nyu_mat_root, "train", rb.SourceConfig(image_size=12))
    assert src.items == [0, 2] and len(nyu.NYUDepthSource(nyu_mat_root, "test")) == 1
    ex = src[1]
    image, depth = _nyu_frame(2)
    g = rb.fit(NYU_H, NYU_W, rb.SourceConfig(image_size=12))  # 12x16 -> centre 12x12 window at x0 = 2
    np.testing.assert_array_equal(ex["image"], image[:, 2:14])
    np.testing.assert_array_equal(ex["depth"], rb.resize_nearest(depth, g))
    np.testing.assert_array_equal(ex["depth"], depth[:, 2:14])
    assert ex["caption"] == "a photo of a bedroom"
    assert nyu.NYUDepthSource(nyu_mat_root, "test")[0]["caption"] == "a photo of a living room"
    picked = nyu.NYUDepthSource(nyu_mat_root, "train", num_images=1, select_seed=3)
    assert len(picked) == 1 and picked.items[0] in (0, 2)
    import pickle
    assert pickle.loads(pickle.dumps(src))[1]["caption"] == "a photo of a bedroom"  # reopens in a worker


def test_nyu_mat_errors(nyu_mat_root, tmp_path):
    import h5py
    import shutil
    root = str(tmp_path / "nyu")
    shutil.copytree(nyu_mat_root, root)
    with h5py.File(os.path.join(root, nyu.MAT_NAME), "r+") as f:
        f["depths"][1, 0, 0] = np.nan
    with pytest.raises(rb.DatasetError, match=r"nyu_depth_v2_labeled\.mat frame 2: depth has NaN"):
        nyu.NYUDepthSource(root, "test")[0]
    os.remove(os.path.join(root, nyu.SPLITS_NAME))
    with pytest.raises(rb.DatasetError, match=r"splits\.mat: missing NYU split file"):
        nyu.NYUDepthSource(root, "train")


def test_nyu_folder(tmp_path):
    root = str(tmp_path / "official_splits")
    image, depth = _nyu_frame(0)
    mm = np.round(depth * 1000).astype(np.uint16)
    _png(os.path.join(root, "train", "kitchen", "rgb_00001.png"), image)
    _png(os.path.join(root, "train", "kitchen", "sync_depth_00001.png"), mm)
    _png(os.path.join(root, "train", "office_0003", "rgb_00007.png"), image)
    _png(os.path.join(root, "train", "office_0003", "depth_00007.png"), mm)
    src = nyu.NYUDepthSource(root, "train", rb.SourceConfig(image_size=12, resize="stretch"))
    assert len(src) == 2
    ex = src[0]
    g = rb.fit(NYU_H, NYU_W, rb.SourceConfig(image_size=12, resize="stretch"))
    np.testing.assert_allclose(ex["depth"], rb.resize_nearest(mm.astype(np.float32) / 1000, g))
    assert ex["caption"] == "a photo of a kitchen" and src[1]["caption"] == "a photo of an office"
    _png(os.path.join(root, "train", "office_0003", "depth_00007.png"), (depth * 10).astype(np.uint8))
    with pytest.raises(rb.DatasetError, match=r"depth_00007\.png: depth PNG has mode L; expected 16-bit"):
        src[1]
    os.remove(os.path.join(root, "train", "office_0003", "depth_00007.png"))
    with pytest.raises(rb.DatasetError, match=r"sync_depth_00007\.png: missing depth PNG"):
        nyu.NYUDepthSource(root, "train")
    with pytest.raises(rb.DatasetError, match=r"test: missing NYU"):
        nyu.NYUDepthSource(root, "test")


# -- helpers and configs ---------------------------------------------------------------------------

def test_resize_nearest_and_selection_helpers():
    lab = np.arange(16, dtype=np.uint8).reshape(4, 4)
    g = rb.fit(4, 4, rb.SourceConfig(image_size=2))
    assert rb.resize_nearest(lab, g).tolist() == [[5, 7], [13, 15]]  # centres of 2x2 cells, no mixing
    assert rb.select_per_class([{1: 5}, {1: 9, 2: 9}, {2: 9}, {}], per_class=1, min_pixels=4) == [0, 1]
    assert rb.caption_for(["dog", "owl", "dog"]) == "a photo of a dog and an owl"


@pytest.mark.parametrize("name,fixture,overrides,n,classes", [
    ("voc_semantic", "voc_root", ["data.min_pixels=100", "data.per_class=1"], 2, 21),
    ("cityscapes_semantic", "city_root", ["data.min_pixels=50", "data.per_class=1"], 2, 19),
    ("coco_instance", "coco_root", ["data.split=val2017", "data.min_area=100.", "data.per_class=1"], 2, 4),
    ("coco_pose", "coco_root", ["data.split=val2017"], 1, 2),
    ("nyu_depth", "nyu_mat_root", ["data.num_images=1"], 1, 0),
])
def test_configs_build_sources(request, name, fixture, overrides, n, classes):
    root = request.getfixturevalue(fixture)
    config = load_config(os.path.join(CONFIGS, f"{name}.py"), [f"data.root={root}", "data.image_size=8", *overrides])
    assert config.data.source in sources.SOURCES and config.lr == 1e-4 and config.batch_size == 1
    src = sources.build(config.data)
    assert len(src) == n and src[0]["image"].shape == (8, 8, 3)
    assert len(sources.class_names(config.data)) == classes
    assert len(sources.build(config.data, train=False, num=1)) == 1


def test_paper_selection_numbers():
    c = load_config(os.path.join(CONFIGS, "voc_semantic.py"))
    assert (c.data.per_class, c.data.min_pixels) == (5, 18000) and c.decoder.num_queries == 21
    c = load_config(os.path.join(CONFIGS, "coco_instance.py"))
    assert (c.data.per_class, c.data.min_area, c.data.min_instance_area) == (5, 10000.0, 500.0)
    assert load_config(os.path.join(CONFIGS, "coco_pose.py")).data.num_images == 801
    assert load_config(os.path.join(CONFIGS, "nyu_depth.py")).decoder.max_depth == 10.0


def test_train_reads_real_sources(voc_root):
    from datasetdm_jax import train
    config = load_config(os.path.join(CONFIGS, "voc_semantic.py"),
                         [f"data.root={voc_root}", "data.image_size=8", "data.min_pixels=100", "data.per_class=1",
                          "batch_size=2"])
    assert train.data_source(config, "train_aug", 100, 0).source.ids == ["2007_000001", "2007_000006"]
    assert len(train.data_source(config, "val", 1, 1)) == 1  # eval splits: no selection, capped
    b = next(train.train_iterator(config, None))
    assert b["image"].shape == (2, 8, 8, 3) and b["segmentation"].shape == (2, 8, 8)
    assert sorted(b["caption"]) == ["a photo of a bird", "a photo of an aeroplane"]


def test_sources_main_lists_selection(voc_root, capsys):
    sources.main([os.path.join(CONFIGS, "voc_semantic.py"), f"data.root={voc_root}", "data.min_pixels=100",
                  "data.per_class=1"])
    assert capsys.readouterr().out.split() == ["2007_000001", "2007_000006"]
