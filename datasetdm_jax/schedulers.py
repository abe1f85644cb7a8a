"""Diffusion samplers as pure, jittable functions of a diffusers schedule (``noise_schedule``:
``ScheduleConfig``, ``alphas_cumprod``, ``add_noise``, ``get_velocity``, named here too).

Everything that depends on the number of inference steps (timesteps, per-step coefficients, which
solver order each step uses) is computed once in numpy when a sampler state is built, so the
sampling loop is a ``jax.lax.fori_loop`` whose body only indexes precomputed arrays with the
(traced) loop index ``i``. The numbers follow diffusers' ``DDIMScheduler``, ``PNDMScheduler``
(PLMS mode) and ``DPMSolverMultistepScheduler`` (DPM-Solver++ 2M), so the same number of model
calls at the same timesteps gives the same samples.

Usage::

    cfg = ScheduleConfig.from_dict(json.load(open(".../scheduler/scheduler_config.json")))
    sampler = get_sampler(default_sampler_name(cfg))          # or "ddim" / "pndm" / "dpmpp_2m"
    x0 = jax.jit(lambda x: sample_loop(sampler, cfg, 50, model_fn, x))(x_T)

Supported subset (anything else is refused with a one-line ``ValueError``): beta schedules
``linear``, ``scaled_linear``, ``squaredcos_cap_v2`` or ``trained_betas``; prediction types
``epsilon``, ``v_prediction``, ``sample`` (not for PNDM, as in diffusers); timestep spacings
``leading``, ``trailing``, ``linspace``; deterministic sampling only (DDIM eta = 0). PNDM runs
PLMS only (``skip_prk_steps=True``, the SD 1.x setting); PRK warm-up is refused. DPM-Solver is the
``dpmsolver++`` algorithm with order 1 or 2, ``midpoint`` or ``heun``, optional Karras sigmas.
Euler (``EulerDiscreteScheduler``, SDXL's) is the deterministic one (s_churn = 0) with epsilon
prediction, ``leading`` spacing and linearly interpolated sigmas.
No thresholding, no zero-terminal-SNR rescaling.

Longer than 400 lines: four samplers sharing the spacing and coefficient helpers, kept private here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from datasetdm_jax.noise_schedule import ScheduleConfig, add_noise, alphas_cumprod, get_velocity, unsupported

__all__ = [
    "ScheduleConfig",
    "Sampler",
    "SAMPLERS",
    "alphas_cumprod",
    "add_noise",
    "get_velocity",
    "get_sampler",
    "default_sampler_name",
    "sample_loop",
    "ddim_timesteps",
]

_CLASS_TO_SAMPLER = {
    "DDIMScheduler": "ddim",
    "PNDMScheduler": "pndm",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "EulerDiscreteScheduler": "euler",
}


# ----------------------------------------------------------------------------------------------
# Samplers: numpy precomputation + a jittable step indexed by the loop counter
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sampler:
    """A named sampler.

    ``timesteps(cfg, n)`` gives the timestep fed to the model at each of the loop iterations (its
    length is the number of model calls); ``init(cfg, n, sample)`` builds the state pytree (arrays
    only: precomputed coefficients, ``timesteps``, history buffers); ``step(state, model_output, i,
    sample)`` returns ``(prev_sample, state)`` and is traceable with ``i`` a traced integer.
    All three samplers take x_T = unit Gaussian noise (init_noise_sigma 1) and unscaled model input.
    """

    name: str
    timesteps: Callable[[ScheduleConfig, int], np.ndarray]
    init: Callable[[ScheduleConfig, int, jax.Array], dict]
    step: Callable[[dict, jax.Array, jax.Array, jax.Array], tuple[jax.Array, dict]]
    init_noise_sigma: float = 1.0

    def scale_model_input(self, sample: jax.Array, i: jax.Array | int | None = None) -> jax.Array:
        """Identity for these samplers; kept so callers can be written sampler-agnostically."""
        return sample


def _check_steps(cfg: ScheduleConfig, num_steps: int) -> None:
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if num_steps > cfg.num_train_timesteps:
        raise ValueError(f"num_steps={num_steps} exceeds num_train_timesteps={cfg.num_train_timesteps}")


def _spaced(cfg: ScheduleConfig, n: int) -> np.ndarray:
    """DDIM/PNDM spacing of n timesteps, descending."""
    T = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    if cfg.timestep_spacing == "leading":
        return (np.arange(n) * (T // n))[::-1].astype(np.int64) + cfg.steps_offset
    return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1  # trailing


def _abar_at(ac: np.ndarray, t: np.ndarray, final: float) -> np.ndarray:
    """alphas_cumprod at t (float64), with ``final`` where t < 0 (one step past the end)."""
    return np.where(t >= 0, ac[np.clip(t, 0, None)].astype(np.float64), final)


def _final_abar(cfg: ScheduleConfig, ac: np.ndarray) -> float:
    return 1.0 if cfg.set_alpha_to_one else float(ac[0])


def _f32(**arrays: np.ndarray) -> dict[str, jax.Array]:
    return {k: jnp.asarray(np.asarray(v, np.float64), jnp.float32) for k, v in arrays.items()}


# --- DDIM (eta = 0) ---------------------------------------------------------------------------

def ddim_timesteps(cfg: ScheduleConfig, num_steps: int) -> np.ndarray:
    _check_steps(cfg, num_steps)
    return _spaced(cfg, num_steps)


def _ddim_init(cfg: ScheduleConfig, num_steps: int, sample: jax.Array) -> dict:
    ts = ddim_timesteps(cfg, num_steps)
    ac = alphas_cumprod(cfg)
    a_t = ac[ts].astype(np.float64)
    # diffusers steps back by the *leading* stride whatever the spacing; mirrored on purpose.
    a_prev = _abar_at(ac, ts - cfg.num_train_timesteps // num_steps, _final_abar(cfg, ac))
    sa, sb = np.sqrt(a_t), np.sqrt(1 - a_t)
    zero, one = np.zeros_like(sa), np.ones_like(sa)
    # x0 = x0_x * x + x0_m * out ; eps = e_x * x + e_m * out
    if cfg.prediction_type == "epsilon":
        x0_x, x0_m, e_x, e_m = 1 / sa, -sb / sa, zero, one
    elif cfg.prediction_type == "sample":
        x0_x, x0_m, e_x, e_m = zero, one, 1 / sb, -sa / sb
    else:  # v_prediction
        x0_x, x0_m, e_x, e_m = sa, -sb, sb, sa
    coef = _f32(x0_x=x0_x, x0_m=x0_m, e_x=e_x, e_m=e_m, sa_prev=np.sqrt(a_prev),
                sb_prev=np.sqrt(1 - a_prev))
    clip = cfg.clip_sample_range if cfg.clip_sample else math.inf
    return {"timesteps": jnp.asarray(ts, jnp.int32), "coef": coef,
            "clip": jnp.asarray(clip, jnp.float32)}


def _ddim_step(state: dict, model_output: jax.Array, i: jax.Array, sample: jax.Array):
    c = {k: v[i] for k, v in state["coef"].items()}
    x, m = sample.astype(jnp.float32), model_output.astype(jnp.float32)
    x0 = jnp.clip(c["x0_x"] * x + c["x0_m"] * m, -state["clip"], state["clip"])
    eps = c["e_x"] * x + c["e_m"] * m
    prev = c["sa_prev"] * x0 + c["sb_prev"] * eps
    return prev.astype(sample.dtype), state


# --- PNDM in PLMS mode ------------------------------------------------------------------------

def _pndm_check(cfg: ScheduleConfig) -> None:
    if not cfg.skip_prk_steps:
        raise ValueError("scheduler config: skip_prk_steps=False (PNDM Runge-Kutta warm-up) is not "
                         "supported; set skip_prk_steps=true (the Stable Diffusion setting)")
    if cfg.prediction_type == "sample":
        raise unsupported("prediction_type", "sample", "epsilon or v_prediction for PNDM")


def _pndm_timesteps(cfg: ScheduleConfig, num_steps: int) -> np.ndarray:
    """PLMS timesteps: the second one is repeated, so there are num_steps + 1 model calls."""
    _check_steps(cfg, num_steps)
    _pndm_check(cfg)
    asc = _spaced(cfg, num_steps)[::-1]  # ascending, as PNDM builds them
    return np.concatenate([asc[:-1], asc[-2:-1], asc[-1:]])[::-1].astype(np.int64)


def _pndm_init(cfg: ScheduleConfig, num_steps: int, sample: jax.Array) -> dict:
    ts = _pndm_timesteps(cfg, num_steps)
    n = len(ts)
    ac = alphas_cumprod(cfg)
    stride = cfg.num_train_timesteps // num_steps
    idx = np.arange(n)
    # Step 1 redoes step 0's interval with the averaged output (a Heun-like second call).
    t_cur = np.where(idx == 1, ts + stride, ts)
    t_prev = np.where(idx == 1, ts, ts - stride)
    a_t = ac[t_cur].astype(np.float64)
    a_p = _abar_at(ac, t_prev, _final_abar(cfg, ac))
    # PNDM paper eq. (9): x_prev = sc * x - mc * eps
    sc = np.sqrt(a_p / a_t)
    mc = (a_p - a_t) / (a_t * np.sqrt(1 - a_p) + np.sqrt(a_t * (1 - a_t) * a_p))
    if cfg.prediction_type == "v_prediction":  # eps = sqrt(a) v + sqrt(1-a) x
        x_coef, m_coef = sc - mc * np.sqrt(1 - a_t), -mc * np.sqrt(a_t)
    else:
        x_coef, m_coef = sc, -mc
    # Linear-multistep weights on (current output, last three stored outputs, newest first).
    w = np.zeros((n, 4))
    w[:, :] = [55 / 24, -59 / 24, 37 / 24, -9 / 24]
    w[0] = [1, 0, 0, 0]
    if n > 1:
        w[1] = [0.5, 0.5, 0, 0]
    if n > 2:
        w[2] = [1.5, -0.5, 0, 0]
    if n > 3:
        w[3] = [23 / 12, -16 / 12, 5 / 12, 0]
    coef = _f32(x=x_coef, m=m_coef, w=w)
    zeros = jnp.zeros(sample.shape, jnp.float32)
    return {"timesteps": jnp.asarray(ts, jnp.int32), "coef": coef,
            "ets": jnp.zeros((3,) + sample.shape, jnp.float32), "first_sample": zeros}


def _pndm_step(state: dict, model_output: jax.Array, i: jax.Array, sample: jax.Array):
    c = {k: v[i] for k, v in state["coef"].items()}
    m = model_output.astype(jnp.float32)
    ets = state["ets"]
    w = c["w"].reshape((4,) + (1,) * m.ndim)
    combined = w[0] * m + jnp.sum(w[1:] * ets, axis=0)
    # Step 1 restarts from the sample given to step 0; it does not store its own output.
    x = jnp.where(i == 1, state["first_sample"], sample.astype(jnp.float32))
    prev = c["x"] * x + c["m"] * combined
    pushed = jnp.concatenate([m[None], ets[:2]], axis=0)
    new_state = dict(state)
    new_state["ets"] = jnp.where(i == 1, ets, pushed)
    new_state["first_sample"] = jnp.where(i == 0, sample.astype(jnp.float32), state["first_sample"])
    return prev.astype(sample.dtype), new_state


# --- DPM-Solver++ multistep (order <= 2) ------------------------------------------------------

def _dpm_check(cfg: ScheduleConfig) -> None:
    if cfg.algorithm_type not in ("dpmsolver++", "deis"):  # diffusers maps deis to dpmsolver++
        raise unsupported("algorithm_type", cfg.algorithm_type, "dpmsolver++")
    if cfg.solver_order > 2:
        raise unsupported("solver_order", cfg.solver_order, "1 or 2")


def _dpm_sigmas(cfg: ScheduleConfig, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps int64 (n,), sigmas float32 (n + 1,)) exactly as diffusers' set_timesteps."""
    _check_steps(cfg, num_steps)
    _dpm_check(cfg)
    T = cfg.num_train_timesteps
    ac = alphas_cumprod(cfg)
    lam = (np.log(np.sqrt(ac)) - np.log(np.sqrt(np.float32(1) - ac))).astype(np.float32)
    last = T - int(np.searchsorted(lam[::-1], cfg.lambda_min_clipped, side="left"))
    n = num_steps
    if cfg.timestep_spacing == "linspace":
        ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif cfg.timestep_spacing == "leading":
        ts = (np.arange(n + 1) * (last // (n + 1)))[::-1][:-1].astype(np.int64) + cfg.steps_offset
    else:
        ts = np.arange(last, 0, -T / n).round().astype(np.int64) - 1
    sig_train = (((np.float32(1) - ac) / ac) ** np.float32(0.5)).astype(np.float32)
    log_sig = np.log(sig_train)
    if cfg.use_karras_sigmas:
        rho = 7.0
        lo, hi = float(sig_train[0]) ** (1 / rho), float(sig_train[-1]) ** (1 / rho)
        sigmas = (hi + np.linspace(0, 1, n) * (lo - hi)) ** rho
        ts_f = _sigma_to_t(sigmas, log_sig)
        if cfg.beta_schedule != "squaredcos_cap_v2":
            ts_f = ts_f.round()
        ts = ts_f.astype(np.int64)
    else:
        sigmas = np.interp(ts, np.arange(T), sig_train)
    last_sigma = float(np.sqrt((1 - ac[0]) / ac[0])) if cfg.final_sigmas_type == "sigma_min" else 0.0
    return ts, np.concatenate([sigmas, [last_sigma]]).astype(np.float32)


def _sigma_to_t(sigmas: np.ndarray, log_sig: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, by linear interpolation in log-sigma."""
    log_s = np.log(np.maximum(sigmas, 1e-10))
    above = (log_s[None, :] - log_sig[:, None]) >= 0
    low = np.cumsum(above, axis=0).argmax(axis=0).clip(max=len(log_sig) - 2)
    w = np.clip((log_sig[low] - log_s) / (log_sig[low] - log_sig[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _dpm_timesteps(cfg: ScheduleConfig, num_steps: int) -> np.ndarray:
    return _dpm_sigmas(cfg, num_steps)[0]


def _dpm_init(cfg: ScheduleConfig, num_steps: int, sample: jax.Array) -> dict:
    ts, sig = _dpm_sigmas(cfg, num_steps)
    n = len(ts)
    sig = sig.astype(np.float64)
    alpha = 1 / np.sqrt(sig ** 2 + 1)
    sigma = sig * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)  # +inf at a zero final sigma
    s_a, s_s, s_l = alpha[:-1], sigma[:-1], lam[:-1]  # at the current step
    t_a, t_s, t_l = alpha[1:], sigma[1:], lam[1:]  # at the next step
    # Data prediction x0 = cx * x + cm * model_output, at the current sigma.
    if cfg.prediction_type == "epsilon":
        cx, cm = 1 / s_a, -s_s / s_a
    elif cfg.prediction_type == "sample":
        cx, cm = np.zeros_like(s_a), np.ones_like(s_a)
    else:
        cx, cm = s_a, -s_s
    h = t_l - s_l
    with np.errstate(invalid="ignore"):
        expm = -np.expm1(-h)  # 1 - exp(-h); exactly 1 when the next sigma is zero
        x_coef = t_s / s_s  # 0 at a zero final sigma
    d0 = t_a * expm
    # Which steps are first order: the first, and the last when diffusers lowers the order there.
    idx = np.arange(n)
    lower_final = (idx == n - 1) & (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                                    or cfg.final_sigmas_type == "zero")
    first = (idx == 0) | lower_final | (cfg.solver_order == 1)
    h_prev = np.concatenate([[np.nan], s_l[1:] - s_l[:-1]])  # lambda_s0 - lambda_s1
    with np.errstate(invalid="ignore", divide="ignore"):
        r0 = h_prev / h
        if cfg.solver_type == "heun":
            d1 = t_a * (1 - expm / h)  # alpha_t ((exp(-h) - 1) / h + 1)
            c_m0, c_m1 = d0 + d1 / r0, -d1 / r0
        else:  # midpoint
            c_m0, c_m1 = d0 * (1 + 0.5 / r0), -0.5 * d0 / r0
    c_m0 = np.where(first, d0, c_m0)
    c_m1 = np.where(first, 0.0, c_m1)
    coef = _f32(cx=cx, cm=cm, x=x_coef, m0=c_m0, m1=c_m1)
    return {"timesteps": jnp.asarray(ts, jnp.int32), "coef": coef,
            "prev_x0": jnp.zeros(sample.shape, jnp.float32)}


def _dpm_step(state: dict, model_output: jax.Array, i: jax.Array, sample: jax.Array):
    c = {k: v[i] for k, v in state["coef"].items()}
    x = sample.astype(jnp.float32)
    x0 = c["cx"] * x + c["cm"] * model_output.astype(jnp.float32)
    prev = c["x"] * x + c["m0"] * x0 + c["m1"] * state["prev_x0"]
    return prev.astype(sample.dtype), {**state, "prev_x0": x0}


# --- Euler (EulerDiscreteScheduler, s_churn = 0) ---------------------------------------------------
# diffusers' x = y * a, a = sqrt(sigma^2 + 1), starts at unit noise times a_0 (init_noise_sigma, leading
# spacing) and feeds the model x / a = y. The loop carries y, so x_T is unit noise and the model input
# unscaled, as for the other samplers: y' = (a_i y + (sigma_{i+1} - sigma_i) eps) / a_{i+1}, sigma_n = 0.

def _euler_timesteps(cfg: ScheduleConfig, num_steps: int) -> np.ndarray:
    for key, value, ok in (("prediction_type", cfg.prediction_type, "epsilon"),
                           ("timestep_spacing", cfg.timestep_spacing, "leading"),
                           ("use_karras_sigmas", cfg.use_karras_sigmas, False)):
        if value != ok:
            raise unsupported(key, value, f"{ok} for the euler sampler")
    _check_steps(cfg, num_steps)
    return _spaced(cfg, num_steps)


def _euler_init(cfg: ScheduleConfig, num_steps: int, sample: jax.Array) -> dict:
    ts = _euler_timesteps(cfg, num_steps)
    ac = alphas_cumprod(cfg).astype(np.float64)
    sig_train = np.sqrt((1 - ac) / ac)
    sig = np.concatenate([np.interp(ts, np.arange(len(ac)), sig_train), [0.0]])
    a = np.sqrt(sig ** 2 + 1)
    coef = _f32(y=a[:-1] / a[1:], eps=(sig[1:] - sig[:-1]) / a[1:])
    return {"timesteps": jnp.asarray(ts, jnp.int32), "coef": coef}


def _euler_step(state: dict, model_output: jax.Array, i: jax.Array, sample: jax.Array):
    c = {k: v[i] for k, v in state["coef"].items()}
    prev = c["y"] * sample.astype(jnp.float32) + c["eps"] * model_output.astype(jnp.float32)
    return prev.astype(sample.dtype), state


SAMPLERS: dict[str, Sampler] = {
    "ddim": Sampler("ddim", ddim_timesteps, _ddim_init, _ddim_step),
    "pndm": Sampler("pndm", _pndm_timesteps, _pndm_init, _pndm_step),
    "dpmpp_2m": Sampler("dpmpp_2m", _dpm_timesteps, _dpm_init, _dpm_step),
    "euler": Sampler("euler", _euler_timesteps, _euler_init, _euler_step),
}


def get_sampler(name: str) -> Sampler:
    """Look a sampler up by name (``ddim``, ``pndm``, ``dpmpp_2m``, ``euler``)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r} (expected one of {', '.join(SAMPLERS)})")
    return SAMPLERS[name]


def default_sampler_name(cfg: ScheduleConfig) -> str:
    """The sampler matching the config's ``_class_name``; DDIM for other classes (e.g. DDPM)."""
    return _CLASS_TO_SAMPLER.get(cfg.class_name, "ddim")


def sample_loop(sampler: Sampler, cfg: ScheduleConfig, num_steps: int, model_fn: Callable, x_T: jax.Array,
                last_model_fn: Callable | None = None, carry: Any = None):
    """Run all steps with ``lax.fori_loop``; ``model_fn(x, t)`` gets the int32 timestep t (traced).

    With ``last_model_fn(x, t) -> (model_output, aux)``, the final model call goes through it
    instead (e.g. a UNet call that captures features) and ``(x_0, aux)`` is returned; the other
    steps stay in the loop, so capture costs one call, not one per step.
    With ``carry`` (a pytree, e.g. attention sums), every call also threads it:
    ``model_fn(x, t, carry) -> (model_output, carry)``, ``last_model_fn(x, t, carry) -> (model_output,
    aux, carry)``, and the final carry is returned last: ``(x_0, carry)`` or ``(x_0, aux, carry)``.
    Call under ``jax.jit`` with ``cfg`` and ``num_steps`` static; the step coefficients are built in
    numpy at trace time.
    """
    threaded = carry is not None
    call = model_fn if threaded else (lambda x, t, c: (model_fn(x, t), c))
    state = sampler.init(cfg, num_steps, x_T)
    n = int(state["timesteps"].shape[0])

    def body(i, loop):
        x, st, c = loop
        out, c = call(sampler.scale_model_input(x, i), st["timesteps"][i], c)
        x, st = sampler.step(st, out, i, x)
        return x, st, c

    if last_model_fn is None:
        x, _, carry = jax.lax.fori_loop(0, n, body, (x_T, state, carry))
        return (x, carry) if threaded else x
    x, state, carry = jax.lax.fori_loop(0, n - 1, body, (x_T, state, carry))
    last = last_model_fn if threaded else (lambda x, t, c: (*last_model_fn(x, t), c))
    out, aux, carry = last(sampler.scale_model_input(x, n - 1), state["timesteps"][n - 1], carry)
    x, _ = sampler.step(state, out, n - 1, x)
    return (x, aux, carry) if threaded else (x, aux)
