"""A diffusers noise schedule as numbers: ``ScheduleConfig`` (a validated ``scheduler_config.json``),
its betas and ``alphas_cumprod`` (bit for bit diffusers' float32 ones), and the DDPM forward process
(``add_noise``) and v-prediction target (``get_velocity``) that training uses. The samplers that
walk the schedule backwards are in ``schedulers``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ScheduleConfig", "alphas_cumprod", "add_noise", "get_velocity", "unsupported"]

_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_SPACINGS = ("leading", "trailing", "linspace")

# diffusers' per-class defaults for the keys whose defaults differ between classes; a saved
# scheduler_config.json normally has all of them, these only matter for hand-written dicts.
_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": {"set_alpha_to_one": True, "clip_sample": True, "timestep_spacing": "leading"},
    "PNDMScheduler": {"set_alpha_to_one": False, "clip_sample": False, "timestep_spacing": "leading"},
    "DDPMScheduler": {"set_alpha_to_one": True, "clip_sample": True, "timestep_spacing": "leading"},
    "DPMSolverMultistepScheduler": {
        "set_alpha_to_one": True, "clip_sample": False, "timestep_spacing": "linspace"},
}
_FALLBACK_DEFAULTS = {"set_alpha_to_one": False, "clip_sample": False, "timestep_spacing": "leading"}

def unsupported(key: str, value: Any, expected: str) -> ValueError:
    """The one-line error for a scheduler config value outside the supported subset."""
    return ValueError(f"scheduler config: {key}={value!r} is not supported (expected {expected})")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Validated view of a diffusers scheduler config; hashable so it can be a static jit argument."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    class_name: str = ""
    # PNDM
    skip_prk_steps: bool = True
    # DPM-Solver multistep
    algorithm_type: str = "dpmsolver++"
    solver_order: int = 2
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    final_sigmas_type: str = "zero"
    use_karras_sigmas: bool = False
    lambda_min_clipped: float = -math.inf

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ScheduleConfig":
        """Parse a scheduler_config.json dict; unknown keys are ignored, unsupported values refused."""
        if not isinstance(d, Mapping):
            raise ValueError(f"scheduler config: expected a JSON object, got {type(d).__name__}")
        class_name = str(d.get("_class_name", ""))
        defaults = _CLASS_DEFAULTS.get(class_name, _FALLBACK_DEFAULTS)

        def get(key: str, default: Any) -> Any:
            v = d.get(key, None)
            return default if v is None else v

        def as_bool(key: str, default: bool) -> bool:
            v = get(key, default)
            if not isinstance(v, bool):
                raise unsupported(key, v, "true or false")
            return v

        def as_int(key: str, default: int, lo: int) -> int:
            v = get(key, default)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise unsupported(key, v, f"an integer >= {lo}")
            return v

        def as_float(key: str, default: float) -> float:
            v = get(key, default)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                raise unsupported(key, v, "a number")
            return float(v)

        def as_choice(key: str, default: str, choices: tuple[str, ...]) -> str:
            v = get(key, default)
            if v not in choices:
                raise unsupported(key, v, "one of " + ", ".join(choices))
            return v

        n_train = as_int("num_train_timesteps", 1000, 1)
        trained = d.get("trained_betas", None)
        if trained is not None:
            try:
                trained = tuple(float(b) for b in trained)
            except (TypeError, ValueError):
                raise unsupported("trained_betas", "...", "a list of numbers") from None
            if len(trained) != n_train or not all(0.0 < b < 1.0 for b in trained):
                raise unsupported("trained_betas", f"<{len(trained)} values>",
                           f"{n_train} values in (0, 1)")
        # Features we do not implement: refuse rather than silently sample something else.
        for key in ("thresholding", "rescale_betas_zero_snr", "use_lu_lambdas",
                    "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas"):
            if as_bool(key, False):
                raise unsupported(key, True, "false; not implemented")
        if get("variance_type", "fixed_small") in ("learned", "learned_range"):
            raise unsupported("variance_type", d["variance_type"], "a fixed variance; learned is not implemented")
        beta_start = as_float("beta_start", 0.0001)
        beta_end = as_float("beta_end", 0.02)
        if trained is None and not (0.0 < beta_start <= beta_end < 1.0):
            raise ValueError(f"scheduler config: need 0 < beta_start <= beta_end < 1, "
                             f"got beta_start={beta_start}, beta_end={beta_end}")
        clip_range = as_float("clip_sample_range", 1.0)
        if clip_range <= 0:
            raise unsupported("clip_sample_range", clip_range, "a positive number")
        return cls(
            num_train_timesteps=n_train,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=as_choice("beta_schedule", "linear", _BETA_SCHEDULES),
            trained_betas=trained,
            prediction_type=as_choice("prediction_type", "epsilon", _PREDICTION_TYPES),
            timestep_spacing=as_choice("timestep_spacing", defaults["timestep_spacing"], _SPACINGS),
            steps_offset=as_int("steps_offset", 0, 0),
            set_alpha_to_one=as_bool("set_alpha_to_one", defaults["set_alpha_to_one"]),
            clip_sample=as_bool("clip_sample", defaults["clip_sample"]),
            clip_sample_range=clip_range,
            class_name=class_name,
            skip_prk_steps=as_bool("skip_prk_steps", class_name != "PNDMScheduler"),
            algorithm_type=as_choice("algorithm_type", "dpmsolver++", (
                "dpmsolver++", "dpmsolver", "sde-dpmsolver", "sde-dpmsolver++", "deis")),
            solver_order=as_int("solver_order", 2, 1),
            solver_type=as_choice("solver_type", "midpoint", ("midpoint", "heun", "logrho", "bh1", "bh2")),
            lower_order_final=as_bool("lower_order_final", True),
            euler_at_final=as_bool("euler_at_final", False),
            final_sigmas_type=as_choice("final_sigmas_type", "zero", ("zero", "sigma_min")),
            use_karras_sigmas=as_bool("use_karras_sigmas", False),
            lambda_min_clipped=as_float("lambda_min_clipped", -math.inf),
        )


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """float32 linspace rounded the way torch's CPU kernel rounds it (float32 step, fused
    multiply-add, second half counted back from the end), so betas match diffusers bit for bit."""
    s, e = np.float32(start), np.float32(end)
    step = np.float64((e - s) / np.float32(max(n - 1, 1)))
    k = np.arange(n, dtype=np.float64)
    vals = np.where(k < n // 2, np.float64(s) + step * k, np.float64(e) - step * (n - 1 - k))
    return vals.astype(np.float32)


def _betas(cfg: ScheduleConfig) -> np.ndarray:
    """Betas in float32, as diffusers builds them (its arithmetic is float32 too)."""
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        return np.asarray(cfg.trained_betas, np.float32)
    if cfg.beta_schedule == "linear":
        return _linspace_f32(cfg.beta_start, cfg.beta_end, n)
    if cfg.beta_schedule == "scaled_linear":
        root = _linspace_f32(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n)
        return root * root
    # squaredcos_cap_v2: discretised cosine alpha-bar (Nichol & Dhariwal), betas capped at 0.999.
    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1.0 - alpha_bar((k + 1) / n) / alpha_bar(k / n), 0.999) for k in range(n)],
                    np.float32)


def alphas_cumprod(cfg: ScheduleConfig) -> np.ndarray:
    """Cumulative product of (1 - beta), float32, shape (num_train_timesteps,)."""
    return np.cumprod((np.float32(1.0) - _betas(cfg)).astype(np.float64)).astype(np.float32)


def _per_sample(coef: jax.Array, ndim: int) -> jax.Array:
    """Give per-sample coefficients (B,) or a scalar trailing unit axes to broadcast over x."""
    return coef.reshape(coef.shape + (1,) * (ndim - coef.ndim))


def add_noise(cfg: ScheduleConfig, x0: jax.Array, noise: jax.Array, t: jax.Array | int) -> jax.Array:
    """DDPM forward process q(x_t | x_0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; t scalar or (B,)."""
    ac = jnp.asarray(alphas_cumprod(cfg))[jnp.asarray(t)].astype(x0.dtype)
    ac = _per_sample(ac, x0.ndim)
    return jnp.sqrt(ac) * x0 + jnp.sqrt(1 - ac) * noise


def get_velocity(cfg: ScheduleConfig, x0: jax.Array, noise: jax.Array, t: jax.Array | int) -> jax.Array:
    """v-prediction training target: sqrt(abar_t) noise - sqrt(1 - abar_t) x0; t scalar or (B,)."""
    ac = jnp.asarray(alphas_cumprod(cfg))[jnp.asarray(t)].astype(x0.dtype)
    ac = _per_sample(ac, x0.ndim)
    return jnp.sqrt(ac) * noise - jnp.sqrt(1 - ac) * x0
