"""IDDPM diffusion: reproduces the reference's outputs, respaces like it, and samples correctly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_stem.stem.diffusion import create_diffusion, linear_betas, space_timesteps
from napari_stem.stem.reference_import import import_reference_checkpoint
from reference_fixture import NUM_HEADS, REFERENCE_CASES, REFERENCE_PT, write_gene_list


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The reference-written checkpoint, imported, and its recorded inputs and outputs."""
    genes = write_gene_list(tmp_path_factory.mktemp("genes") / "selected_gene_list.txt")
    checkpoint = import_reference_checkpoint(REFERENCE_PT, genes, num_heads=NUM_HEADS)
    cases = dict(np.load(REFERENCE_CASES))
    tensors = {k: torch.from_numpy(cases[k]) for k in ("x0", "t", "y", "noise", "xT")}
    return checkpoint.model, cases, tensors


def _close(actual: torch.Tensor, expected: np.ndarray, atol: float) -> None:
    np.testing.assert_allclose(actual.detach().numpy(), expected, rtol=1e-4, atol=atol)


def test_reproduces_the_reference_forward_and_forward_process(reference) -> None:
    model, cases, x = reference
    with torch.no_grad():
        _close(model(x["x0"], x["t"], x["y"]), cases["ema_forward"], atol=1e-5)
    _close(create_diffusion().q_sample(x["x0"], x["t"], x["noise"]), cases["q_sample"], atol=1e-5)


def test_reproduces_the_reference_p_mean_variance(reference) -> None:
    model, cases, x = reference
    diffusion = create_diffusion()
    x_t = diffusion.q_sample(x["x0"], x["t"], x["noise"])
    with torch.no_grad():
        out = diffusion.p_mean_variance(model, x_t, x["t"], {"y": x["y"]})
    for name in ("mean", "variance", "log_variance", "pred_xstart"):
        _close(out[name], cases[f"p_mean_variance_{name}"], atol=1e-6)


def test_reproduces_the_reference_training_losses(reference) -> None:
    model, cases, x = reference
    with torch.no_grad():
        losses = create_diffusion().training_losses(model, x["x0"], x["t"], {"y": x["y"]}, x["noise"])
    for name in ("loss", "mse", "vb"):
        _close(losses[name], cases[f"training_losses_{name}"], atol=1e-6)


@pytest.mark.parametrize("n_steps", [50, 25])
def test_reproduces_the_reference_ddim(reference, n_steps: int) -> None:
    model, cases, x = reference
    diffusion = create_diffusion(str(n_steps))
    with torch.no_grad():
        out = diffusion.sample_loop(model, x["xT"], sampler="ddim", eta=0.0, model_kwargs={"y": x["y"]})
    _close(out, cases[f"ddim{n_steps}_eta0"], atol=1e-3)
    if n_steps == 50:
        np.testing.assert_array_equal(diffusion.timestep_map.numpy(), cases["timestep_map_50"])


def test_space_timesteps_semantics() -> None:
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "10") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(1000, 10) == space_timesteps(1000, [10])
    assert space_timesteps(1000, "1000") == list(range(1000))
    # Two sections of 500 steps: 2 steps in the first, 3 in the second.
    assert space_timesteps(1000, "2,3") == [0, 499, 500, 750, 999]
    with pytest.raises(ValueError):
        space_timesteps(1000, "600,600")
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim999")


def test_respacing_keeps_the_noise_levels_of_the_kept_steps() -> None:
    full = create_diffusion()
    np.testing.assert_allclose(full._tables["betas"].numpy(), linear_betas().astype(np.float32))
    spaced = create_diffusion("ddim20")
    kept = spaced.timestep_map
    torch.testing.assert_close(spaced._tables["alphas_cumprod"], full._tables["alphas_cumprod"][kept])


def _vb_from_constant_output(diffusion, x_start, t, eps, var_value):
    out = torch.stack([torch.full_like(x_start[:, 0], eps), torch.full_like(x_start[:, 0], var_value)], 1)
    noise = torch.zeros_like(x_start)
    return diffusion.training_losses(lambda x, tt: out, x_start, t, noise=noise)["vb"]


def test_vb_is_gaussian_kl_above_zero_and_reference_decoder_nll_at_zero() -> None:
    diffusion = create_diffusion()
    x_start = torch.full((1, 1, 3), 2.0)
    # t = 0, var value -1 (posterior log variance, clipped to t = 1), eps 0: mean = x_start,
    # the 8-bit decoder for x > 0.999 is the upper tail 1 - Phi((-1/255) / std).
    std = math.sqrt(diffusion._tables["posterior_variance"][1].item())
    z = (-1 / 255) / std
    upper_tail = 1 - 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
    vb0 = _vb_from_constant_output(diffusion, x_start, torch.tensor([0]), 0.0, -1.0)
    assert vb0.item() == pytest.approx(-math.log(upper_tail) / math.log(2), rel=1e-4)
    # t > 0 with the exact eps (here 0, no noise) and the posterior variance: KL is zero.
    assert _vb_from_constant_output(diffusion, x_start, torch.tensor([500]), 0.0, -1.0).abs().item() < 1e-5
    # With variance beta instead (about twice the posterior's at t = 1): KL of two Gaussians with
    # the same mean, in bits.
    ratio = (diffusion._tables["posterior_variance"][1] / diffusion._tables["betas"][1]).item()
    expected = 0.5 * (-1 - math.log(ratio) + ratio) / math.log(2)
    assert _vb_from_constant_output(diffusion, x_start, torch.tensor([1]), 0.0, 1.0).item() == pytest.approx(
        expected, rel=1e-3
    )


def test_vb_trains_only_the_variance_and_mse_only_the_mean() -> None:
    eps_value = torch.zeros(2, 1, 5, requires_grad=True)
    var_value = torch.zeros(2, 1, 5, requires_grad=True)
    x_start = torch.randn(2, 1, 5)
    losses = create_diffusion().training_losses(
        lambda x, t: torch.cat([eps_value, var_value], 1), x_start, torch.tensor([0, 300])
    )
    (eps_grad,) = torch.autograd.grad(losses["vb"].sum(), eps_value, retain_graph=True, allow_unused=True)
    assert eps_grad is None or not eps_grad.any()
    (var_grad,) = torch.autograd.grad(losses["mse"].sum(), var_value, allow_unused=True)
    assert var_grad is None or not var_grad.any()
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])


def _gaussian_denoiser(mu: torch.Tensor, s2: float, var_value: float):
    """The exact eps predictor for data x0 ~ N(mu, s2), in the model's (x, t_original) form."""
    alphas_cumprod = torch.from_numpy(np.cumprod(1 - linear_betas())).float()

    def model(x, t_original):
        ab = alphas_cumprod[t_original].view(-1, 1, 1)
        eps = (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * s2 + 1 - ab)
        return torch.cat([eps, torch.full_like(x, var_value)], 1)

    return model


@pytest.mark.parametrize("steps", [1000, "ddim25", 7])
def test_samplers_return_the_point_mass_exactly(steps) -> None:
    mu = torch.linspace(-2, 8, 6).view(1, 1, 6)
    model = _gaussian_denoiser(mu, 0.0, 0.3)
    diffusion = create_diffusion(str(steps))
    x_T = torch.randn(4, 1, 6, generator=torch.Generator().manual_seed(1))
    for sampler, eta in (("ddim", 0.0), ("ddim", 1.0), ("ancestral", 0.0)):
        out = diffusion.sample_loop(model, x_T, sampler=sampler, eta=eta)
        torch.testing.assert_close(out, mu.expand(4, 1, 6), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("sampler", ["ddim", "ancestral"])
def test_samplers_reproduce_gaussian_data(sampler: str) -> None:
    torch.manual_seed(0)
    mu, s2 = torch.tensor([0.0, 3.0, 6.0]).view(1, 1, 3), 0.25
    diffusion = create_diffusion("100")
    out = diffusion.sample_loop(_gaussian_denoiser(mu, s2, -1.0), torch.randn(4000, 1, 3), sampler=sampler)
    torch.testing.assert_close(out.mean(0), mu[0], atol=0.05, rtol=0)
    torch.testing.assert_close(out.var(0), torch.full((1, 3), s2), atol=0.04, rtol=0)


def test_ddim_eta_zero_is_deterministic_and_eta_positive_uses_noise(reference) -> None:
    model, _, x = reference
    diffusion = create_diffusion("10")
    kwargs = {"y": x["y"]}

    def no_noise(step_index):
        raise AssertionError("DDIM with eta = 0 must not draw noise")

    with torch.no_grad():
        a = diffusion.sample_loop(model, x["xT"], sampler="ddim", model_kwargs=kwargs, step_noise=no_noise)
        b = diffusion.sample_loop(model, x["xT"], sampler="ddim", model_kwargs=kwargs)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        drawn = []

        def noise(step_index):
            drawn.append(step_index)
            return torch.randn_like(x["xT"])

        c = diffusion.sample_loop(model, x["xT"], sampler="ddim", eta=1.0, model_kwargs=kwargs, step_noise=noise)
        d = diffusion.sample_loop(model, x["xT"], sampler="ddim", eta=1.0, model_kwargs=kwargs)
    assert drawn == list(range(9, 0, -1))  # no noise at the last step
    assert c.shape == x["xT"].shape and not torch.allclose(c, a) and not torch.allclose(c, d)


def test_ancestral_step_adds_learned_variance_noise(reference) -> None:
    model, _, x = reference
    diffusion = create_diffusion("10")
    t = torch.full((8,), 5)
    kwargs = {"y": x["y"]}
    noise = torch.randn_like(x["xT"])
    with torch.no_grad():
        p = diffusion.p_mean_variance(model, x["xT"], t, kwargs)
        step = diffusion.ancestral_step(model, x["xT"], t, noise, kwargs)
    torch.testing.assert_close(step, p["mean"] + p["variance"].sqrt() * noise)


# -- few-step solvers and x_0 clipping on Gaussian data, where every answer is known -----------


def _exact_gaussian_model(mu: torch.Tensor, s2: float):
    """Exact eps for x0 ~ N(mu, s2), and the variance output a perfect model learns: one step of
    the 1000-step chain has variance posterior + coef1^2 Var[x0 | x_t], in the model's [-1, 1]."""
    betas = linear_betas()
    alphas_cumprod = np.cumprod(1 - betas)
    prev = np.append(1.0, alphas_cumprod[:-1])
    posterior = betas * (1 - prev) / (1 - alphas_cumprod)
    posterior = np.append(posterior[1], posterior[1:])  # the reference's clipped log variance
    coef1_sq = (betas * np.sqrt(prev) / (1 - alphas_cumprod)) ** 2
    x0_variance = s2 * (1 - alphas_cumprod) / (alphas_cumprod * s2 + 1 - alphas_cumprod)
    frac = np.log((posterior + coef1_sq * x0_variance) / posterior) / np.log(betas / posterior)
    var_values = torch.from_numpy(2 * frac - 1).float()
    ab_table = torch.from_numpy(alphas_cumprod)

    def model(x, t_original):
        ab = ab_table[t_original].view(-1, 1, 1)
        eps = (1 - ab).sqrt() * (x.double() - ab.sqrt() * mu) / (ab * s2 + 1 - ab)
        return torch.cat([eps.float(), var_values[t_original].view(-1, 1, 1).expand_as(x)], 1)

    return model


def _flow_endpoint(x_T, mu, s2, t_end: int | None):
    """Where the probability-flow ODE takes x_T (at t = 999) for Gaussian data: at t_end, or the
    clean x_0 when None. It is the affine map between the two Gaussian marginals."""
    ab = np.cumprod(1 - linear_betas())
    std_T = math.sqrt(ab[-1] * s2 + 1 - ab[-1])
    a_end, var_end = (1.0, s2) if t_end is None else (math.sqrt(ab[t_end]), ab[t_end] * s2 + 1 - ab[t_end])
    return a_end * mu + math.sqrt(var_end) * (x_T.double() - math.sqrt(ab[-1]) * mu) / std_T


MU, S2 = torch.tensor([0.0, 3.0, 6.0], dtype=torch.float64).view(1, 1, 3), 0.25


@pytest.mark.parametrize("evals", [3, 4, 6, 10])
def test_dpm_solver_2m_maps_noise_onto_the_gaussian_and_beats_ddim(evals: int) -> None:
    from napari_stem.stem.diffusion import GaussianDiffusion, solver_timesteps

    model = _exact_gaussian_model(MU, S2)
    x_T = torch.randn(2000, 1, 3, generator=torch.Generator().manual_seed(0))
    solver = GaussianDiffusion(timesteps=solver_timesteps(evals))
    assert solver.n_loop_steps("dpm++2m") == evals
    dpm_error = (solver.sample_loop(model, x_T, sampler="dpm++2m") - _flow_endpoint(x_T, MU, S2, 0)).abs().mean()
    ddim = create_diffusion(str(evals))  # the same number of network evaluations
    ddim_error = (ddim.sample_loop(model, x_T, sampler="ddim") - _flow_endpoint(x_T, MU, S2, None)).abs().mean()
    assert dpm_error < 0.5 * ddim_error
    assert dpm_error < {3: 0.15, 4: 0.1, 6: 0.015, 10: 0.02}[evals]  # data std 0.5


def test_dpm_solver_2m_is_second_order() -> None:
    from napari_stem.stem.diffusion import GaussianDiffusion, solver_timesteps

    model = _exact_gaussian_model(MU, S2)
    x_T = torch.randn(200, 1, 3, generator=torch.Generator().manual_seed(0))
    errors = [
        (
            GaussianDiffusion(timesteps=solver_timesteps(n)).sample_loop(model, x_T, sampler="dpm++2m")
            - _flow_endpoint(x_T, MU, S2, 0)
        )
        .abs()
        .max()
        .item()
        for n in (20, 40, 80)
    ]
    assert errors[1] < errors[0] / 3 and errors[2] < errors[1] / 3, errors  # halving h: ~1/4


@pytest.mark.parametrize("evals", [2, 4])
def test_ancestral_matched_draws_the_gaussian_exactly_in_few_steps(evals: int) -> None:
    """With the variance a perfect model learns, each big step is the exact Gaussian reverse kernel."""
    from napari_stem.stem.diffusion import GaussianDiffusion, solver_timesteps

    torch.manual_seed(0)
    diffusion = GaussianDiffusion(timesteps=solver_timesteps(evals))
    out = diffusion.sample_loop(_exact_gaussian_model(MU, S2), torch.randn(20000, 1, 3), sampler="ancestral-matched")
    torch.testing.assert_close(out.mean(0).double(), MU[0], atol=0.01, rtol=0)
    torch.testing.assert_close(out.var(0).double(), torch.full((1, 3), S2, dtype=torch.float64), atol=0.01, rtol=0)
    # the reference's respaced ancestral sampler, same model and evaluations, loses most of the spread
    reference = create_diffusion(str(evals)).sample_loop(_exact_gaussian_model(MU, S2), torch.randn(4000, 1, 3))
    assert reference.var(0).max() < 0.5 * S2


def test_sde_dpm_solver_2m_converges_to_the_gaussian() -> None:
    from napari_stem.stem.diffusion import GaussianDiffusion, solver_timesteps

    torch.manual_seed(0)
    diffusion = GaussianDiffusion(timesteps=solver_timesteps(100))
    out = diffusion.sample_loop(_exact_gaussian_model(MU, S2), torch.randn(5000, 1, 3), sampler="dpm++2m-sde")
    torch.testing.assert_close(out.mean(0).double(), MU[0], atol=0.03, rtol=0)  # 4 standard errors
    torch.testing.assert_close(out.var(0).double(), torch.full((1, 3), S2, dtype=torch.float64), atol=0.015, rtol=0)


def test_solver_timesteps_and_noise_draws() -> None:
    from napari_stem.stem.diffusion import GaussianDiffusion, solver_timesteps

    for spacing in ("time", "quadratic", "logsnr"):
        for n in (1, 2, 4, 50, 999):
            kept = solver_timesteps(n, spacing)
            assert len(kept) == n + 1 and kept[0] == 0 and kept[-1] == 999 and kept == sorted(set(kept))
    assert solver_timesteps(4, "time") == [0, 250, 500, 749, 999]
    with pytest.raises(ValueError):
        solver_timesteps(1000)
    diffusion = GaussianDiffusion(timesteps=[0, 300, 999])
    model = _exact_gaussian_model(MU, S2)
    drawn = []
    x_T = torch.randn(2, 1, 3)
    diffusion.sample_loop(
        model, x_T, sampler="ancestral-matched", step_noise=lambda i: drawn.append(i) or torch.randn_like(x_T)
    )
    assert drawn == [2, 1]  # every step draws, none is taken at t = 0

    def no_noise(step_index):
        raise AssertionError("the ODE solver draws no noise")

    diffusion.sample_loop(model, x_T, sampler="dpm++2m", step_noise=no_noise)


def test_x0_clipping_bounds_every_prediction_and_none_is_the_reference() -> None:
    """A point mass at mu predicted beyond the range: every sampler returns the range's edge."""
    mu = torch.tensor([-3.0, 1.0, 9.0]).view(1, 1, 3)
    low, high = torch.tensor([0.0, 0.0, 0.0]).view(1, 1, 3), torch.tensor([5.0, 5.0, 5.0]).view(1, 1, 3)
    model = _gaussian_denoiser(mu, 0.0, -1.0)  # point mass: Var[x0 | x_t] = 0, posterior variance
    x_T = torch.randn(4, 1, 3, generator=torch.Generator().manual_seed(0))
    expected = mu.clamp(0, 5).expand(4, 1, 3)
    for sampler in ("ancestral", "ddim", "dpm++2m", "dpm++2m-sde", "ancestral-matched"):
        diffusion = create_diffusion("6")
        out = diffusion.sample_loop(model, x_T, sampler=sampler, x0_range=(low, high))
        # the solvers stop at t = 0 without evaluating there: noise of std 0.01 is left
        torch.testing.assert_close(out, expected, atol=1e-3 if sampler in ("ancestral", "ddim") else 0.05, rtol=0)
        assert (out >= low).all() and (out <= high).all()
    diffusion = create_diffusion("10")
    t = torch.full((4,), 9)
    p = diffusion.p_mean_variance(model, x_T, t, x0_range=(low, high))
    torch.testing.assert_close(p["pred_xstart"], p["pred_xstart"].clamp(0, 5), rtol=0, atol=0)
    torch.testing.assert_close(p["mean"], diffusion.q_posterior_mean_variance(p["pred_xstart"], x_T, t)[0])
    unclipped = diffusion.p_mean_variance(model, x_T, t)
    assert (unclipped["pred_xstart"] < 0).any() and (unclipped["pred_xstart"] > 5).any()
    torch.testing.assert_close(
        diffusion.sample_loop(model, x_T, sampler="ddim", x0_range=None),
        diffusion.sample_loop(model, x_T, sampler="ddim"),
        rtol=0,
        atol=0,
    )
