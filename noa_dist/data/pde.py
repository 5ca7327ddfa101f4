"""Pseudo-spectral solvers for the demo PDE families on the periodic square [0, 2π)².

Conventions shared by every function here:
- arrays are indexed [x, y] (`u_XY[i, j] = u(x_i, y_j)`), the Well's axis order; a stack of
  frames is `u_TXY`. Points are cell-centred, x_i = (i + 1/2)·2π/N.
- spectra come from `np.fft.rfft2`: axis 0 holds k_x (both signs), axis 1 holds k_y >= 0.
  The domain length 2π makes wavenumbers integers.
- solvers compute in float64 and return `n_steps + 1` frames (the initial state first),
  `frame_dt` apart; callers cast to float32 for storage.
- `noise` (optional) adds zero-mean white noise: per grid cell and per solver step of length
  h, an increment `amplitude · sqrt(h) · N(0, 1)` (an Euler-Maruyama step of additive
  space-time white noise, discretised per cell, so its strength depends on the grid).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

DOMAIN_LENGTH = 2.0 * math.pi


def grid_coordinates(n: int) -> np.ndarray:
    """Cell-centred coordinates of an n-point periodic axis on [0, 2π)."""
    return (np.arange(n) + 0.5) * (DOMAIN_LENGTH / n)


def wavenumbers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer wavenumbers `(kx_X1, ky_1Y)` broadcastable over an rfft2 spectrum [n, n//2+1]."""
    kx_X1 = np.fft.fftfreq(n, d=1.0 / n)[:, None]
    ky_1Y = np.fft.rfftfreq(n, d=1.0 / n)[None, :]
    return kx_X1, ky_1Y


def _band_limit_mask(n: int, cutoff: float) -> np.ndarray:
    """True where |k_x| < cutoff and |k_y| < cutoff (a square mask on the rfft2 spectrum)."""
    kx_X1, ky_1Y = wavenumbers(n)
    return (np.abs(kx_X1) < cutoff) & (np.abs(ky_1Y) < cutoff)


def gaussian_random_field(rng: np.random.Generator, n: int, slope: float) -> np.ndarray:
    """Zero-mean, unit-std real field u_XY with power spectrum ∝ (1 + |k|²)^(-slope/2).

    White noise is coloured in Fourier space. The mean (k = 0) and the Nyquist modes are
    removed so that every solver below acts on a band-limited real signal (a Nyquist mode
    cannot be phase-shifted and stay real, which would break the exact advection solution).
    """
    kx_X1, ky_1Y = wavenumbers(n)
    amplitude = (1.0 + kx_X1**2 + ky_1Y**2) ** (-slope / 4.0)
    spectrum = np.fft.rfft2(rng.standard_normal((n, n))) * amplitude
    spectrum *= _band_limit_mask(n, n / 2)
    spectrum[0, 0] = 0.0
    u_XY = np.fft.irfft2(spectrum, s=(n, n))
    return u_XY / u_XY.std()


@dataclass
class WhiteNoise:
    """Additive stochastic forcing: `amplitude · sqrt(h) · N(0, 1)` per cell per step h."""

    amplitude: float
    rng: np.random.Generator

    def increment_hat(self, n: int, h: float) -> np.ndarray:
        """The rfft2 spectrum of one zero-mean noise increment over a step of length h."""
        xi_hat = np.fft.rfft2(self.rng.standard_normal((n, n)))
        xi_hat[0, 0] = 0.0  # zero mean: keeps the mean vorticity of Navier-Stokes fixed
        return self.amplitude * math.sqrt(h) * xi_hat


def _to_frames(frames_hat: list[np.ndarray], n: int) -> np.ndarray:
    return np.stack([np.fft.irfft2(f_hat, s=(n, n)) for f_hat in frames_hat])


def advection_diffusion(
    u0_XY: np.ndarray,
    velocity: tuple[float, float],
    diffusivity: float,
    frame_dt: float,
    n_steps: int,
    noise: WhiteNoise | None = None,
) -> np.ndarray:
    """u_t + c·∇u = D Δu, solved exactly: û(k, t + h) = û(k, t) exp((-i k·c - D|k|²) h).

    Without noise every frame is the exact solution (up to round-off); with noise one
    increment is added per frame interval.
    """
    n = u0_XY.shape[0]
    kx_X1, ky_1Y = wavenumbers(n)
    exponent = -1j * (kx_X1 * velocity[0] + ky_1Y * velocity[1]) - diffusivity * (
        kx_X1**2 + ky_1Y**2
    )
    propagator = np.exp(exponent * frame_dt)
    u_hat = np.fft.rfft2(u0_XY)
    frames_hat = [u_hat]
    for _ in range(n_steps):
        u_hat = propagator * u_hat
        if noise is not None:
            u_hat = u_hat + noise.increment_hat(n, frame_dt)
        frames_hat.append(u_hat)
    return _to_frames(frames_hat, n)


def allen_cahn(
    u0_XY: np.ndarray,
    epsilon: float,
    frame_dt: float,
    n_steps: int,
    max_dt: float = 0.05,
    stabilization: float = 1.0,
    noise: WhiteNoise | None = None,
) -> np.ndarray:
    """u_t = ε² Δu + u - u³ with a stabilised semi-implicit spectral scheme.

    Diffusion is implicit, the reaction explicit, plus a stabilising term S(u^{n+1} - u^n)
    with S = 1 >= max|f'|/2 for f(u) = u - u³ on [-1, 1], which keeps the discrete
    Ginzburg-Landau energy non-increasing for any step size while |u| <= 1 (Shen & Yang 2010):
        (1 + h(S + ε²|k|²)) û^{n+1} = (1 + hS) û^n + h FFT(u^n - (u^n)³).
    """
    n = u0_XY.shape[0]
    n_sub = max(1, math.ceil(frame_dt / max_dt - 1e-9))
    h = frame_dt / n_sub
    kx_X1, ky_1Y = wavenumbers(n)
    denominator = 1.0 + h * (stabilization + epsilon**2 * (kx_X1**2 + ky_1Y**2))
    u_XY = np.array(u0_XY, dtype=np.float64)
    frames = [u_XY]
    for _ in range(n_steps):
        for _ in range(n_sub):
            # (1 + hS) u + h (u - u³), transformed once
            rhs_hat = np.fft.rfft2((1.0 + h * (1.0 + stabilization)) * u_XY - h * u_XY**3)
            if noise is not None:
                rhs_hat = rhs_hat + noise.increment_hat(n, h)
            u_XY = np.fft.irfft2(rhs_hat / denominator, s=(n, n))
        frames.append(u_XY)
    return np.stack(frames)


def kolmogorov_forcing(n: int, amplitude: float, wavenumber: int) -> np.ndarray:
    """Vorticity forcing f_XY = A sin(k_f y), the curl of the body force (A/k_f) cos(k_f y) x̂."""
    y = grid_coordinates(n)
    return np.broadcast_to(amplitude * np.sin(wavenumber * y)[None, :], (n, n)).copy()


class _VorticityOperator:
    """Spectral pieces of ω_t = -u·∇ω + ν Δω - α ω + f (2D incompressible, vorticity form)."""

    def __init__(self, n: int, viscosity: float, drag: float, forcing_XY: np.ndarray):
        self.n = n
        kx_X1, ky_1Y = wavenumbers(n)
        k2 = kx_X1**2 + ky_1Y**2
        self.ikx, self.iky = 1j * kx_X1, 1j * ky_1Y
        self.linear = -viscosity * k2 - drag
        self.inverse_laplacian = np.where(k2 > 0, 1.0 / np.where(k2 > 0, k2, 1.0), 0.0)
        self.dealias = _band_limit_mask(n, n / 3)  # the 2/3 rule
        self.forcing_hat = np.fft.rfft2(forcing_XY)

    def _to_grid(self, *spectra: np.ndarray) -> np.ndarray:
        return np.fft.irfft2(np.stack(spectra), s=(self.n, self.n))  # one batched call

    def velocity(self, w_hat: np.ndarray) -> np.ndarray:
        """(u, v) stacked: u = ∂ψ/∂y, v = -∂ψ/∂x with ψ̂ = ω̂/|k|² (so ω = ∂v/∂x - ∂u/∂y)."""
        psi_hat = w_hat * self.inverse_laplacian
        return self._to_grid(self.iky * psi_hat, -self.ikx * psi_hat)

    def nonlinear(self, w_hat: np.ndarray) -> np.ndarray:
        """FFT(-u·∇ω), dealiased, plus the forcing."""
        psi_hat = w_hat * self.inverse_laplacian
        u, v, wx, wy = self._to_grid(
            self.iky * psi_hat, -self.ikx * psi_hat, self.ikx * w_hat, self.iky * w_hat
        )
        return self.forcing_hat - np.fft.rfft2(u * wx + v * wy) * self.dealias

    def stable_dt(self, w_hat: np.ndarray, cfl: float) -> float:
        u, v = self.velocity(w_hat)
        speed = float(np.max(np.abs(u)) + np.max(np.abs(v)))
        return cfl * (DOMAIN_LENGTH / self.n) / max(speed, 1e-12)

    def stepper(self, h: float) -> Callable[[np.ndarray], np.ndarray]:
        """One integrating-factor SSP-RK3 step of length h: viscosity and drag exact, advection RK3."""
        e_full = np.exp(self.linear * h)
        e_half = np.exp(self.linear * h / 2)
        inv_e_half = 1.0 / e_half

        def step(w_hat: np.ndarray) -> np.ndarray:
            w1 = e_full * (w_hat + h * self.nonlinear(w_hat))
            w2 = 0.75 * e_half * w_hat + 0.25 * inv_e_half * (w1 + h * self.nonlinear(w1))
            return e_full * w_hat / 3.0 + (2.0 / 3.0) * e_half * (w2 + h * self.nonlinear(w2))

        return step


def navier_stokes(
    w0_XY: np.ndarray,
    viscosity: float,
    drag: float,
    forcing_XY: np.ndarray,
    frame_dt: float,
    n_steps: int,
    cfl: float = 0.5,
    max_dt: float = 0.05,
    noise: WhiteNoise | None = None,
) -> np.ndarray:
    """ω_t + u·∇ω = ν Δω - α ω + f, pseudo-spectral with 2/3 dealiasing; returns ω_TXY.

    Each frame interval is split into equal substeps no longer than `max_dt` nor
    `cfl · dx / (max|u| + max|v|)` (measured at the start of the interval).
    """
    n = w0_XY.shape[0]
    operator = _VorticityOperator(n, viscosity, drag, forcing_XY)
    w_hat = np.fft.rfft2(w0_XY)
    frames_hat = [w_hat]
    for _ in range(n_steps):
        dt = min(max_dt, operator.stable_dt(w_hat, cfl))
        n_sub = max(1, math.ceil(frame_dt / dt - 1e-9))
        h = frame_dt / n_sub
        step = operator.stepper(h)
        for _ in range(n_sub):
            w_hat = step(w_hat)
            if noise is not None:
                w_hat = w_hat + noise.increment_hat(n, h)
        frames_hat.append(w_hat)
    return _to_frames(frames_hat, n)
