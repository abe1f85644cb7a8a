"""P-Decoders on tiny fake Features: shapes, matching, losses, training steps, inference."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from datasetdm_jax.decoders import (
    decode_heatmaps, feature_spec, gaussian_heatmaps, get_decoder, hungarian_match, instance_inference,
    joints_mse_loss, per_pixel_cross_entropy, segmentation_loss, semantic_inference, silog_loss)
from datasetdm_jax.decoders.matching import assign
from datasetdm_jax.features import Features

SEG = dict(num_classes=3, hidden=16, num_queries=5, num_layers=2, heads=2, ffn=32)


def fake_features(heads_layers: int, batch: int = 2, seed: int = 0) -> Features:
    """res {4, 8}; `heads_layers` = L*H of the attention (datasetdm-like > 1, lean-like 1). Numpy-made (no op compiles)."""
    rng = np.random.default_rng(seed)

    def attn(r):
        a = rng.uniform(size=(batch, r, r, heads_layers, 5)).astype(np.float32)
        return jnp.asarray(a / a.sum(-1, keepdims=True))

    return Features(maps={4: jnp.asarray(rng.normal(size=(batch, 4, 4, 12)).astype(np.float32)),
                          8: jnp.asarray(rng.normal(size=(batch, 8, 8, 6)).astype(np.float32))},
                    cross_attention={4: attn(4), 8: attn(8)})


DEPTH = dict(hidden=8, max_depth=10.0, out_size=32, head_size=16)
POSE = dict(hidden=8)
forward = nnx.jit(lambda m, f, *a: m(f, *a))


@pytest.fixture(scope="module")
def models():
    """One set of decoders on the datasetdm-like spec, shared by the shape and training tests."""
    spec = feature_spec(fake_features(3))
    return {"segmentation": get_decoder("segmentation", spec, SEG, rngs=nnx.Rngs(0)),
            "depth": get_decoder("depth", spec, DEPTH, rngs=nnx.Rngs(1)),
            "pose": get_decoder("pose", spec, POSE, rngs=nnx.Rngs(2))}


def test_forward_shapes_datasetdm(models):
    f = fake_features(3)
    assert feature_spec(f) == {4: (12, 15), 8: (6, 15)}
    out = forward(models["segmentation"], f)
    assert out["logits"].shape == (3, 2, 5, 4) and out["masks"].shape == (3, 2, 5, 20, 20)
    assert np.isfinite(out["masks"]).all()
    depth = forward(models["depth"], f)
    assert depth.shape == (2, 32, 32) and float(depth.min()) > 0 and float(depth.max()) < 10
    assert forward(models["pose"], f).shape == (2, 8, 8, 17)


def test_pose_head_at_heatmap_resolution():
    """`head_channels`: a 3x3 conv at the heatmap size before the 1x1 head. Without it the 1x1 head
    commutes with the bilinear resize, so the heatmap is the coarse one interpolated."""
    from datasetdm_jax.decoders.pixel_stem import resize

    f = fake_features(1)
    spec = feature_spec(f)
    plain = get_decoder("pose", spec, {**POSE, "out_size": 16}, rngs=nnx.Rngs(0))
    coarse = get_decoder("pose", spec, POSE, rngs=nnx.Rngs(0))  # same weights, heatmap at the features' 8
    np.testing.assert_allclose(forward(plain, f), resize(forward(coarse, f), 16), atol=1e-5)
    headed = get_decoder("pose", spec, {**POSE, "out_size": 16, "head_channels": 4}, rngs=nnx.Rngs(0))
    assert headed.conv.kernel.shape == (3, 3, plain.stem.out_channels, 4) and headed.head.kernel.shape == (1, 1, 4, 17)
    out = forward(headed, f)
    assert out.shape == (2, 16, 16, 17) and np.isfinite(out).all()


def test_forward_shapes_lean_open_vocab():
    f = fake_features(1)
    spec = feature_spec(f)
    assert spec == {4: (12, 5), 8: (6, 5)}
    seg_t = get_decoder("segmentation", spec, {**SEG, "text_dim": 7, "mask_size": 16}, rngs=nnx.Rngs(0))
    out = forward(seg_t, f, jnp.ones((2, 7)))
    assert out["masks"].shape == (3, 2, 5, 16, 16) and np.isfinite(out["masks"]).all()
    assert forward(get_decoder("pose", spec, POSE, rngs=nnx.Rngs(0)), f).shape == (2, 8, 8, 17)
    with pytest.raises(ValueError):
        get_decoder("nope", spec, {}, rngs=nnx.Rngs(0))


def test_assignment_is_optimal():
    rng = np.random.default_rng(0)
    cost = rng.normal(size=(3, 5, 4)).astype(np.float32)
    got = np.asarray(jax.jit(assign)(jnp.asarray(cost)))
    for c, g in zip(cost, got):
        best = min(itertools.permutations(range(5), 4), key=lambda p: sum(c[q, m] for m, q in enumerate(p)))
        assert sum(c[q, m] for m, q in enumerate(g)) == pytest.approx(sum(c[q, m] for m, q in enumerate(best)))
        assert len(set(g.tolist())) == 4


def test_assignment_splits_over_the_data_mesh():
    """Under a data mesh each device matches its own examples (the callback inside a shard_map, no
    gather to one device); the result equals the unsplit one."""
    from datasetdm_jax import devices

    cost = jnp.asarray(np.random.default_rng(1).normal(size=(4, 5, 4)).astype(np.float32))
    mesh = devices.data_mesh(4)
    assert mesh.size == 2
    _, data_sh = devices.data_shardings(mesh)
    split = devices.MeshJit(assign, mesh, in_shardings=(data_sh,), out_shardings=data_sh)
    hlo = split.lower(cost).as_text()
    assert "sdy.manual_computation" in hlo or "SPMDFullToShardShape" in hlo  # shardy / GSPMD spelling
    got = split(jax.device_put(cost, data_sh))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.jit(assign)(cost)))


def _gt():
    """One image, 3 slots (2 valid): class 0 on the left half, class 2 on a top-right square."""
    m = np.zeros((1, 3, 16, 16), np.float32)
    m[0, 0, :, :8] = 1
    m[0, 1, :6, 10:] = 1
    return jnp.array([[0, 2, 0]]), jnp.asarray(m), jnp.array([[True, True, False]])


def _perfect(gm, perm):
    """Outputs with queries perm[0], perm[1] predicting the GT exactly (others: no object)."""
    logits = np.full((1, 1, 4, 4), -10.0, np.float32)
    logits[..., 3] = 10.0
    masks = np.full((1, 1, 4, 16, 16), -10.0, np.float32)
    for slot, (q, c) in enumerate(zip(perm, (0, 2))):
        logits[0, 0, q] = -10.0
        logits[0, 0, q, c] = 10.0
        masks[0, 0, q] = np.where(np.asarray(gm[0, slot]) > 0, 10.0, -10.0)
    # Two identical decoder layers, so the aux (deep-supervision) sum is exercised too.
    return {"logits": jnp.asarray(np.concatenate([logits] * 2)), "masks": jnp.asarray(np.concatenate([masks] * 2))}


def test_matching_recovers_permutation():
    gc, gm, gv = _gt()
    out = _perfect(gm, (3, 1))
    q = hungarian_match(out["logits"][-1], out["masks"][-1], gc, gm, gv, jax.random.PRNGKey(0), num_points=256)
    assert q[0, :2].tolist() == [3, 1]


def test_segmentation_loss_perfect_vs_wrong():
    gc, gm, gv = _gt()
    key = jax.random.PRNGKey(1)
    loss = jax.jit(lambda o: segmentation_loss(o, gc, gm, gv, key, num_classes=3, num_points=256, aux=True))
    good_total, good = loss(_perfect(gm, (3, 1)))
    wrong = _perfect(gm, (3, 1))
    wrong = {"logits": wrong["logits"][..., ::-1], "masks": -wrong["masks"]}
    bad_total, bad = loss(wrong)
    assert all(np.isfinite(float(v)) for v in good.values())
    assert float(good["ce"]) < 1e-3 and float(good["dice"]) < 0.5 and float(good["bce"]) < 1.0
    assert float(bad_total) > 10 * float(good_total)
    assert float(silog_loss(jnp.full((1, 4, 4), 2.0), jnp.full((1, 4, 4), 2.0))) < 1e-2
    assert float(silog_loss(jnp.full((1, 4, 4), 2.0), jnp.array([[[1.0, 3.0, 0.0, 5.0]] * 4]))) > 0.1


def _train(model, loss_fn, steps=4, lr=3e-3):
    opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(steps)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def test_training_steps_decrease_losses(models):
    f = fake_features(3)
    gc, gm, gv = _gt()
    gc, gm, gv = (jnp.asarray(np.concatenate([x, x])) for x in (gc, gm, gv))
    key = jax.random.PRNGKey(0)
    _train(models["segmentation"],
           lambda m: segmentation_loss(m(f), gc, gm, gv, key, num_classes=3, num_points=128)[0])

    depth_gt = jnp.asarray(np.where(np.arange(32)[None, :, None] < 16, 2.0, 5.0) * np.ones((2, 32, 32), np.float32))
    _train(models["depth"], lambda m: silog_loss(m(f), depth_gt), lr=1e-2)

    kp = jnp.array([[[16.0, 16.0], [40.0, 8.0]] + [[0.0, 0.0]] * 15] * 2)
    target, weight = gaussian_heatmaps(kp, jnp.ones((2, 17)), 8, stride=8.0, sigma=1.0)
    _train(models["pose"], lambda m: joints_mse_loss(m(f), target, weight))


def test_heatmap_softmax_loss_and_heatmaps():
    """Hand-computed cross-entropy; the loss is minimal at the target; heatmaps of logits = log(target)
    peak at 1 where the target does, like JointsMSE's."""
    from datasetdm_jax.decoders.losses import heatmap_softmax_loss
    from datasetdm_jax.decoders.pose import softmax_heatmaps

    target = np.zeros((1, 2, 2, 2), np.float32)
    target[0, 0, 0, 0], target[0, 1, 1, 0] = 1.0, 1.0     # joint 0: two equal peaks -> 0.5 / 0.5
    weight = np.array([[1.0, 0.0]], np.float32)           # joint 1 unweighted
    logits = np.zeros((1, 2, 2, 2), np.float32)           # uniform: p = 1/4 everywhere
    assert float(heatmap_softmax_loss(jnp.asarray(logits), target, weight)) == pytest.approx(np.log(4.0), rel=1e-6)
    better = logits.copy()
    better[0, 0, 0, 0] = better[0, 1, 1, 0] = 5.0
    assert float(heatmap_softmax_loss(jnp.asarray(better), target, weight)) < np.log(4.0)

    kp = jnp.array([[[12.0, 20.0]] * 17])
    g, _ = gaussian_heatmaps(kp, jnp.ones((1, 17)), 32, sigma=1.0)
    hm = softmax_heatmaps(jnp.log(g + 1e-12), 1.0)
    assert float(hm[0, 20, 12, 0]) == pytest.approx(1.0, rel=1e-4)
    out, _ = decode_heatmaps(hm)
    np.testing.assert_allclose(np.asarray(out[0, :, :2]), np.tile([12.0, 20.0], (17, 1)))
    from datasetdm_jax.decoders import tasks
    with pytest.raises(ValueError, match="pose_loss"):
        tasks.TaskSpec(task="pose", image_size=64, num_classes=8, pose_loss="l1")


def test_heatmap_roundtrip_keeps_all_joints():
    kp = jnp.array([[[10.0, 20.0], [0.0, 0.0], [63.0, 30.0]] + [[32.0, 32.0]] * 14])
    vis = jnp.ones((1, 17)).at[0, 5].set(0)
    hm, w = jax.jit(gaussian_heatmaps, static_argnums=2)(kp, vis, 64)
    assert hm.shape == (1, 64, 64, 17) and float(hm[0, 20, 10, 0]) == pytest.approx(1.0)
    assert w[0, 5] == 0 and float(hm[..., 5].max()) == 0 and w[0, 1] == 1
    out, visible = jax.jit(decode_heatmaps)(hm)
    assert out.shape == (1, 17, 3)
    np.testing.assert_allclose(out[0, :3, :2], [[10, 20], [0, 0], [63, 30]], atol=0.25)
    assert visible[0, 1] and visible[0, 2] and not visible[0, 5]  # border joints kept
    # Sub-pixel keypoints survive a coarse heatmap: unrounded Gaussian centres, Taylor peak decoding.
    sub = jnp.array([[[10.3, 20.7], [33.1, 4.9]] + [[32.0, 32.0]] * 15])
    hm2, _ = gaussian_heatmaps(sub, jnp.ones((1, 17)), 32, stride=2.0, sigma=1.0)
    assert float(hm2[0, 10, 5, 0]) == pytest.approx(np.exp(-(0.15 ** 2 + 0.35 ** 2) / 2), rel=1e-5)  # (5.15, 10.35)
    np.testing.assert_allclose(decode_heatmaps(hm2, stride=2.0)[0][0, :2, :2], sub[0, :2], atol=1e-3)
    # A peak with no curvature beside it (a lone spike) decodes to its pixel.
    spike = jnp.zeros((1, 8, 8, 1)).at[0, 3, 4, 0].set(1.0)
    np.testing.assert_allclose(decode_heatmaps(spike, stride=4.0)[0][0, 0], [16.0, 12.0, 1.0])


def test_semantic_and_instance_inference():
    # 2 queries, 2 classes (+ no object). Query 0: class 1 on the left column; query 1: class 0 elsewhere.
    logits = jnp.array([[[-5.0, 5.0, -5.0], [5.0, -5.0, -5.0]]])
    m = np.full((1, 2, 2, 2), -5.0, np.float32)
    m[0, 0, :, 0] = 5.0
    m[0, 1, :, 1] = 5.0
    seg = semantic_inference(logits, jnp.asarray(m))
    np.testing.assert_array_equal(seg[0], [[1, 0], [1, 0]])
    np.testing.assert_array_equal(semantic_inference(logits, jnp.asarray(m), min_area=3, fill=0)[0], [[0, 0], [0, 0]])
    inst = instance_inference(logits, jnp.asarray(m), top_k=2)
    assert sorted(inst["labels"][0].tolist()) == [0, 1] and sorted(inst["query"][0].tolist()) == [0, 1]
    i = int(np.argmax(np.asarray(inst["query"][0]) == 0))
    np.testing.assert_array_equal(inst["masks"][0, i], [[True, False], [True, False]])
    assert 0.95 < float(inst["scores"][0, i]) <= 1.0


# ----------------------------------------------------------------------------- tasks (decoders/tasks.py)

from datasetdm_jax.decoders import tasks  # noqa: E402


def test_flip_batch_mirrors_keypoints_and_swaps_left_right():
    kp = np.zeros((1, 1, 17, 3), np.float32)
    kp[0, 0, 5] = (10.0, 4.0, 2)       # left shoulder
    kp[0, 0, 0] = (3.0, 1.0, 1)        # nose (occluded)
    img = np.random.default_rng(0).normal(size=(1, 4, 32, 3)).astype(np.float32)
    inst = np.zeros((1, 2, 4, 32), bool)
    inst[0, 0, :, :3] = True
    b = {"image": img, "keypoints": kp, "instances": inst}
    f = tasks.flip_batch(b, np.array([True]))
    assert tuple(f["keypoints"][0, 0, 6]) == (22.0, 4.0, 2)          # now the right shoulder, x -> W - x
    assert tuple(f["keypoints"][0, 0, 0]) == (29.0, 1.0, 1) and f["keypoints"][0, 0, 5, 2] == 0
    assert f["instances"][0, 0, :, -3:].all() and not f["instances"][0, 0, :, :-3].any()
    np.testing.assert_array_equal(f["image"][0], img[0, :, ::-1])
    back = tasks.flip_batch(f, np.array([True]))
    np.testing.assert_array_equal(back["keypoints"], kp)
    np.testing.assert_array_equal(tasks.flip_batch(b, np.array([False]))["keypoints"], kp)


def test_pose_targets_draw_every_person_and_weight_visible_joints():
    spec = tasks.TaskSpec("pose", image_size=32, num_classes=8, sigma=1.0)
    kp = np.zeros((1, 3, 17, 3), np.float32)
    kp[0, 0, 0] = (8.0, 8.0, 2)
    kp[0, 1, 0] = (24.0, 20.0, 1)
    kp[0, 2, 1] = (4.0, 4.0, 2)        # third slot is padding (num_persons = 2): ignored
    target, weight = tasks.pose_targets(spec, jnp.asarray(kp), jnp.asarray([2]), 16)
    assert target.shape == (1, 16, 16, 17) and weight.shape == (1, 17)
    assert float(target[0, 4, 4, 0]) == 1.0 and float(target[0, 10, 12, 0]) == 1.0
    assert float(weight[0, 0]) == 1.0 and float(weight[0, 1]) == 0.0 and float(target[..., 1].max()) == 0.0


def test_task_predict_and_evaluator_score_a_perfect_instance_prediction():
    spec = tasks.TaskSpec("instance", image_size=8, num_classes=4, top_k=1)   # one (query, class) pair kept
    # 2 queries, head classes 3 (+ no-object); query 0 says head class 1 (data class 2) on the left half.
    logits = jnp.asarray([[[-9, 9, -9, -9], [-9, -9, -9, 9]]], jnp.float32)[None]
    masks = np.full((1, 1, 2, 8, 8), -9.0, np.float32)
    masks[..., 0, :, :4] = 9.0
    pred = jax.device_get(tasks.task_predict(spec, {"logits": logits, "masks": jnp.asarray(masks)}))
    assert pred["labels"][0, 0] == 2 and pred["masks"][0, 0, :, :4].all() and not pred["masks"][0, 0, :, 4:].any()
    gt = np.zeros((1, 3, 8, 8), bool)
    gt[0, 0, :, :4] = True
    ev = tasks.Evaluator(spec)
    ev.update(pred, {"instances": gt, "instance_classes": np.array([[2, 0, 0]]), "num_instances": np.array([1])})
    r = ev.compute()
    assert r["AP"] == pytest.approx(1.0) and r["ap_agnostic"] == pytest.approx(1.0)
    ev = tasks.Evaluator(spec)                          # right mask, wrong class: class-aware AP 0
    ev.update(pred, {"instances": gt, "instance_classes": np.array([[3, 0, 0]]), "num_instances": np.array([1])})
    r = ev.compute()
    assert r["AP"] == pytest.approx(0.0) and r["ap_agnostic"] == pytest.approx(1.0)


def test_pose_prediction_at_the_keypoints_scores_ap_one():
    spec = tasks.TaskSpec("pose", image_size=32, num_classes=8, sigma=1.0)
    rng = np.random.default_rng(0)
    kp = np.zeros((1, 1, 17, 3), np.float32)
    kp[0, 0, :, :2] = rng.integers(4, 28, size=(17, 2)) // 2 * 2      # on the stride-2 grid
    kp[0, 0, :, 2] = 2
    hm, _ = tasks.pose_targets(spec, jnp.asarray(kp), jnp.asarray([1]), 16)
    pred = jax.device_get(tasks.task_predict(spec, hm))
    assert pred["keypoints"].shape == (1, 1, 17, 3)
    ev = tasks.Evaluator(spec)
    ev.update(pred, {"keypoints": kp, "num_persons": np.array([1])})
    assert ev.compute()["AP"] == pytest.approx(1.0)


def test_deep_supervision_adds_every_layer_and_is_refused_for_depth(models):
    f = fake_features(3)
    out = forward(models["segmentation"], f)
    seg = np.zeros((2, 8, 8), np.int32)
    seg[:, :4] = 1
    batch = {"segmentation": jnp.asarray(seg)}
    kw = dict(image_size=8, num_classes=3, num_points=16)
    last, _ = tasks.task_loss(tasks.TaskSpec("semantic", **kw), out, batch, jax.random.key(0))
    deep, _ = tasks.task_loss(tasks.TaskSpec("semantic", deep_supervision=True, **kw), out, batch, jax.random.key(0))
    assert np.isfinite(float(deep)) and float(deep) > float(last) > 0
    with pytest.raises(ValueError, match="deep_supervision"):
        tasks.TaskSpec("depth", deep_supervision=True, **kw)


def test_evaluator_scores_semantic_labels_grounded_in_the_image_classes():
    # Truth: class 2 on the left half, background on the right. The decoder prefers class 3 (absent
    # from the image) on the left: wrong over all classes, right once only the image's classes count.
    spec = tasks.TaskSpec("semantic", image_size=8, num_classes=4)
    scores = np.zeros((1, 4, 8, 8), np.float32)
    scores[0, 0, :, 4:] = 1.0
    scores[0, 3, :, :4], scores[0, 2, :, :4] = 0.9, 0.6
    gt = np.zeros((1, 8, 8), np.int32)
    gt[0, :, :4] = 2
    assert np.asarray(tasks.classes_present(gt, 4)).tolist() == [[True, False, True, False]]
    pred = jax.jit(lambda s, t: tasks.semantic_predictions(spec, s, t))(scores, gt)
    ev = tasks.Evaluator(spec)
    ev.update(pred, {"segmentation": gt})
    r = ev.compute()
    assert r["miou_grounded"] == pytest.approx(1.0) and r["miou"] < 0.5
    ev = tasks.Evaluator(spec)                          # predictions made without the truth: no grounded score
    ev.update(tasks.semantic_predictions(spec, scores), {"segmentation": gt})
    assert "miou_grounded" not in ev.compute()


def test_per_pixel_head_learns_ignores_255_and_scores_sum_to_one():
    spec = tasks.TaskSpec("semantic", image_size=16, num_classes=3, semantic_head="per_pixel")
    f = fake_features(3)
    model = tasks.build_decoder(spec, feature_spec(f), {"hidden": 8}, rngs=nnx.Rngs(0))
    seg = np.zeros((2, 16, 16), np.int32)
    seg[:, :8] = 1
    seg[1, 8:, 8:] = 2
    ignored = seg.copy()
    ignored[:, :, :4] = 255
    graph, params = nnx.split(model)
    tx = optax.adam(1e-2)

    @jax.jit
    def step(p, opt, seg):
        loss, g = jax.value_and_grad(lambda p: tasks.task_loss(spec, nnx.merge(graph, p)(f), {"segmentation": seg},
                                                               jax.random.key(0))[0])(p)
        u, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, u), opt, loss

    out = nnx.merge(graph, params)(f)
    assert out["logits"].shape == (2, 16, 16, 3)
    # 255 pixels carry no loss: the same logits score differently once a wrong region is ignored
    logits = np.zeros((2, 16, 16, 3), np.float32)
    logits[:, :, :4, 2] = 10.0                                     # confidently wrong where 255
    full = float(per_pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(seg)))
    assert float(per_pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(ignored))) < full
    opt, losses = tx.init(params), []
    for _ in range(30):
        params, opt, loss = step(params, opt, jnp.asarray(seg))
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses
    scores = tasks.semantic_class_scores(spec, nnx.merge(graph, params)(f))
    assert scores.shape == (2, 3, 16, 16)
    np.testing.assert_allclose(np.asarray(scores.sum(1)), 1.0, rtol=1e-5)
    pred = tasks.task_predict(spec, nnx.merge(graph, params)(f), jnp.asarray(seg))
    assert float((pred["segmentation_grounded"] == seg).mean()) > 0.9


def test_per_pixel_head_is_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match="semantic_head='per_pixel' applies to task 'semantic'"):
        tasks.TaskSpec("instance", image_size=8, num_classes=3, semantic_head="per_pixel")
    with pytest.raises(ValueError, match="deep_supervision applies to the Mask2Former head"):
        tasks.TaskSpec("semantic", image_size=8, num_classes=3, semantic_head="per_pixel", deep_supervision=True)
    with pytest.raises(ValueError, match="semantic_head must be one of"):
        tasks.TaskSpec("semantic", image_size=8, num_classes=3, semantic_head="fcn")
