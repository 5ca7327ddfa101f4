"""Physics checks of the demo PDE solvers against closed forms and conservation laws."""

from __future__ import annotations

import numpy as np
import pytest

from noa_dist.data import pde

N = 32
FRAME_DT = 0.25
STEPS = 16


def _mesh(n: int = N) -> tuple[np.ndarray, np.ndarray]:
    x = (np.arange(n) + 0.5) * 2 * np.pi / n
    return np.meshgrid(x, x, indexing="ij")


def test_advection_diffusion_matches_hand_written_single_mode_solution():
    x_XY, y_XY = _mesh()
    c, diffusivity = (0.7, -0.4), 0.01
    u0_XY = np.sin(2 * x_XY + 3 * y_XY)
    u_TXY = pde.advection_diffusion(u0_XY, c, diffusivity, FRAME_DT, STEPS)
    for t_index, u_XY in enumerate(u_TXY):
        t = t_index * FRAME_DT
        # u = exp(-D |k|^2 t) sin(k . (x - c t)) with k = (2, 3), |k|^2 = 13
        exact_XY = np.exp(-diffusivity * 13 * t) * np.sin(
            2 * (x_XY - c[0] * t) + 3 * (y_XY - c[1] * t)
        )
        assert np.max(np.abs(u_XY - exact_XY)) / np.max(np.abs(exact_XY)) < 1e-4


def _ginzburg_landau_energy(u_XY: np.ndarray, epsilon: float) -> float:
    """E = ∫ ε²/2 |∇u|² + (u² - 1)²/4, gradients by full complex FFT."""
    n = u_XY.shape[0]
    k = np.fft.fftfreq(n, d=1.0 / n)
    u_hat = np.fft.fft2(u_XY)
    ux = np.real(np.fft.ifft2(1j * k[:, None] * u_hat))
    uy = np.real(np.fft.ifft2(1j * k[None, :] * u_hat))
    density = epsilon**2 / 2 * (ux**2 + uy**2) + (u_XY**2 - 1) ** 2 / 4
    return float(density.sum() * (2 * np.pi / n) ** 2)


@pytest.mark.parametrize("epsilon", [0.1, 0.2])
def test_allen_cahn_energy_never_increases_and_values_stay_near_unit_interval(epsilon):
    rng = np.random.default_rng(3)
    u0_XY = 0.1 * pde.gaussian_random_field(rng, N, slope=2.0)
    u_TXY = pde.allen_cahn(u0_XY, epsilon, FRAME_DT, 2 * STEPS).astype(np.float32)
    energies = np.array([_ginzburg_landau_energy(u.astype(np.float64), epsilon) for u in u_TXY])
    assert np.all(np.diff(energies) <= 1e-6 * energies[0])
    assert energies[-1] < 0.5 * energies[0]  # the phases actually separated
    assert np.abs(u_TXY).max() <= 1.0 + 0.02
    assert np.abs(u_TXY[-1]).mean() > 0.8


def test_allen_cahn_stabilization_keeps_large_steps_bounded_and_dissipative():
    # h = 1 is 20x the generator's step; without the S term u overshoots to ~1.07 here
    u0_XY = 0.1 * pde.gaussian_random_field(np.random.default_rng(3), N, slope=2.0)
    u_TXY = pde.allen_cahn(u0_XY, 0.15, frame_dt=1.0, n_steps=STEPS, max_dt=1.0)
    energies = np.array([_ginzburg_landau_energy(u, 0.15) for u in u_TXY])
    assert np.all(np.diff(energies) <= 1e-9 * energies[0])
    assert np.abs(u_TXY).max() <= 1.01


def _turbulent_run(noise: pde.WhiteNoise | None = None) -> np.ndarray:
    rng = np.random.default_rng(5)
    w0_XY = 2.0 * pde.gaussian_random_field(rng, N, slope=4.0)
    forcing_XY = pde.kolmogorov_forcing(N, amplitude=1.5, wavenumber=4)
    # the least viscous, most strongly forced corner of the generator's parameter ranges
    return pde.navier_stokes(w0_XY, 2e-3, 0.1, forcing_XY, FRAME_DT, STEPS, noise=noise)


@pytest.mark.parametrize("noisy", [False, True], ids=["deterministic", "white_noise"])
def test_navier_stokes_stays_finite_and_conserves_mean_vorticity(noisy):
    noise = pde.WhiteNoise(0.05, np.random.default_rng(0)) if noisy else None
    w_TXY = _turbulent_run(noise)
    assert np.all(np.isfinite(w_TXY))
    scale = np.abs(w_TXY).max()
    assert scale > 1.0  # the flow did not just die out
    assert np.abs(w_TXY.mean(axis=(1, 2))).max() < 1e-12 * scale


def _shell_energy_spectrum(w_XY: np.ndarray) -> np.ndarray:
    """E(k) = Σ_{|k| in shell} |ω̂|² / (2|k|²), shells of unit width, k = 1 .. N/2 - 1."""
    n = w_XY.shape[0]
    k = np.fft.fftfreq(n, d=1.0 / n)
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    w_hat = np.fft.fft2(w_XY) / n**2
    energy = np.where(k2 > 0, np.abs(w_hat) ** 2 / (2 * np.where(k2 > 0, k2, 1)), 0.0)
    shells = np.rint(np.sqrt(k2)).astype(int)
    return np.bincount(shells.ravel(), energy.ravel())[1 : n // 2]


def test_navier_stokes_energy_spectrum_decays_with_wavenumber():
    spectrum = _shell_energy_spectrum(_turbulent_run()[-1])
    half = len(spectrum) // 2
    assert spectrum[half:].mean() < 1e-2 * spectrum[:half].mean()


def test_navier_stokes_spins_up_the_laminar_kolmogorov_flow_exactly():
    # From rest, ω stays a shear flow (u·∇ω = 0) and solves ω_t = -(νk² + α)ω + A sin(ky):
    # ω(t) = A sin(ky) (1 - exp(-λt)) / λ with λ = νk² + α.
    viscosity, drag, amplitude, k = 0.01, 0.1, 1.2, 3
    forcing_XY = pde.kolmogorov_forcing(N, amplitude, k)
    w_TXY = pde.navier_stokes(np.zeros((N, N)), viscosity, drag, forcing_XY, FRAME_DT, STEPS)
    rate = viscosity * k**2 + drag
    t_T = np.arange(STEPS + 1) * FRAME_DT
    exact_TXY = forcing_XY[None] * ((1 - np.exp(-rate * t_T)) / rate)[:, None, None]
    assert np.max(np.abs(w_TXY - exact_TXY)) < 1e-6 * np.abs(exact_TXY).max()


def test_vortex_dipole_propels_itself_toward_positive_x():
    # A counter-clockwise vortex above a clockwise one pushes the fluid between them, and the
    # pair, toward +x; a sign error in the velocity would send it to -x.
    x_XY, y_XY = _mesh(64)
    blob = lambda y0: np.exp(-((x_XY - np.pi) ** 2 + (y_XY - y0) ** 2) / 0.1)  # noqa: E731
    w0_XY = 5.0 * (blob(np.pi + 0.5) - blob(np.pi - 0.5))
    w_TXY = pde.navier_stokes(w0_XY, 1e-3, 0.0, np.zeros((64, 64)), FRAME_DT, 4)
    weights_XY = np.abs(w_TXY[-1])
    x_centre = (weights_XY * x_XY).sum() / weights_XY.sum()
    assert x_centre > np.pi + 0.1


def test_gaussian_random_field_is_reproducible_zero_mean_unit_std():
    u_XY = pde.gaussian_random_field(np.random.default_rng(7), N, slope=3.0)
    again_XY = pde.gaussian_random_field(np.random.default_rng(7), N, slope=3.0)
    assert np.array_equal(u_XY, again_XY)
    assert abs(u_XY.mean()) < 1e-12
    assert u_XY.std() == pytest.approx(1.0)
    spectrum = np.abs(np.fft.rfft2(u_XY))
    assert np.all(spectrum[N // 2, :] < 1e-9) and np.all(spectrum[:, N // 2] < 1e-9)  # no Nyquist
