"""Noise schedulers: the DDPM schedule training uses and the samplers that share it at inference."""

from __future__ import annotations

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

INFERENCE_SCHEDULERS = {
    "dpm": DPMSolverMultistepScheduler,
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
}


def build_noise_scheduler(scheduler_cfg) -> DDPMScheduler:
    """The training scheduler from ``pokediff.config.SchedulerConfig``."""
    if scheduler_cfg.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"scheduler.prediction_type must be 'epsilon' or 'v_prediction', got {scheduler_cfg.prediction_type!r}"
        )
    return DDPMScheduler(
        num_train_timesteps=scheduler_cfg.num_train_timesteps,
        beta_schedule=scheduler_cfg.beta_schedule,
        prediction_type=scheduler_cfg.prediction_type,
        clip_sample=False,  # latents are not bounded to [-1, 1]
    )


def make_inference_scheduler(name: str, config) -> SchedulerMixin:
    """Scheduler ``name`` (dpm | ddim | ddpm) sharing the noise schedule and prediction type of ``config``.

    ``config`` is any diffusers scheduler config (e.g. ``pipe.scheduler.config``).
    """
    if name not in INFERENCE_SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(INFERENCE_SCHEDULERS)}")
    cls = INFERENCE_SCHEDULERS[name]
    if name == "dpm":
        # lambda_min_clipped: with the cosine schedule alpha(t=999) ~ 5e-5, and DPM-Solver's x0 estimate at that
        # step amplifies any noise-prediction error ~1e4x; clipping lambda at -5.1 starts at t~995 (alpha ~ 6e-3),
        # as diffusers recommends for squaredcos_cap_v2 (UnCLIP uses the same value).
        return cls.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, variance_type=None, lambda_min_clipped=-5.1
        )
    # DDIM/DDPM clip x0 to [-1, 1] by default, which is wrong for latents.
    return cls.from_config(config, clip_sample=False)


def build_inference_scheduler(scheduler_cfg) -> SchedulerMixin:
    """The inference scheduler named by ``scheduler_cfg.inference_scheduler`` on the training noise schedule."""
    return make_inference_scheduler(scheduler_cfg.inference_scheduler, build_noise_scheduler(scheduler_cfg).config)
