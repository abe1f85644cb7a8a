"""Parity of datasetdm_jax.schedulers with diffusers' schedulers (timesteps, full loops, noising)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from datasetdm_jax import schedulers as S

import diffusers
import torch
from tiny_sd import rel_err

_BASE = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "trained_betas": None, "clip_sample": False,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
}
CONFIGS = {
    # Stable Diffusion 1.5's scheduler_config.json.
    "sd15": {"_class_name": "PNDMScheduler", **_BASE, "prediction_type": "epsilon",
             "timestep_spacing": "leading"},
    # Stable Diffusion 2.x (768, v-prediction).
    "sd2v": {"_class_name": "DDIMScheduler", **_BASE, "prediction_type": "v_prediction",
             "timestep_spacing": "leading"},
    "trailing": {"_class_name": "DDIMScheduler", **_BASE, "prediction_type": "epsilon",
                 "timestep_spacing": "trailing", "steps_offset": 0},
    "linspace_v": {"_class_name": "DPMSolverMultistepScheduler", **_BASE,
                   "prediction_type": "v_prediction", "timestep_spacing": "linspace"},
    "karras": {"_class_name": "DPMSolverMultistepScheduler", **_BASE, "prediction_type": "epsilon",
               "timestep_spacing": "leading", "use_karras_sigmas": True},
    "cosine_sample_clip": {"_class_name": "DDIMScheduler", **_BASE, "beta_schedule": "squaredcos_cap_v2",
                           "prediction_type": "sample", "clip_sample": True, "set_alpha_to_one": True,
                           "timestep_spacing": "linspace"},
    "linear_heun_sigmamin": {"_class_name": "DPMSolverMultistepScheduler", **_BASE,
                             "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                             "prediction_type": "epsilon", "timestep_spacing": "trailing",
                             "solver_type": "heun", "final_sigmas_type": "sigma_min"},
}
CASES = {
    "ddim": ["sd15", "sd2v", "trailing", "linspace_v", "cosine_sample_clip"],
    "pndm": ["sd15", "sd2v", "trailing", "linspace_v"],
    "dpmpp_2m": ["sd15", "sd2v", "trailing", "linspace_v", "karras", "linear_heun_sigmamin"],
}
TORCH_CLASS = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}
PARAMS = [(s, c, n) for s, cs in CASES.items() for c in cs for n in (10, 25)]
SHAPE = (2, 4, 8, 8)

_rng = np.random.default_rng(0)
R = _rng.standard_normal(SHAPE).astype(np.float32)
X_T = _rng.standard_normal(SHAPE).astype(np.float32)


def fake_model(x, t, xp):
    """Deterministic stand-in for a UNet: depends on the sample and (non-linearly) on t."""
    return 0.1 * x + xp.cos(t / 137.0) * R


def torch_scheduler(sampler: str, cfg: dict):
    return getattr(diffusers, TORCH_CLASS[sampler]).from_config(cfg)


def torch_loop(sampler: str, cfg: dict, n: int):
    """Reference: diffusers' own loop in float32; returns (timesteps, per-step samples)."""
    sch = torch_scheduler(sampler, cfg)
    sch.set_timesteps(n)
    x = torch.from_numpy(X_T.copy())
    r = torch.from_numpy(R)
    outs = []
    for t in sch.timesteps:
        out = 0.1 * x + torch.cos(t.to(torch.float32) / 137.0) * r
        x = sch.step(out, t, x).prev_sample
        outs.append(x.numpy().copy())
    return sch.timesteps.numpy(), np.stack(outs)


@functools.lru_cache(maxsize=None)
def jitted_runner(sampler: str):
    """One compile per (sampler, number of steps): coefficients arrive as traced state."""
    smp = S.get_sampler(sampler)

    @jax.jit
    def run(state, x):
        def body(i, carry):
            x, st = carry
            return smp.step(st, fake_model(x, st["timesteps"][i].astype(jnp.float32), jnp), i, x)

        return jax.lax.fori_loop(0, state["timesteps"].shape[0], body, (x, state))[0]

    return run


@functools.lru_cache(maxsize=None)
def jitted_scan(sampler: str):
    """Per-step samples, with the loop index traced inside lax.scan."""
    smp = S.get_sampler(sampler)

    @jax.jit
    def run(state, x):
        def body(carry, i):
            x, st = carry
            x, st = smp.step(st, fake_model(x, st["timesteps"][i].astype(jnp.float32), jnp), i, x)
            return (x, st), x

        return jax.lax.scan(body, (x, state), jnp.arange(state["timesteps"].shape[0]))[1]

    return run


@pytest.mark.parametrize("sampler,cfg_name,n", PARAMS)
def test_loop_matches_diffusers(sampler, cfg_name, n):
    cfg_dict = CONFIGS[cfg_name]
    cfg = S.ScheduleConfig.from_dict(cfg_dict)
    smp = S.get_sampler(sampler)
    ref_ts, ref_xs = torch_loop(sampler, cfg_dict, n)
    ts = smp.timesteps(cfg, n)
    np.testing.assert_array_equal(ts, ref_ts)
    state = smp.init(cfg, n, jnp.asarray(X_T))
    np.testing.assert_array_equal(np.asarray(state["timesteps"]), ref_ts)
    out = jitted_runner(sampler)(state, jnp.asarray(X_T))
    assert np.isfinite(np.asarray(out)).all()
    assert rel_err(out, ref_xs[-1]) < 1e-5, rel_err(out, ref_xs[-1])


@pytest.mark.parametrize("sampler", list(CASES))
@pytest.mark.parametrize("cfg_name", ["sd15", "sd2v"])
def test_per_step_matches_diffusers(sampler, cfg_name):
    n = 10
    cfg = S.ScheduleConfig.from_dict(CONFIGS[cfg_name])
    _, ref_xs = torch_loop(sampler, CONFIGS[cfg_name], n)
    xs = jitted_scan(sampler)(S.get_sampler(sampler).init(cfg, n, jnp.asarray(X_T)), jnp.asarray(X_T))
    assert xs.shape == ref_xs.shape
    for k in range(len(ref_xs)):
        assert rel_err(xs[k], ref_xs[k]) < 1e-5, (k, rel_err(xs[k], ref_xs[k]))


@pytest.mark.parametrize("sampler", list(CASES))
def test_sample_loop_jit(sampler):
    """The convenience loop, jitted with static config, gives the reference result too."""
    n = 10
    cfg = S.ScheduleConfig.from_dict(CONFIGS["sd15"])
    smp = S.get_sampler(sampler)

    @functools.partial(jax.jit, static_argnums=(0,))
    def gen(cfg, x):
        return S.sample_loop(smp, cfg, n, lambda x, t: fake_model(x, t.astype(jnp.float32), jnp), x)

    _, ref_xs = torch_loop(sampler, CONFIGS["sd15"], n)
    assert rel_err(gen(cfg, jnp.asarray(X_T)), ref_xs[-1]) < 1e-5


@pytest.mark.parametrize("sampler", list(CASES))
def test_sample_loop_threads_a_carry_through_every_call(sampler):
    """With a carry (here: a call counter and the sum of timesteps seen), the samples are those of the
    plain loop, every model call (the last one too) updates it, and the last call's aux comes back."""
    n = 6
    cfg = S.ScheduleConfig.from_dict(CONFIGS["sd15"])
    smp = S.get_sampler(sampler)
    model = lambda x, t: fake_model(x, t.astype(jnp.float32), jnp)  # noqa: E731

    def counted(x, t, c):
        return model(x, t), (c[0] + 1, c[1] + t)

    def last(x, t, c):
        return model(x, t), t, (c[0] + 1, c[1] + t)

    x_T = jnp.asarray(X_T)
    plain = jax.jit(lambda x: S.sample_loop(smp, cfg, n, model, x))(x_T)
    zero = (jnp.int32(0), jnp.int32(0))
    x0, (calls, t_sum) = jax.jit(lambda x: S.sample_loop(smp, cfg, n, counted, x, carry=zero))(x_T)
    x1, t_last, (calls1, t_sum1) = jax.jit(lambda x: S.sample_loop(smp, cfg, n, counted, x, last, zero))(x_T)
    ts = smp.timesteps(cfg, n)
    np.testing.assert_array_equal(np.asarray(x0), np.asarray(plain))
    np.testing.assert_allclose(np.asarray(x1), np.asarray(plain), rtol=1e-5, atol=1e-6)  # last call unrolled
    assert int(calls) == int(calls1) == len(ts) and int(t_sum) == int(t_sum1) == int(np.sum(ts))
    assert int(t_last) == int(ts[-1])


def test_pndm_makes_one_extra_model_call():
    cfg = S.ScheduleConfig.from_dict(CONFIGS["sd15"])
    ts = S.get_sampler("pndm").timesteps(cfg, 10)
    assert len(ts) == 11 and ts[1] == ts[2]


@pytest.mark.parametrize("cfg_name", ["sd15", "cosine_sample_clip", "linear_heun_sigmamin"])
def test_add_noise_and_velocity(cfg_name):
    cfg_dict = CONFIGS[cfg_name]
    cfg = S.ScheduleConfig.from_dict(cfg_dict)
    ref = diffusers.DDPMScheduler.from_config(cfg_dict)
    np.testing.assert_allclose(S.alphas_cumprod(cfg), ref.alphas_cumprod.numpy(), rtol=0, atol=0)
    x0, noise = X_T, R
    tb = np.array([0, 999], np.int64)
    tt = torch.from_numpy(tb)
    add = jax.jit(S.add_noise, static_argnums=0)
    got = add(cfg, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(tb))
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
    assert rel_err(got, want) < 1e-6
    got1 = S.add_noise(cfg, jnp.asarray(x0), jnp.asarray(noise), 500)
    want1 = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.tensor([500])).numpy()
    assert rel_err(got1, want1) < 1e-6
    vel = S.get_velocity(cfg, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(tb))
    want_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
    assert rel_err(vel, want_v) < 1e-6


@pytest.mark.parametrize("patch", [
    {"beta_schedule": "sigmoid"},
    {"prediction_type": "flow_prediction"},
    {"timestep_spacing": "karras"},
    {"num_train_timesteps": 0},
    {"steps_offset": "1"},
    {"beta_start": 0.5, "beta_end": 0.1},
    {"set_alpha_to_one": "no"},
    {"thresholding": True},
    {"rescale_betas_zero_snr": True},
    {"trained_betas": [0.1, 0.2]},
    {"use_lu_lambdas": True},
])
def test_bad_config_values(patch):
    with pytest.raises(ValueError, match="scheduler config"):
        S.ScheduleConfig.from_dict({**CONFIGS["sd15"], **patch})


def test_sampler_specific_refusals():
    prk = S.ScheduleConfig.from_dict({**CONFIGS["sd15"], "skip_prk_steps": False})
    with pytest.raises(ValueError, match="skip_prk_steps"):
        S.get_sampler("pndm").timesteps(prk, 10)
    S.get_sampler("ddim").timesteps(prk, 10)  # irrelevant to DDIM
    with pytest.raises(ValueError, match="algorithm_type"):
        S.get_sampler("dpmpp_2m").timesteps(
            S.ScheduleConfig.from_dict({**CONFIGS["sd15"], "algorithm_type": "dpmsolver"}), 10)
    with pytest.raises(ValueError, match="prediction_type"):
        S.get_sampler("pndm").timesteps(S.ScheduleConfig.from_dict(CONFIGS["cosine_sample_clip"]), 10)
    with pytest.raises(ValueError, match="unknown sampler"):
        S.get_sampler("heun")  # not implemented here
    with pytest.raises(ValueError, match="num_steps"):
        S.get_sampler("ddim").timesteps(S.ScheduleConfig.from_dict(CONFIGS["sd15"]), 0)


def test_defaults_and_names():
    assert S.default_sampler_name(S.ScheduleConfig.from_dict(CONFIGS["sd15"])) == "pndm"
    assert S.default_sampler_name(S.ScheduleConfig.from_dict(CONFIGS["sd2v"])) == "ddim"
    assert S.default_sampler_name(S.ScheduleConfig.from_dict(CONFIGS["karras"])) == "dpmpp_2m"
    cfg = S.ScheduleConfig.from_dict({"_class_name": "DDIMScheduler", "unknown_key": 3})
    assert cfg.clip_sample and cfg.set_alpha_to_one and cfg.timestep_spacing == "leading"
    hash(S.ScheduleConfig.from_dict(CONFIGS["sd15"]))  # usable as a static jit argument


def test_bf16_sample_keeps_dtype():
    """Low-precision latents stay low precision; the update itself runs in float32."""
    cfg = S.ScheduleConfig.from_dict(CONFIGS["sd15"])
    x = jnp.asarray(X_T, jnp.bfloat16)
    for name in CASES:
        out = jax.jit(lambda x: S.sample_loop(S.get_sampler(name), cfg, 4,
                                              lambda x, t: 0.1 * x, x))(x)
        assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out.astype(jnp.float32)).all())
