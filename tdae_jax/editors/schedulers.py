"""Diffusion samplers as pure step functions on arrays, matching diffusers 0.39.0 (PyTorch) step for step.

Implements DDIM (Song et al. 2021, Eq. 12, ``eta`` noise), PNDM/PLMS (Liu et al. 2022, "Pseudo Numerical Methods
for Diffusion Models", Eq. 9 with the Runge-Kutta warm-up or, as Stable Diffusion ships it, the PRK skip: a
Heun-like first step then Adams-Bashforth 2/3/4), Euler and Euler-ancestral (Karras et al. 2022, Alg. 2; the
k-diffusion ancestral step) and DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2, midpoint/heun), with
diffusers' timestep spacings (``leading``/``linspace``/``trailing``, ``steps_offset``), its img2img truncation
(``get_timesteps``: the first ``int(steps*strength)`` steps are dropped and the scheduler's begin index is set),
and the three prediction types ``epsilon`` / ``sample`` / ``v_prediction``.

Everything that depends only on the configuration (timesteps, sigmas, multistep weights, which PLMS formula a
step uses) is computed on the host by :func:`make_plan`, which replays diffusers' control flow; the jitted loop
(:func:`denoise`, one ``lax.scan``) only does the array arithmetic, carrying the multistep history in its state.
Two documented extensions over diffusers: PNDM and Euler-ancestral also accept ``sample`` prediction (diffusers
raises), by converting the model output to epsilon / x0 as DDIM does.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("ddim", "pndm", "euler", "euler_ancestral", "dpmpp_2m")
CLASS_NAMES = {"DDIMScheduler": "ddim", "PNDMScheduler": "pndm", "EulerDiscreteScheduler": "euler",
               "EulerAncestralDiscreteScheduler": "euler_ancestral", "DPMSolverMultistepScheduler": "dpmpp_2m"}
ALIASES = {"plms": "pndm", "dpm": "dpmpp_2m", "dpmsolver++": "dpmpp_2m", "dpm++": "dpmpp_2m",
           "euler_a": "euler_ancestral"}
_COMMON = {"num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 0,
           "rescale_betas_zero_snr": False}
# __init__ defaults of the diffusers 0.39.0 classes (what ``Class.from_config(cfg)`` fills in for absent keys).
DEFAULTS = {
    "ddim": {**_COMMON, "clip_sample": True, "set_alpha_to_one": True, "thresholding": False, "clip_sample_range": 1.0,
             "timestep_spacing": "leading"},
    "pndm": {**_COMMON, "skip_prk_steps": False, "set_alpha_to_one": False, "timestep_spacing": "leading"},
    "euler": {**_COMMON, "interpolation_type": "linear", "use_karras_sigmas": False, "use_exponential_sigmas": False,
              "use_beta_sigmas": False, "timestep_spacing": "linspace", "timestep_type": "discrete",
              "final_sigmas_type": "zero", "sigma_min": None, "sigma_max": None},
    "euler_ancestral": {**_COMMON, "timestep_spacing": "linspace"},
    "dpmpp_2m": {**_COMMON, "solver_order": 2, "thresholding": False, "algorithm_type": "dpmsolver++",
                 "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False,
                 "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                 "use_lu_lambdas": False, "use_flow_sigmas": False, "final_sigmas_type": "zero",
                 "lambda_min_clipped": -float("inf"), "variance_type": None, "timestep_spacing": "linspace",
                 "use_dynamic_shifting": False},
}
# (key, value diffusers uses by default) pairs this module does not implement otherwise.
_UNSUPPORTED = {
    "ddim": {"thresholding": False, "rescale_betas_zero_snr": False},
    "pndm": {"rescale_betas_zero_snr": False},
    "euler": {"interpolation_type": "linear", "use_karras_sigmas": False, "use_exponential_sigmas": False,
              "use_beta_sigmas": False, "timestep_type": "discrete", "rescale_betas_zero_snr": False},
    "euler_ancestral": {"rescale_betas_zero_snr": False},
    "dpmpp_2m": {"solver_order": 2, "thresholding": False, "algorithm_type": "dpmsolver++", "use_karras_sigmas": False,
                 "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
                 "use_flow_sigmas": False, "lambda_min_clipped": -float("inf"), "variance_type": None,
                 "use_dynamic_shifting": False, "rescale_betas_zero_snr": False},
}


def canonical(kind: str) -> str:
    k = CLASS_NAMES.get(kind, ALIASES.get(kind.lower(), kind.lower()))
    if k not in KINDS:
        raise ValueError(f"unknown scheduler {kind!r}; known: {KINDS} (or diffusers class names {sorted(CLASS_NAMES)})")
    return k


def resolve_config(kind: str, scheduler_config: Mapping[str, Any], prediction_type: str,
                   overrides: Mapping[str, Any] = ()) -> dict:
    """``Class.from_config(scheduler_config, **overrides)`` semantics: class defaults, then the keys of the model's
    scheduler config the class knows, then ``overrides`` (which must be known keys). ``prediction_type`` is the
    model's."""
    kind = canonical(kind)
    cfg = dict(DEFAULTS[kind])
    cfg.update({k: v for k, v in dict(scheduler_config).items() if k in cfg})
    for k, v in dict(overrides).items():
        if k not in cfg:
            raise ValueError(f"{kind}: unknown scheduler option {k!r}; known: {sorted(cfg)}")
        cfg[k] = v
    cfg["prediction_type"] = prediction_type
    if prediction_type not in ("epsilon", "sample", "v_prediction"):
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    for k, ok in _UNSUPPORTED[kind].items():
        if cfg.get(k, ok) != ok:
            raise NotImplementedError(f"{kind}: {k}={cfg[k]!r} is not implemented (only {ok!r})")
    if kind == "dpmpp_2m" and cfg["solver_type"] not in ("midpoint", "heun"):
        raise NotImplementedError(f"dpmpp_2m: solver_type={cfg['solver_type']!r}")
    return cfg


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """Host-side schedule of one sampling run (numpy; becomes jit constants).

    ``timesteps [N]``: UNet timestep per iteration; ``scale_in [N]``: ``scale_model_input`` factor;
    ``coeffs``: per-iteration step scalars ``{name: [N] or [N, k]}``; ``add_noise = (a, b)``: img2img start
    ``z = a*z0 + b*noise``; ``init_noise_sigma``: start from pure noise ``z = init_noise_sigma*noise``.
    """

    kind: str
    prediction_type: str
    timesteps: np.ndarray
    scale_in: np.ndarray
    coeffs: dict
    add_noise: tuple
    init_noise_sigma: float
    stochastic: bool
    options: dict

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


# ------------------------------------------------------------------------------------------------ host planning
def _spaced(cfg: dict, steps: int, kind: str) -> np.ndarray:
    """``set_timesteps`` of the given class, descending (PNDM: its ``_timesteps`` ascending)."""
    n, sp, off = int(cfg["num_train_timesteps"]), cfg["timestep_spacing"], int(cfg["steps_offset"])
    if steps < 1 or steps > n:
        raise ValueError(f"num_inference_steps must be in [1, {n}], got {steps}")
    if kind == "dpmpp_2m":
        if sp == "linspace":
            return np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
        if sp == "leading":
            return (np.arange(0, steps + 1) * (n // (steps + 1))).round()[::-1][:-1].astype(np.int64) + off
        if sp == "trailing":
            return np.arange(n, 0, -n / steps).round().astype(np.int64) - 1
    else:
        if sp == "linspace":
            t = np.linspace(0, n - 1, steps, dtype=np.float32 if kind.startswith("euler") else np.float64)[::-1]
            return t.copy() if kind.startswith("euler") else t.round().astype(np.int64)
        if sp == "leading":
            t = (np.arange(0, steps) * (n // steps)).round()[::-1].astype(np.int64) + off
            return t.astype(np.float32) if kind.startswith("euler") else t
        if sp == "trailing":
            t = np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
            return t.astype(np.float32) if kind.startswith("euler") else t
    raise ValueError(f"{kind}: unsupported timestep_spacing {sp!r} (linspace, leading, trailing)")


def _truncate(n_timesteps: int, steps: int, strength: float | None) -> tuple[int, bool]:
    """diffusers ``get_timesteps``: (t_start, begin_index_set). ``strength=None``: full schedule, no begin index."""
    if strength is None:
        return 0, False
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    init = min(int(steps * strength), steps)
    return max(steps - init, 0), True


def _first_index(ts: np.ndarray) -> int:
    """``index_for_timestep(timesteps[0])``: the second match when the first timestep repeats."""
    hits = np.nonzero(ts == ts[0])[0]
    return int(hits[1] if len(hits) > 1 else hits[0])


def make_plan(kind: str, cfg: dict, alphas_cumprod: np.ndarray, num_inference_steps: int,
              strength: float | None = None, eta: float = 0.0) -> Plan:
    """Replay diffusers' ``set_timesteps`` (+ img2img ``get_timesteps`` when ``strength`` is given) and the
    scheduler's per-step control flow; return the :class:`Plan` the jitted loop consumes."""
    kind = canonical(kind)
    acp = np.asarray(alphas_cumprod, np.float32).astype(np.float64)  # torch keeps alphas_cumprod in float32
    n = int(cfg["num_train_timesteps"])
    if acp.shape[0] != n:
        raise ValueError(f"alphas_cumprod has {acp.shape[0]} entries but num_train_timesteps={n}")
    fn = {"ddim": _plan_ddim, "pndm": _plan_pndm, "euler": _plan_euler, "euler_ancestral": _plan_euler,
          "dpmpp_2m": _plan_dpm}[kind]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ts, scale_in, coeffs, add_noise, init_sigma = fn(kind, cfg, acp, num_inference_steps, strength, eta)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    stochastic = kind == "euler_ancestral" or (kind == "ddim" and eta > 0)
    options = {k: cfg[k] for k in ("clip_sample", "clip_sample_range") if k in cfg}
    return Plan(kind, cfg["prediction_type"], f32(ts), f32(scale_in), {k: f32(v) for k, v in coeffs.items()},
                (float(add_noise[0]), float(add_noise[1])), float(init_sigma), stochastic, options)


def _plan_ddim(kind, cfg, acp, steps, strength, eta):
    ts = _spaced(cfg, steps, kind)
    t0, _ = _truncate(len(ts), steps, strength)
    ts = ts[t0:]
    final = 1.0 if cfg["set_alpha_to_one"] else acp[0]
    ratio = int(cfg["num_train_timesteps"]) // steps
    a_t = acp[ts]
    a_prev = np.array([acp[t - ratio] if t - ratio >= 0 else final for t in ts])
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    add = (np.sqrt(a_t[0]), np.sqrt(1 - a_t[0])) if len(ts) else (1.0, 0.0)
    return ts, np.ones(len(ts)), {"a_t": a_t, "a_prev": a_prev, "std": eta * np.sqrt(var)}, add, 1.0


def _plan_pndm(kind, cfg, acp, steps, strength, eta):
    n = int(cfg["num_train_timesteps"])
    base = _spaced(cfg, steps, kind)[::-1]  # ascending, as PNDM's ``_timesteps``
    ratio = n // steps
    if cfg["skip_prk_steps"]:
        prk = np.array([], np.int64)
        plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
    else:
        prk = np.array(base[-4:]).repeat(2) + np.tile(np.array([0, ratio // 2]), 4)
        prk = prk[:-1].repeat(2)[1:-1][::-1]
        plms = base[:-3][::-1]
    ts = np.concatenate([prk, plms]).astype(np.int64)
    t0, _ = _truncate(len(ts), steps, strength)
    ts = ts[t0:]
    final = acp[0] if not cfg["set_alpha_to_one"] else 1.0
    alpha = lambda t: acp[t] if t >= 0 else final  # noqa: E731
    rows = []  # replay PNDMScheduler.step: counter, len(ets), cur_sample
    n_ets = 0
    for counter, t in enumerate(ts):
        r = dict(append=0.0, w_ets=[0.0] * 4, w_mo=0.0, w_acc=0.0, acc_keep=1.0, acc_add=0.0, store_cur=0.0,
                 use_cur=0.0)
        if counter < len(prk) and not cfg["skip_prk_steps"]:
            prev = t - (0 if counter % 2 else ratio // 2)
            t_used = prk[counter // 4 * 4]
            m = counter % 4
            if m == 0:
                r.update(acc_add=1 / 6, append=1.0, store_cur=1.0, w_mo=1.0)
                n_ets = min(n_ets + 1, 4)
            elif m in (1, 2):
                r.update(acc_add=1 / 3, use_cur=1.0, w_mo=1.0)
            else:
                r.update(acc_keep=0.0, w_acc=1.0, w_mo=1 / 6, use_cur=1.0)
        else:
            if not cfg["skip_prk_steps"] and n_ets < 3:
                raise ValueError("PNDM: PLMS step before 3 PRK model outputs (diffusers raises too)")
            prev, t_used = t - ratio, t
            if counter != 1:
                n_ets = min(n_ets + 1, 4)
                r["append"] = 1.0
            else:
                prev, t_used = t, t + ratio
            w = r["w_ets"]
            if n_ets == 1 and counter == 0:
                w[3] = 1.0
                r["store_cur"] = 1.0
            elif n_ets == 1 and counter == 1:
                w[3], r["w_mo"], r["use_cur"] = 0.5, 0.5, 1.0
            elif n_ets == 2:
                w[3], w[2] = 1.5, -0.5
            elif n_ets == 3:
                w[3], w[2], w[1] = 23 / 12, -16 / 12, 5 / 12
            else:
                w[3], w[2], w[1], w[0] = 55 / 24, -59 / 24, 37 / 24, -9 / 24
        r.update(a_t=alpha(t_used), a_prev=alpha(prev))
        rows.append(r)
    coeffs = {k: np.array([r[k] for r in rows]).reshape((len(rows),) + ((4,) if k == "w_ets" else ()))
              for k in ("append", "w_ets", "w_mo", "w_acc", "acc_keep", "acc_add", "store_cur", "use_cur", "a_t",
                        "a_prev")}
    add = (np.sqrt(acp[ts[0]]), np.sqrt(1 - acp[ts[0]])) if len(ts) else (1.0, 0.0)
    return ts, np.ones(len(ts)), coeffs, add, 1.0


def _sigmas(acp):
    return np.sqrt((1 - acp) / acp).astype(np.float32)  # torch computes them in float32


def _plan_euler(kind, cfg, acp, steps, strength, eta):
    ts_full = _spaced(cfg, steps, kind)
    full = _sigmas(acp)
    sig = np.interp(ts_full, np.arange(len(full)), full)
    last = 0.0
    if kind == "euler" and cfg["final_sigmas_type"] == "sigma_min":
        last = np.sqrt((1 - acp[0]) / acp[0])
    elif kind == "euler" and cfg["final_sigmas_type"] != "zero":
        raise ValueError(f"euler: final_sigmas_type must be zero or sigma_min, got {cfg['final_sigmas_type']!r}")
    sig = np.concatenate([sig, [last]]).astype(np.float32).astype(np.float64)
    t0, begin_set = _truncate(len(ts_full), steps, strength)
    begin = t0 if begin_set else _first_index(ts_full)
    ts = ts_full[t0:]
    k = begin + np.arange(len(ts))
    s, s_next = sig[k], sig[k + 1]
    coeffs = {"sigma": s, "sigma_next": s_next}
    if kind == "euler_ancestral":
        up = np.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2)
        coeffs = {"sigma": s, "sigma_up": up, "sigma_down": np.sqrt(s_next ** 2 - up ** 2)}
    smax = sig.max()
    init_sigma = smax if cfg["timestep_spacing"] in ("linspace", "trailing") else np.sqrt(smax ** 2 + 1)
    add = (1.0, sig[begin]) if len(ts) else (1.0, 0.0)
    return ts, 1.0 / np.sqrt(s ** 2 + 1), coeffs, add, init_sigma


def _plan_dpm(kind, cfg, acp, steps, strength, eta):
    ts_full = _spaced(cfg, steps, kind)
    full = _sigmas(acp)
    sig = np.interp(ts_full, np.arange(len(full)), full)
    if cfg["final_sigmas_type"] == "sigma_min":
        last = np.sqrt((1 - acp[0]) / acp[0])
    elif cfg["final_sigmas_type"] == "zero":
        last = 0.0
    else:
        raise ValueError(f"dpmpp_2m: final_sigmas_type must be zero or sigma_min, got {cfg['final_sigmas_type']!r}")
    sig = np.concatenate([sig, [last]]).astype(np.float32).astype(np.float64)
    alpha = 1.0 / np.sqrt(sig ** 2 + 1)
    sigt = sig * alpha
    lam = np.log(alpha) - np.log(sigt)
    n_all = len(ts_full)
    t0, begin_set = _truncate(n_all, steps, strength)
    begin = t0 if begin_set else _first_index(ts_full)
    ts = ts_full[t0:]
    rows = []
    for i in range(len(ts)):
        k = begin + i
        final = k == n_all - 1 and (cfg["euler_at_final"] or (cfg["lower_order_final"] and n_all < 15)
                                    or cfg["final_sigmas_type"] == "zero")
        h = lam[k + 1] - lam[k]
        phi = alpha[k + 1] * (np.exp(-h) - 1.0)  # x_t = (sigma_t/sigma_s) x - phi D0 [- ...D1]
        w_x, w0, w1 = sigt[k + 1] / sigt[k], -phi, 0.0
        if not (i < 1 or final):  # lower_order_nums counts steps taken since set_timesteps
            r0 = (lam[k] - lam[k - 1]) / h
            c1 = -0.5 * phi if cfg["solver_type"] == "midpoint" else alpha[k + 1] * ((np.exp(-h) - 1.0) / h + 1.0)
            w0, w1 = w0 + c1 / r0, -c1 / r0
        if sig[k + 1] == 0:  # lambda_t = inf: x_t = x0 exactly (torch gets the same from inf arithmetic)
            w_x, w0, w1 = 0.0, 1.0, 0.0
        rows.append((alpha[k], sigt[k], w_x, w0, w1))
    r = np.array(rows, np.float64).reshape(len(ts), 5)
    coeffs = {"alpha": r[:, 0], "sigma": r[:, 1], "w_x": r[:, 2], "w_m0": r[:, 3], "w_m1": r[:, 4]}
    add = (alpha[begin], sigt[begin]) if len(ts) else (1.0, 0.0)
    return ts, np.ones(len(ts)), coeffs, add, 1.0


# ------------------------------------------------------------------------------------------------ device steps
def init_state(plan: Plan, sample: jax.Array) -> dict:
    """Multistep history carried through the loop (zeros; shapes follow ``sample``)."""
    z = jnp.zeros_like(sample)
    if plan.kind == "pndm":
        return {"ets": jnp.zeros((4,) + sample.shape, sample.dtype), "acc": z, "cur": z}
    if plan.kind == "dpmpp_2m":
        return {"m_prev": z}
    return {}


def _bc(c, x):
    return jnp.reshape(c, jnp.shape(c) + (1,) * (x.ndim - jnp.ndim(c)))


def step(plan: Plan, c: dict, state: dict, model_output: jax.Array, sample: jax.Array,
         noise: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """One scheduler step: ``(prev_sample, state)``. ``c``: this iteration's slice of ``plan.coeffs``."""
    pt, mo, x = plan.prediction_type, model_output, sample
    if plan.kind == "ddim":
        a, ap = c["a_t"], c["a_prev"]
        if pt == "epsilon":
            x0, eps = (x - jnp.sqrt(1 - a) * mo) / jnp.sqrt(a), mo
        elif pt == "sample":
            x0, eps = mo, (x - jnp.sqrt(a) * mo) / jnp.sqrt(1 - a)
        else:
            x0, eps = jnp.sqrt(a) * x - jnp.sqrt(1 - a) * mo, jnp.sqrt(a) * mo + jnp.sqrt(1 - a) * x
        if plan.options.get("clip_sample"):
            r = plan.options["clip_sample_range"]
            x0 = jnp.clip(x0, -r, r)
        prev = jnp.sqrt(ap) * x0 + jnp.sqrt(1 - ap - c["std"] ** 2) * eps
        if plan.stochastic:
            prev = prev + c["std"] * noise
        return prev, state
    if plan.kind == "pndm":
        ets = jnp.where(c["append"] > 0, jnp.concatenate([state["ets"][1:], mo[None]]), state["ets"])
        combo = c["w_mo"] * mo + jnp.tensordot(c["w_ets"], ets, axes=1) + c["w_acc"] * state["acc"]
        acc = c["acc_keep"] * state["acc"] + c["acc_add"] * mo
        s = jnp.where(c["use_cur"] > 0, state["cur"], x)
        cur = jnp.where(c["store_cur"] > 0, x, state["cur"])
        a, ap = c["a_t"], c["a_prev"]
        if pt == "v_prediction":
            combo = jnp.sqrt(a) * combo + jnp.sqrt(1 - a) * s
        elif pt == "sample":  # extension: diffusers' PNDM raises for sample prediction
            combo = (s - jnp.sqrt(a) * combo) / jnp.sqrt(1 - a)
        denom = a * jnp.sqrt(1 - ap) + jnp.sqrt(a * (1 - a) * ap)
        prev = jnp.sqrt(ap / a) * s - (ap - a) * combo / denom
        return prev, {"ets": ets, "acc": acc, "cur": cur}
    if plan.kind in ("euler", "euler_ancestral"):
        sg = c["sigma"]
        if pt == "epsilon":
            x0 = x - sg * mo
        elif pt == "sample":
            x0 = mo
        else:
            x0 = mo * (-sg / jnp.sqrt(sg ** 2 + 1)) + x / (sg ** 2 + 1)
        d = (x - x0) / sg
        if plan.kind == "euler":
            return x + d * (c["sigma_next"] - sg), state
        return x + d * (c["sigma_down"] - sg) + noise * c["sigma_up"], state
    if plan.kind == "dpmpp_2m":
        al, sg = c["alpha"], c["sigma"]
        if pt == "epsilon":
            m = (x - sg * mo) / al
        elif pt == "sample":
            m = mo
        else:
            m = al * x - sg * mo
        prev = c["w_x"] * x + c["w_m0"] * m + c["w_m1"] * state["m_prev"]
        return prev, {"m_prev": m}
    raise ValueError(plan.kind)


def denoise(plan: Plan, model_fn: Callable[[jax.Array, jax.Array], jax.Array], latents: jax.Array,
            step_noise: jax.Array | None = None, remat: bool = False) -> jax.Array:
    """Run the whole schedule in one ``lax.scan``.

    Args:
      plan: from :func:`make_plan`.
      model_fn: ``(scaled_latents [B,C,h,w], t scalar float32) -> guided model output [B,C,h,w]``.
      latents: ``[B,C,h,w]`` start (already noised / scaled by ``init_noise_sigma``).
      step_noise: ``[N,B,C,h,w]`` per-step noise when ``plan.stochastic``.
    Returns:
      final latents ``[B,C,h,w]``.
    """
    if plan.num_steps == 0:
        return latents
    if plan.stochastic and step_noise is None:
        raise ValueError(f"{plan.kind} (stochastic) needs step_noise [N,B,C,h,w]")
    xs = {"t": jnp.asarray(plan.timesteps), "s": jnp.asarray(plan.scale_in),
          "c": {k: jnp.asarray(v) for k, v in plan.coeffs.items()}}
    if plan.stochastic:
        xs["n"] = step_noise

    def body(carry, x):
        z, st = carry
        out = model_fn(z * x["s"], x["t"])
        z, st = step(plan, x["c"], st, out.astype(z.dtype), z, x.get("n"))
        return (z, st), None

    if remat:
        body = jax.checkpoint(body)
    (z, _), _ = jax.lax.scan(body, (latents, init_state(plan, latents)), xs)
    return z


def start_from_image(plan: Plan, z0: jax.Array, noise: jax.Array) -> jax.Array:
    """img2img start: ``scheduler.add_noise(z0, noise, timesteps[0])`` (``z0`` when no step remains)."""
    a, b = plan.add_noise
    return a * z0 + b * noise


def start_from_noise(plan: Plan, noise: jax.Array) -> jax.Array:
    """Text-to-image / IP2P start: ``noise * init_noise_sigma``."""
    return noise * plan.init_noise_sigma
