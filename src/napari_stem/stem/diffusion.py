"""IDDPM Gaussian diffusion as Stem trains and samples it, in our own compact form.

Linear betas 1e-4..0.02 over T = 1000 steps, epsilon prediction, learned-range variance, hybrid
loss (MSE + variational bound with the mean detached). It agrees numerically with the reference
(OpenAI IDDPM code as shipped in DiT and Stem): schedules are computed in float64 and read out as
float32 per timestep, exactly like its ``_extract_into_tensor``. The one reference quirk kept on
purpose: the t = 0 decoder NLL is the 8-bit image likelihood with 1/255 bins, meaningless for
log-counts but part of the loss the released models were trained with.

Respacing (``space_timesteps``) keeps a subset of the T steps; the model always sees the original
timestep. The reference's samplers (ancestral and DDIM) run over any respaced schedule, unclipped
unless given an ``x0_range``. For few network evaluations, our own :data:`SOLVERS` (written from
the papers): DPM-Solver++(2M) and its SDE form (Lu et al. 2022), and an ancestral step whose noise
is the learned variance carried to the big step (moment matching, as in Bao et al.'s Analytic-DPM);
see :meth:`GaussianDiffusion.dpm_step`.

``x0_range`` (lo, hi), broadcastable to x: the predicted x_0 is clipped to it before every update
(DiT's ``clip_denoised`` with the data's own support instead of [-1, 1]). At high noise the eps
error is amplified ~1/sqrt(alphabar) (~150x at t = 999) in pred_xstart; clipping stops that error
from being carried to the end by a deterministic sampler.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterable

import numpy as np
import torch

from napari_stem.stem.model_config import N_TRAIN_STEPS  # re-exported: its old home

#: The reference's samplers and ours; the solvers evaluate the network once per step.
REFERENCE_SAMPLERS = ("ancestral", "ddim")
SOLVERS = ("dpm++2m", "dpm++2m-sde", "ancestral-matched")
#: What each solver is, as options of GaussianDiffusion.dpm_step.
SOLVER_STEPS = {
    "dpm++2m": {"stochastic": False},
    "dpm++2m-sde": {"stochastic": True, "variance": "posterior", "second_order": True},
    "ancestral-matched": {"stochastic": True, "variance": "matched", "second_order": False},
}

# model(x_t (N, 1, G), t_original (N,), **model_kwargs) -> (N, 2, G)
Denoiser = Callable[..., torch.Tensor]


def linear_betas(n_steps: int = N_TRAIN_STEPS) -> np.ndarray:
    """Ho et al.'s linear schedule, rescaled so any n_steps spans the same noise range."""
    scale = 1000 / n_steps
    return np.linspace(scale * 1e-4, scale * 0.02, n_steps, dtype=np.float64)


def space_timesteps(n_steps: int, section_counts: str | int | Iterable[int]) -> list[int]:
    """Which of the n_steps original timesteps to keep (sorted), with IDDPM/DiT semantics.

    "ddimN": the DDIM paper's integer stride giving exactly N steps (0, s, 2s, ...).
    "N" or N: N steps evenly spread (rounded) over [0, n_steps - 1], both ends included.
    "a,b,c" or [a, b, c]: split the process into equal sections and spread a, b, c steps in them.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, n_steps):
                if len(range(0, n_steps, stride)) == desired:
                    return list(range(0, n_steps, stride))
            raise ValueError(f"cannot take exactly {desired} of {n_steps} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    section_counts = list(section_counts)
    size_per, extra = divmod(n_steps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0  # accumulated, not j * stride: the reference's rounding depends on it
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


def solver_timesteps(n_evals: int, spacing: str = "logsnr", n_steps: int = N_TRAIN_STEPS) -> list[int]:
    """n_evals + 1 timesteps from 0 to n_steps - 1 for a solver that evaluates the network at all
    but the last (t = 0, where it stops: one evaluation there would only remove noise of std 0.01).

    "time": uniform in t; "quadratic": uniform in sqrt(t), denser near the data; "logsnr": uniform
    in log signal-to-noise ratio (DPM-Solver's choice). Rounded; duplicates pushed apart.
    """
    if n_evals < 1 or n_evals >= n_steps:
        raise ValueError(f"a solver needs 1 to {n_steps - 1} evaluations, got {n_evals}")
    u = np.linspace(0.0, 1.0, n_evals + 1)
    if spacing == "time":
        points = u * (n_steps - 1)
    elif spacing == "quadratic":
        points = u**2 * (n_steps - 1)
    elif spacing == "logsnr":
        alphas_cumprod = np.cumprod(1.0 - linear_betas(n_steps))
        log_snr = np.log(alphas_cumprod / (1.0 - alphas_cumprod))  # decreasing in t
        targets = log_snr[0] + u * (log_snr[-1] - log_snr[0])
        points = np.interp(-targets, -log_snr, np.arange(n_steps, dtype=np.float64))
    else:
        raise ValueError(f"spacing must be 'time', 'quadratic' or 'logsnr', got {spacing!r}")
    kept = [round(float(p)) for p in points]
    kept[0], kept[-1] = 0, n_steps - 1
    for k in range(1, len(kept) - 1):  # strictly increasing, the ends fixed
        kept[k] = max(kept[k], kept[k - 1] + 1)
    for k in range(len(kept) - 2, 0, -1):
        kept[k] = min(kept[k], kept[k + 1] - 1)
    return kept


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales) -> torch.Tensor:
    """The reference's decoder log-likelihood: 8-bit bins of width 2/255 on [-1, 1].

    For log-count data (almost all > 0.999) it reduces to the upper-tail term; kept as is so our
    loss equals the reference's.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class GaussianDiffusion:
    """Learned-range, eps-predicting diffusion over the kept timesteps of the linear schedule.

    Timestep arguments ``t`` are indices into the kept (respaced) steps, 0..n_steps-1; the model is
    called with the original timestep ``timestep_map[t]``.
    """

    def __init__(
        self,
        respacing: str | int | Iterable[int] | None = None,
        n_train_steps: int = N_TRAIN_STEPS,
        *,
        timesteps: Iterable[int] | None = None,
    ):
        """``timesteps``: the original timesteps to keep, given outright (instead of ``respacing``)."""
        base_alphas_cumprod = np.cumprod(1.0 - linear_betas(n_train_steps))
        if timesteps is not None:
            kept = sorted({int(k) for k in timesteps})
            if not kept or kept[0] < 0 or kept[-1] >= n_train_steps:
                raise ValueError(f"timesteps must lie in [0, {n_train_steps - 1}], got {kept}")
        elif respacing not in (None, ""):
            kept = space_timesteps(n_train_steps, respacing)
        else:
            kept = list(range(n_train_steps))
        kept_alphas_cumprod = base_alphas_cumprod[kept]
        betas = 1.0 - kept_alphas_cumprod / np.append(1.0, kept_alphas_cumprod[:-1])
        self.n_steps = len(kept)
        self.timestep_map = torch.tensor(kept, dtype=torch.long)

        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # The posterior variance is 0 at t = 0; its log is clipped to the t = 1 value.
        clipped = np.append(posterior_variance[1], posterior_variance[1:]) if self.n_steps > 1 else betas
        tables64 = {
            "betas": betas,
            "log_betas": np.log(betas),
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1.0),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": np.log(clipped),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
        }
        # Solver coefficients per kept step (float64 scalars; the solvers use no table lookups).
        self._alpha64 = np.sqrt(alphas_cumprod)
        self._sigma64 = np.sqrt(1.0 - alphas_cumprod)
        self._lambda64 = np.log(self._alpha64) - np.log(self._sigma64)
        self._posterior_variance64 = posterior_variance
        self._coef1_sq64 = tables64["posterior_mean_coef1"] ** 2
        # The model's variance output describes one step of the 1000-step chain at the original t:
        # its posterior variance, log(beta / posterior variance) and squared x_0 coefficient there.
        base_betas = linear_betas(n_train_steps)
        base_prev = np.append(1.0, base_alphas_cumprod[:-1])
        base_posterior = base_betas * (1.0 - base_prev) / (1.0 - base_alphas_cumprod)
        base_posterior_clipped = np.append(base_posterior[1], base_posterior[1:])
        self._one_step64 = {
            "posterior_variance": base_posterior_clipped[kept],
            "log_ratio": (np.log(base_betas) - np.log(base_posterior_clipped))[kept],
            "coef1_sq": (base_betas * np.sqrt(base_prev) / (1.0 - base_alphas_cumprod))[kept] ** 2,
        }
        # float64 maths, float32 read-out: the reference's exact rounding.
        self._tables = {name: torch.from_numpy(v).float() for name, v in tables64.items()}
        self._tables_by_device: dict[torch.device, dict[str, torch.Tensor]] = {}

    # -- schedule read-out ------------------------------------------------------------------
    def _on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The tables (and timestep map) on ``device``, copied there once."""
        tables = self._tables_by_device.get(device)
        if tables is None:
            tables = {k: v.to(device) for k, v in self._tables.items()}
            tables["timestep_map"] = self.timestep_map.to(device)
            self._tables_by_device[device] = tables
        return tables

    def _at(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Table value per batch element, shaped to broadcast against x."""
        return self._on(t.device)[name][t].view(-1, *([1] * (x.ndim - 1)))

    def _call_model(self, model: Denoiser, x, t, model_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Model output split into (eps, variance fraction value), in float32."""
        output = model(x, self._on(t.device)["timestep_map"][t], **(model_kwargs or {})).float()
        channels = x.shape[1]
        return output[:, :channels], output[:, channels:]

    # -- forward process --------------------------------------------------------------------
    def q_sample(self, x_start, t, noise=None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (
            self._at("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._at("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at("posterior_mean_coef1", t, x_t) * x_start + self._at("posterior_mean_coef2", t, x_t) * x_t
        return (mean, self._at("posterior_variance", t, x_t), self._at("posterior_log_variance_clipped", t, x_t))

    # -- reverse process --------------------------------------------------------------------
    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (
            self._at("sqrt_recip_alphas_cumprod", t, x_t) * x_t - self._at("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (self._at("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart) / self._at(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    @staticmethod
    def _clip(pred_xstart: torch.Tensor, x0_range) -> torch.Tensor:
        if x0_range is None:
            return pred_xstart
        low, high = x0_range
        return torch.minimum(torch.maximum(pred_xstart, low), high)

    def _learned_log_variance(self, var_values, x, t) -> torch.Tensor:
        min_log = self._at("posterior_log_variance_clipped", t, x)
        max_log = self._at("log_betas", t, x)
        frac = (var_values + 1) / 2  # the model's [-1, 1] maps to [posterior var, beta]
        return frac * max_log + (1 - frac) * min_log

    def _p_from_output(self, eps, var_values, x, t, x0_range=None) -> dict[str, torch.Tensor]:
        log_variance = self._learned_log_variance(var_values, x, t)
        pred_xstart = self._clip(self._predict_xstart_from_eps(x, t, eps), x0_range)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": mean,
            "variance": torch.exp(log_variance),
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
        }

    def p_mean_variance(self, model: Denoiser, x, t, model_kwargs=None, x0_range=None) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t): mean, variance, log_variance and the implied x_0 (clipped to
        ``x0_range`` when given, the mean then following the clipped x_0)."""
        eps, var_values = self._call_model(model, x, t, model_kwargs)
        return self._p_from_output(eps, var_values, x, t, x0_range)

    # -- training ---------------------------------------------------------------------------
    def _vb_bits(self, eps, var_values, x_start, x_t, t) -> torch.Tensor:
        """KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, decoder NLL at t = 0; in bits."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        p = self._p_from_output(eps, var_values, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"]))
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, means=p["mean"], log_scales=0.5 * p["log_variance"])
        return torch.where(t == 0, mean_flat(decoder_nll), kl) / math.log(2.0)

    def training_losses(self, model: Denoiser, x_start, t, model_kwargs=None, noise=None):
        """Hybrid loss per sample: {"loss": mse + vb, "mse": eps MSE, "vb": bound term}.

        The bound trains only the variance: it sees the eps prediction detached.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        eps, var_values = self._call_model(model, x_t, t, model_kwargs)
        vb = self._vb_bits(eps.detach(), var_values, x_start, x_t, t)
        mse = mean_flat((noise - eps) ** 2)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # -- sampling ---------------------------------------------------------------------------
    def ancestral_step(self, model: Denoiser, x, t, noise, model_kwargs=None, x0_range=None) -> torch.Tensor:
        """x_{t-1} ~ p(x_{t-1} | x_t) with the learned variance (the reference's p_sample)."""
        p = self.p_mean_variance(model, x, t, model_kwargs, x0_range)
        if noise is None:  # only allowed at t = 0, where no noise is added
            return p["mean"]
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        return p["mean"] + nonzero * torch.exp(0.5 * p["log_variance"]) * noise

    def ddim_step(
        self, model: Denoiser, x, t, noise, eta: float = 0.0, model_kwargs=None, x0_range=None
    ) -> torch.Tensor:
        """DDIM update (Song et al. eq. 12); eta = 0 is deterministic, eta = 1 is DDPM-like."""
        eps, _ = self._call_model(model, x, t, model_kwargs)
        pred_xstart = self._clip(self._predict_xstart_from_eps(x, t, eps), x0_range)
        eps = self._predict_eps_from_xstart(x, t, pred_xstart)  # as the reference re-derives it
        alpha_bar = self._at("alphas_cumprod", t, x)
        alpha_bar_prev = self._at("alphas_cumprod_prev", t, x)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean = pred_xstart * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        if noise is None:
            return mean
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        return mean + nonzero * sigma * noise

    def dpm_step(
        self,
        model: Denoiser,
        x,
        i: int,
        history,
        noise=None,
        *,
        stochastic: bool = False,
        variance: str = "matched",
        second_order: bool = True,
        model_kwargs=None,
        x0_range=None,
    ):
        """One DPM-Solver++(2M) step from kept step i to i - 1; returns (x, history for the next).

        Data prediction in half-log-SNR lambda (h = lambda_{i-1} - lambda_i): x_0 is taken linear
        in lambda through this and the previous step's predictions (first order on the first
        step, or always with ``second_order=False``). ODE (``stochastic=False``): Lu et al.'s 2M
        update. SDE: the same x_0 line against the SDE's kernel (k-diffusion's midpoint form);
        its first-order form is the ancestral step, whose noise ``variance`` is:

        - "posterior": the posterior variance (the published SDE-DPM-Solver++);
        - "learned": the model's output interpolated between this big step's posterior variance
          and beta in log space, as the reference's respaced ancestral sampler does;
        - "matched": the model's output read as what it was trained to be, the variance of one
          step of the 1000-step chain, which is posterior variance + coef1^2 Var[x_0 | x_t];
          Var[x_0 | x_t] is then carried to this big step (posterior variance + its coef1^2
          Var[x_0 | x_t]), the reverse kernel's own second moment (Bao et al.'s Analytic-DPM).
          The log-space reading shrinks a big step's noise towards the posterior variance and
          under-disperses a few-step sampler; this one does not.
        """
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        eps, var_values = self._call_model(model, x, t, model_kwargs)
        x0 = self._clip(self._predict_xstart_from_eps(x, t, eps), x0_range)
        # Python floats: exact scalars on any device, no numpy-tensor arithmetic
        alpha_t, sigma_t, sigma_s = float(self._alpha64[i - 1]), float(self._sigma64[i - 1]), float(self._sigma64[i])
        h = float(self._lambda64[i - 1] - self._lambda64[i])
        use_history = history is not None and second_order
        if not stochastic:
            direction = x0
            if use_history:
                x0_prev, h_prev = history
                direction = x0 + (h / (2.0 * h_prev)) * (x0 - x0_prev)
            x_next = (sigma_t / sigma_s) * x - alpha_t * math.expm1(-h) * direction
        else:
            decay = -math.expm1(-2.0 * h)  # 1 - e^{-2h}
            x_next = (sigma_t / sigma_s) * math.exp(-h) * x + alpha_t * decay * x0
            if use_history:
                x0_prev, h_prev = history
                x_next = x_next + (alpha_t * 0.5 * decay * h / h_prev) * (x0 - x0_prev)
            if noise is not None:
                x_next = x_next + torch.sqrt(self._step_variance(variance, var_values, x, t, i)) * noise
        return x_next, (x0, h)

    def _step_variance(self, variance: str, var_values, x, t, i: int):
        if variance == "posterior":
            return torch.full_like(x, float(self._posterior_variance64[i]))
        if variance == "learned":
            return torch.exp(self._learned_log_variance(var_values, x, t))
        if variance == "matched":
            one = self._one_step64
            frac = (var_values + 1) / 2
            # (one-step variance - its posterior variance) / coef1^2, without cancellation
            x0_variance = float(one["posterior_variance"][i] / one["coef1_sq"][i]) * torch.expm1(
                frac * float(one["log_ratio"][i])
            )
            return float(self._posterior_variance64[i]) + float(self._coef1_sq64[i]) * x0_variance.clamp(min=0)
        raise ValueError(f"variance must be 'posterior', 'learned' or 'matched', got {variance!r}")

    def n_loop_steps(self, sampler: str) -> int:
        """Network evaluations (= progress steps) of one run: the solvers stop at the first kept
        timestep without evaluating there."""
        return self.n_steps - 1 if sampler in SOLVERS else self.n_steps

    def step_needs_noise(self, step_index: int, sampler: str, eta: float) -> bool:
        """Whether a sampler step draws fresh noise (so callers draw none when it does not)."""
        stochastic = sampler == "ancestral" or SOLVER_STEPS.get(sampler, {}).get("stochastic", False)
        return step_index > 0 and (stochastic or (sampler == "ddim" and eta > 0))

    def sample_loop(
        self,
        model: Denoiser,
        x_T: torch.Tensor,
        *,
        sampler: str = "ddim",
        eta: float = 0.0,
        model_kwargs=None,
        step_noise: Callable[[int], torch.Tensor] | None = None,
        x0_range=None,
        **solver_options,
    ) -> torch.Tensor:
        """Run the reverse process from x_T over all kept steps; returns x_0.

        ``step_noise(step_index)`` supplies the noise of a step (shape of x_T); by default
        ``torch.randn_like``. It is called only for steps that use noise, in descending order.
        ``x0_range``: clip the predicted x_0 to (lo, hi); None (the default) is the reference.
        The solvers (:data:`SOLVERS`) need two kept steps or more and return x at the first.
        """
        steps = self.iter_sample_loop(
            model,
            x_T,
            sampler=sampler,
            eta=eta,
            model_kwargs=model_kwargs,
            step_noise=step_noise,
            x0_range=x0_range,
            **solver_options,
        )
        while True:
            try:
                next(steps)
            except StopIteration as stop:
                return stop.value

    def iter_sample_loop(
        self,
        model: Denoiser,
        x_T: torch.Tensor,
        *,
        sampler: str = "ddim",
        eta: float = 0.0,
        model_kwargs=None,
        step_noise: Callable[[int], torch.Tensor] | None = None,
        x0_range=None,
        **solver_options,
    ) -> Generator[int, None, torch.Tensor]:
        """:meth:`sample_loop` as a generator: yields the number of steps done after each step
        (so a GUI can show progress and stop between steps) and returns x_0."""
        if sampler not in REFERENCE_SAMPLERS + SOLVERS:
            raise ValueError(f"sampler must be one of {', '.join(REFERENCE_SAMPLERS + SOLVERS)}, got {sampler!r}")
        if sampler in SOLVERS and self.n_steps < 2:
            raise ValueError(f"the {sampler} solver needs at least two kept timesteps")
        x = x_T
        history = None
        last = 1 if sampler in SOLVERS else 0
        for done, i in enumerate(range(self.n_steps - 1, last - 1, -1), start=1):
            noise = None
            if self.step_needs_noise(i, sampler, eta):
                noise = step_noise(i) if step_noise is not None else torch.randn_like(x)
            if sampler in SOLVERS:
                x, history = self.dpm_step(
                    model,
                    x,
                    i,
                    history,
                    noise,
                    model_kwargs=model_kwargs,
                    x0_range=x0_range,
                    **{**SOLVER_STEPS[sampler], **solver_options},
                )
            else:
                t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
                if sampler == "ancestral":
                    x = self.ancestral_step(model, x, t, noise, model_kwargs, x0_range)
                else:
                    x = self.ddim_step(model, x, t, noise, eta, model_kwargs, x0_range)
            yield done
        if sampler in SOLVERS:  # x at the first kept timestep still has noise of std ~0.01 in it
            x = self._clip(x, x0_range)
        return x


def create_diffusion(respacing: str | int | Iterable[int] | None = None) -> GaussianDiffusion:
    """The reference's ``create_diffusion(respacing)`` with its defaults (learned sigma, MSE+VB)."""
    return GaussianDiffusion(respacing)
