"""From integer pixels to a density model's space, with every log-Jacobian, and bits per dim.

Direction, as for ``forward`` everywhere in flowlab: **pixels -> model space**. For an image of
``D`` pixels with ``K`` levels, ``x`` in ``{0, ..., K-1}^D``, the chain is::

    v = x + u,  u ~ U[0, 1)^D            dequantized pixels in [0, K)^D (pixel units)
    z = v / K                            in [0, 1)^D       log|det dz/dv| = -D log K
    y = logit(alpha + (1 - 2 alpha) z)   model space       log|det dy/dz| =
                                         sum_i [log(1 - 2 alpha) - log s_i - log(1 - s_i)]
                                         with s_i = alpha + (1 - 2 alpha) z_i

(the logit step as in RealNVP and FFJORD; ``alpha=None`` skips it and the model lives on
``[0, 1)^D``). :class:`Preprocess` returns ``y`` and ``ldj = log|det dy/dv|``, the sum of both
terms per image, so that ``log p_v(v) = log p_y(y) + ldj`` is the model's density of the
dequantized pixels in pixel units.

Bits per dimension of the discrete data: the unit cubes ``x + [0, 1)^D`` tile ``[0, K)^D`` and
each has volume 1 in pixel units, so the model gives the discrete image the probability
``P(x) = E_u[p_v(x + u)]`` and, by Jensen's inequality,
``-log2 P(x) <= E_u[-log2 p_v(x + u)]`` (uniform dequantization; Theis, van den Oord & Bethge
2016). :func:`bits_per_dim` returns ``-(log p_y(y) + ldj) / (D ln 2)``, whose mean over ``u``
is that upper bound divided by ``D``. A model uniform on the cube (``p_v = 1``) scores exactly
``log2 K`` bits/dim: 8 for 256 levels.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch.nn import functional as F

from flowlab.errors import ConfigError, DataError

Pair = tuple[torch.Tensor, torch.Tensor]


def _check_levels_option(levels: int) -> int:
    if isinstance(levels, bool) or not isinstance(levels, numbers.Integral) or levels < 2:
        raise ConfigError(f"levels must be an int >= 2 (intensity levels per pixel), got "
                          f"{levels!r}")
    return int(levels)


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) \
            or not 0.0 <= alpha < 0.5:
        raise ConfigError(f"alpha must be a number in [0, 0.5), got {alpha!r}")
    return float(alpha)


def _check_batch(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(f"{what} expects a batch (N, ...) of events, got {shape}")


def _event_dims(x: torch.Tensor) -> int:
    return math.prod(x.shape[1:])


def _sum_event(t: torch.Tensor) -> torch.Tensor:
    """Per-element terms ``(N, ...)`` summed over each event: ``(N,)``."""
    return t.reshape(t.shape[0], -1).sum(dim=1)


def _float_dtype(x: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        if not dtype.is_floating_point:
            raise ConfigError(f"dtype must be a floating dtype, got {dtype}")
        return dtype
    return x.dtype if x.is_floating_point() else torch.get_default_dtype()


def _check_pixels(x: torch.Tensor, levels: int) -> None:
    _check_batch(x, "dequantize")
    if x.dtype == torch.bool or x.is_complex():
        raise DataError(f"pixels must be integers, got a {x.dtype} tensor")
    if x.numel() == 0:
        return
    if x.is_floating_point() and not torch.equal(x, torch.floor(x)):
        raise DataError(f"pixels must be integers in 0..{levels - 1}; got non-integer (or "
                        "non-finite) values: pass the raw pixels, not scaled ones")
    low, high = x.min().item(), x.max().item()
    if low < 0 or high > levels - 1:
        raise DataError(f"pixels must lie in 0..{levels - 1} ({levels} levels), got values in "
                        f"{low:g}..{high:g}")


def dequantize(
    x: torch.Tensor,
    levels: int,
    generator: torch.Generator | None = None,
    *,
    noise: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> Pair:
    """Uniform dequantization ``z = (x + u) / levels`` of integer pixels; returns ``(z, ldj)``.

    Args:
        x: ``(N, ...)`` integer pixel values in ``0..levels-1`` (any integer dtype, or a float
            tensor holding integers).
        levels: intensity levels per pixel ``K``.
        generator: draws ``u ~ U[0, 1)`` of ``x``'s shape on ``x``'s device.
        noise: the ``u`` to use instead of drawing it (values in ``[0, 1)``), e.g. to evaluate
            several models on the same dequantized points.
        dtype: floating dtype of ``z`` (default: ``x``'s if floating, else ``noise``'s if
            given, else the default dtype).

    Returns:
        ``z`` of ``x``'s shape in ``[0, 1)`` and ``ldj`` ``(N,)``, the log-determinant of the
        map ``v = x + u -> z = v / K`` from pixel units: ``-D log K`` for every image of ``D``
        pixels. ``z`` is clamped below 1 where rounding ``(K - 1 + u) / K`` would reach it.
    """
    levels = _check_levels_option(levels)
    _check_pixels(x, levels)
    if dtype is None and not x.is_floating_point() and noise is not None \
            and noise.is_floating_point():
        dtype = noise.dtype
    out_dtype = _float_dtype(x, dtype)
    if noise is None:
        noise = torch.rand(x.shape, generator=generator, dtype=out_dtype, device=x.device)
    else:
        if generator is not None:
            raise ConfigError("give dequantize either noise= or generator=, not both")
        if noise.shape != x.shape:
            raise DataError(f"noise of shape {tuple(noise.shape)} for pixels of shape "
                            f"{tuple(x.shape)}")
        if noise.numel() and not bool(((noise >= 0) & (noise < 1)).all()):
            raise DataError("dequantization noise must lie in [0, 1)")
        noise = noise.to(out_dtype)
    z = (x.to(out_dtype) + noise) / levels
    below_one = torch.nextafter(torch.ones((), dtype=out_dtype), torch.zeros((), dtype=out_dtype))
    z = torch.clamp(z, max=below_one.to(z.device))
    ldj = torch.full((x.shape[0],), -_event_dims(x) * math.log(levels), dtype=out_dtype,
                     device=x.device)
    return z, ldj


def logit_transform(x: torch.Tensor, alpha: float = 0.05) -> Pair:
    """``y = logit(alpha + (1 - 2 alpha) x)`` elementwise; returns ``(y, log|det dy/dx|)``.

    ``x`` is ``(N, ...)`` with values in ``[0, 1]``; the log-determinant ``(N,)`` sums
    ``log(1 - 2 alpha) - log s - log(1 - s)``, ``s = alpha + (1 - 2 alpha) x``, over each event.
    With ``alpha > 0``, ``s`` stays in ``[alpha, 1 - alpha]`` and everything is finite; with
    ``alpha = 0`` a pixel at exactly 0 or 1 maps to an infinite ``y``.
    """
    alpha = _check_alpha(alpha)
    _check_batch(x, "logit_transform")
    if not x.is_floating_point():
        raise DataError(f"logit_transform expects floating values in [0, 1], got {x.dtype}")
    if x.numel() and not bool(((x >= 0) & (x <= 1)).all()):
        raise DataError("logit_transform expects values in [0, 1] (dequantized pixels "
                        "divided by the number of levels); found values outside or NaN")
    s = alpha + (1.0 - 2.0 * alpha) * x
    log_s, log_1ms = torch.log(s), torch.log1p(-s)
    y = log_s - log_1ms
    ldj = _sum_event(-log_s - log_1ms) + _event_dims(x) * math.log1p(-2.0 * alpha)
    return y, ldj


def logit_inverse(y: torch.Tensor, alpha: float = 0.05) -> Pair:
    """Inverse of :func:`logit_transform`: ``x = (sigmoid(y) - alpha) / (1 - 2 alpha)``;
    returns ``(x, log|det dx/dy|)``, ``(N, ...)`` and ``(N,)``.

    Exact for every real ``y``: values of ``y`` beyond ``logit(alpha)`` or ``logit(1 - alpha)``
    (possible in a model's samples) give ``x`` slightly outside ``[0, 1]``; clamp when turning
    them into pixels (:meth:`Preprocess.to_pixels` does). The log-determinant uses
    ``log sigmoid(y) = -softplus(-y)`` so it stays finite for large ``|y|``.
    """
    alpha = _check_alpha(alpha)
    _check_batch(y, "logit_inverse")
    if not y.is_floating_point():
        raise DataError(f"logit_inverse expects floating values, got {y.dtype}")
    x = (torch.sigmoid(y) - alpha) / (1.0 - 2.0 * alpha)
    ldj = _sum_event(-F.softplus(-y) - F.softplus(y)) - _event_dims(y) * math.log1p(-2.0 * alpha)
    return x, ldj


def bits_per_dim(log_prob: torch.Tensor, ldj: torch.Tensor, num_dims: int) -> torch.Tensor:
    """Bits per dimension of discrete images under uniform dequantization, ``(N,)``.

    Args:
        log_prob: ``(N,)`` log-density in nats of the preprocessed images ``y``.
        ldj: ``(N,)`` ``log|det dy/dv|`` of the whole preprocessing from the dequantized pixels
            ``v = x + u`` in pixel units, ``[0, K)^D`` (the ``ldj`` of :class:`Preprocess`;
            it includes the ``-D log K`` of scaling to ``[0, 1)``).
        num_dims: ``D``, pixels per image.

    Returns:
        ``-(log_prob + ldj) / (D ln 2)``: ``-log2 p_v(v) / D``, whose mean over the
        dequantization noise bounds ``-log2 P(x) / D`` from above.
    """
    if isinstance(num_dims, bool) or not isinstance(num_dims, numbers.Integral) or num_dims < 1:
        raise ConfigError(f"num_dims must be an int >= 1 (pixels per image), got {num_dims!r}")
    if log_prob.shape != ldj.shape:
        raise DataError(f"log_prob {tuple(log_prob.shape)} and ldj {tuple(ldj.shape)} must "
                        "have the same shape (one value per image)")
    return -(log_prob + ldj) / (num_dims * math.log(2.0))


class Preprocess:
    """Integer pixels -> model space: dequantize, scale to ``[0, 1)``, then (unless ``alpha``
    is None) the logit transform. See the module docstring for the maps and their Jacobians.

    Args:
        levels: intensity levels per pixel ``K`` (256 for 8-bit images, 17 for digits).
        alpha: the logit transform's margin, in ``[0, 0.5)``; ``None`` leaves the model on
            ``[0, 1)^D``.
        dequantize: add uniform noise (training, and evaluation as a bound). ``False`` puts
            every pixel at the centre of its cell, ``(x + 1/2) / K``, with the same Jacobian:
            deterministic, but its bits/dim are then a point value, not a bound.

    Stateless: nothing is stored between calls; pass the generator (or the noise) you want.
    """

    def __init__(self, levels: int, alpha: float | None = 0.05, dequantize: bool = True) -> None:
        self.levels = _check_levels_option(levels)
        self.alpha = None if alpha is None else _check_alpha(alpha)
        if not isinstance(dequantize, bool):
            raise ConfigError(f"dequantize must be True or False, got {dequantize!r}")
        self.dequantize = dequantize

    def __repr__(self) -> str:
        return (f"Preprocess(levels={self.levels}, alpha={self.alpha}, "
                f"dequantize={self.dequantize})")

    def forward(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        noise: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> Pair:
        """``(N, ...)`` integer pixels -> ``(y, ldj)``: model-space ``y`` of the same shape and
        ``ldj = log|det dy/dv|`` ``(N,)`` from the dequantized pixels ``v`` in pixel units."""
        if not self.dequantize:
            if noise is not None or generator is not None:
                raise ConfigError("this Preprocess does not dequantize (dequantize=False): "
                                  "drop generator= and noise=")
            noise = torch.full(x.shape, 0.5, dtype=_float_dtype(x, dtype), device=x.device)
        z, ldj = dequantize(x, self.levels, generator, noise=noise, dtype=dtype)
        if self.alpha is None:
            return z, ldj
        y, ldj_logit = logit_transform(z, self.alpha)
        return y, ldj + ldj_logit

    __call__ = forward

    def to_pixels(self, y: torch.Tensor) -> torch.Tensor:
        """Model-space ``y`` (e.g. samples) -> integer pixels in ``0..K-1``, ``uint8`` (or
        ``int64`` beyond 256 levels): the cell each point falls in, clamped into range."""
        _check_batch(y, "to_pixels")
        z = y if self.alpha is None else logit_inverse(y, self.alpha)[0]
        pixels = torch.floor(z * self.levels).clamp(0, self.levels - 1)
        return pixels.to(torch.uint8 if self.levels <= 256 else torch.int64)

    def bits_per_dim(
        self, log_prob: torch.Tensor, ldj: torch.Tensor, num_dims: int
    ) -> torch.Tensor:
        """:func:`bits_per_dim` of the ``y`` and ``ldj`` that :meth:`forward` returned."""
        return bits_per_dim(log_prob, ldj, num_dims)
