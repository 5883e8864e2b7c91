"""IDDPM Gaussian diffusion as Stem trains and samples it, in our own compact form.

Linear betas 1e-4..0.02 over T = 1000 steps, epsilon prediction, learned-range variance, hybrid
loss (MSE + variational bound with the mean detached). It agrees numerically with the reference
(OpenAI IDDPM code as shipped in DiT and Stem): schedules are computed in float64 and read out as
float32 per timestep, exactly like its ``_extract_into_tensor``. The one reference quirk kept on
purpose: the t = 0 decoder NLL is the 8-bit image likelihood with 1/255 bins, meaningless for
log-counts but part of the loss the released models were trained with.

Respacing (``space_timesteps``) keeps a subset of the T steps; the model always sees the original
timestep. Both samplers (ancestral and DDIM) run over any respaced schedule, with no clipping.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterable

import numpy as np
import torch

N_TRAIN_STEPS = 1000

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
            desired = int(section_counts[len("ddim"):])
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


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


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
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
    )


class GaussianDiffusion:
    """Learned-range, eps-predicting diffusion over the kept timesteps of the linear schedule.

    Timestep arguments ``t`` are indices into the kept (respaced) steps, 0..n_steps-1; the model is
    called with the original timestep ``timestep_map[t]``.
    """

    def __init__(self, respacing: str | int | Iterable[int] | None = None,
                 n_train_steps: int = N_TRAIN_STEPS):
        base_alphas_cumprod = np.cumprod(1.0 - linear_betas(n_train_steps))
        kept = space_timesteps(n_train_steps, respacing) if respacing not in (None, "") \
            else list(range(n_train_steps))
        kept_alphas_cumprod = base_alphas_cumprod[kept]
        betas = 1.0 - kept_alphas_cumprod / np.append(1.0, kept_alphas_cumprod[:-1])
        self.n_steps = len(kept)
        self.timestep_map = torch.tensor(kept, dtype=torch.long)

        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # The posterior variance is 0 at t = 0; its log is clipped to the t = 1 value.
        clipped = np.append(posterior_variance[1], posterior_variance[1:]) if self.n_steps > 1 \
            else betas
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
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas)
            / (1.0 - alphas_cumprod),
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
        return (self._at("sqrt_alphas_cumprod", t, x_start) * x_start
                + self._at("sqrt_one_minus_alphas_cumprod", t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self._at("posterior_mean_coef1", t, x_t) * x_start
                + self._at("posterior_mean_coef2", t, x_t) * x_t)
        return (mean, self._at("posterior_variance", t, x_t),
                self._at("posterior_log_variance_clipped", t, x_t))

    # -- reverse process --------------------------------------------------------------------
    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (self._at("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self._at("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((self._at("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart)
                / self._at("sqrt_recipm1_alphas_cumprod", t, x_t))

    def _p_from_output(self, eps, var_values, x, t) -> dict[str, torch.Tensor]:
        min_log = self._at("posterior_log_variance_clipped", t, x)
        max_log = self._at("log_betas", t, x)
        frac = (var_values + 1) / 2  # the model's [-1, 1] maps to [posterior var, beta]
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = self._predict_xstart_from_eps(x, t, eps)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": torch.exp(log_variance), "log_variance": log_variance,
                "pred_xstart": pred_xstart}

    def p_mean_variance(self, model: Denoiser, x, t, model_kwargs=None) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t): mean, variance, log_variance and the implied x_0 (no clipping)."""
        eps, var_values = self._call_model(model, x, t, model_kwargs)
        return self._p_from_output(eps, var_values, x, t)

    # -- training ---------------------------------------------------------------------------
    def _vb_bits(self, eps, var_values, x_start, x_t, t) -> torch.Tensor:
        """KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, decoder NLL at t = 0; in bits."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        p = self._p_from_output(eps, var_values, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"]))
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=p["mean"], log_scales=0.5 * p["log_variance"])
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
    def ancestral_step(self, model: Denoiser, x, t, noise, model_kwargs=None) -> torch.Tensor:
        """x_{t-1} ~ p(x_{t-1} | x_t) with the learned variance (the reference's p_sample)."""
        p = self.p_mean_variance(model, x, t, model_kwargs)
        if noise is None:  # only allowed at t = 0, where no noise is added
            return p["mean"]
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        return p["mean"] + nonzero * torch.exp(0.5 * p["log_variance"]) * noise

    def ddim_step(self, model: Denoiser, x, t, noise, eta: float = 0.0,
                  model_kwargs=None) -> torch.Tensor:
        """DDIM update (Song et al. eq. 12); eta = 0 is deterministic, eta = 1 is DDPM-like."""
        eps, _ = self._call_model(model, x, t, model_kwargs)
        pred_xstart = self._predict_xstart_from_eps(x, t, eps)
        eps = self._predict_eps_from_xstart(x, t, pred_xstart)  # as the reference re-derives it
        alpha_bar = self._at("alphas_cumprod", t, x)
        alpha_bar_prev = self._at("alphas_cumprod_prev", t, x)
        sigma = (eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
                 * torch.sqrt(1 - alpha_bar / alpha_bar_prev))
        mean = pred_xstart * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        if noise is None:
            return mean
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        return mean + nonzero * sigma * noise

    def step_needs_noise(self, step_index: int, sampler: str, eta: float) -> bool:
        """Whether a sampler step draws fresh noise (so callers draw none when it does not)."""
        return step_index > 0 and (sampler == "ancestral" or eta > 0)

    def sample_loop(self, model: Denoiser, x_T: torch.Tensor, *, sampler: str = "ddim",
                    eta: float = 0.0, model_kwargs=None,
                    step_noise: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
        """Run the reverse process from x_T over all kept steps; returns x_0 (unclipped).

        ``step_noise(step_index)`` supplies the noise of a step (shape of x_T); by default
        ``torch.randn_like``. It is called only for steps that use noise, in descending order.
        """
        steps = self.iter_sample_loop(model, x_T, sampler=sampler, eta=eta,
                                      model_kwargs=model_kwargs, step_noise=step_noise)
        while True:
            try:
                next(steps)
            except StopIteration as stop:
                return stop.value

    def iter_sample_loop(self, model: Denoiser, x_T: torch.Tensor, *, sampler: str = "ddim",
                         eta: float = 0.0, model_kwargs=None,
                         step_noise: Callable[[int], torch.Tensor] | None = None,
                         ) -> Generator[int, None, torch.Tensor]:
        """:meth:`sample_loop` as a generator: yields the number of steps done after each step
        (so a GUI can show progress and stop between steps) and returns x_0."""
        if sampler not in ("ddim", "ancestral"):
            raise ValueError(f"sampler must be 'ddim' or 'ancestral', got {sampler!r}")
        x = x_T
        for done, i in enumerate(reversed(range(self.n_steps)), start=1):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            noise = None
            if self.step_needs_noise(i, sampler, eta):
                noise = step_noise(i) if step_noise is not None else torch.randn_like(x)
            if sampler == "ancestral":
                x = self.ancestral_step(model, x, t, noise, model_kwargs)
            else:
                x = self.ddim_step(model, x, t, noise, eta, model_kwargs)
            yield done
        return x

def create_diffusion(respacing: str | int | Iterable[int] | None = None) -> GaussianDiffusion:
    """The reference's ``create_diffusion(respacing)`` with its defaults (learned sigma, MSE+VB)."""
    return GaussianDiffusion(respacing)
