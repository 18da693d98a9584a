"""Variational dequantization (Ho et al. 2019, Flow++): a learned noise distribution inside
each pixel's unit cell, trained jointly with the density model.

For integer pixels ``x`` in ``{0, ..., K-1}^D`` and a density ``p_v`` of dequantized pixels
``v`` in pixel units (cells of volume 1), any distribution ``q(u|x)`` on ``[0, 1)^D`` gives,
by Jensen's inequality,

    log P(x) = log E_{u ~ q(u|x)} [p_v(x + u) / q(u|x)]
            >= E_{u ~ q(u|x)} [log p_v(x + u) - log q(u|x)],

the variational bound. Uniform dequantization is the special case ``q = U[0, 1)^D``
(``log q = 0``); learning ``q`` lets the bound close up on ``log P(x)`` (the gap is
``KL(q(u|x) || p_v(x + u) / P(x))``). Bits/dim follow as for uniform dequantization:
``-bound / (D ln 2)``, an upper bound on the discrete data's bits/dim.

The pieces, with directions as everywhere in flowlab (``forward``: data -> noise):

* :class:`Dequantizer`, ``q(u|x)``: a conditional flow family of :mod:`flowlab.models.flows`
  (affine couplings by default) conditioned on the pixels, on a **standard logistic** base,
  followed by a sigmoid into ``(0, 1)``. Data -> noise: ``u -> h = logit(u) -> eps = T(h; x)``.
  With the logistic base, ``T = identity`` makes ``u`` exactly uniform (``log q = 0``); the
  coupling and autoregressive families start at the identity (zero output layers), so training
  starts from uniform dequantization and can only tighten from there.
* :class:`VariationalDequantization`, a registered model wrapping any maximum-likelihood image
  model (``inner``, by name and options): it takes **raw pixel values** (integers as floats,
  shaped like the inner model's events), draws ``u ~ q(u|x)``, applies the usual
  preprocessing (:class:`~flowlab.data.preprocess.Preprocess`: scale to ``[0, 1)``, logit)
  with its log-Jacobian, and scores ``log p(y) + ldj - log q(u|x)``. Its ``log_prob`` is a
  one-sample estimate of the bound on the discrete ``log P(x)`` (nats per image), its
  ``training_loss`` minus that plus the inner model's regularizers; its samples ``to_data``
  are dequantized pixels in pixel units, ``[0, K)`` (floor them for pixels).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from flowlab.data.preprocess import Preprocess, logit_inverse
from flowlab.errors import ConfigError, DataError
from flowlab.models.base import DensityModel, LossOutput, build_model, register_model
from flowlab.models.flows import FAMILIES

# Models whose training_loss is not the mean negative log-likelihood (plus regularizers):
# the bound's gradient cannot be formed from it.
NOT_MAXIMUM_LIKELIHOOD = ("cfm",)
# q(u|x) unless told otherwise: affine couplings (one pass to sample), small.
DEFAULT_DEQUANTIZER = {"family": "realnvp", "num_blocks": 4, "hidden": [64, 64]}


def logistic_log_prob(eps: torch.Tensor) -> torch.Tensor:
    """log density of the standard logistic distribution, summed over all but the first axis:
    ``log sigma(e) + log sigma(-e) = -softplus(-e) - softplus(e)``."""
    return -(F.softplus(eps) + F.softplus(-eps)).flatten(1).sum(dim=1)


def _log_sigmoid_derivative(h: torch.Tensor) -> torch.Tensor:
    """``log sigma'(h) = log sigma(h) + log sigma(-h)``, summed per row ``(N, D) -> (N,)``."""
    return -(F.softplus(h) + F.softplus(-h)).sum(dim=1)


class Dequantizer(nn.Module):
    """``q(u|x)``: a conditional flow from a standard logistic base, then a sigmoid into
    ``(0, 1)^D``, conditioned on the pixels ``x`` (see the module docstring).

    Args:
        dim: ``D``, pixels per image (``q`` works on flattened images).
        levels: intensity levels ``K``; the context is the pixels scaled to ``[-1, 1]``.
        family: a conditional flow family of :mod:`flowlab.models.flows` (``realnvp``: one
            pass both ways; ``iaf``: one-pass sampling; ``nsf-coupling``...). Sampling runs its
            noise -> data direction, so a family that inverts slowly (``maf``) samples slowly.
        **options: the family's options (``num_blocks``, ``hidden``, ...).
    """

    def __init__(self, dim: int, levels: int, family: str = "realnvp", **options: Any):
        super().__init__()
        if family not in FAMILIES:
            raise ConfigError(f"unknown dequantizer family {family!r}; choose one of "
                              f"{', '.join(sorted(FAMILIES))}")
        self.dim, self.levels = int(dim), int(levels)
        self.options = {"family": family, **options}
        try:
            self.transform = FAMILIES[family]((self.dim,), self.dim, **options)
        except TypeError as err:
            raise ConfigError(f"dequantizer {family}: {err}") from err

    def config(self) -> dict[str, Any]:
        return dict(self.options)

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """The conditioning features of pixels ``(N, ...)``: ``(N, D)`` in ``[-1, 1]``."""
        return x.reshape(x.shape[0], self.dim) * (2.0 / (self.levels - 1)) - 1.0

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim < 2 or math.prod(x.shape[1:]) != self.dim:
            raise DataError(f"the dequantizer takes images of {self.dim} pixels, got shape "
                            f"{tuple(x.shape)}")

    def sample(self, x: torch.Tensor, generator: torch.Generator | None = None,
               eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``u ~ q(u|x)`` (noise -> data); returns ``u`` ``(N, D)`` in ``(0, 1)`` and
        ``log q(u|x)`` ``(N,)`` in nats.

        ``x``: ``(N, ...)`` pixels of ``D`` values. ``eps``: the logistic base draw ``(N, D)``
        to use instead of drawing it from ``generator`` (``eps = logit(r)``, ``r ~ U(0, 1)``).
        ``u`` is clamped into ``(0, 1)`` where float rounding of the sigmoid would reach 0 or 1.
        """
        self._check(x)
        context = self.context(x)
        if eps is None:
            r = torch.rand(context.shape, generator=generator, dtype=context.dtype,
                           device=context.device)
            # rand can return 0 (one draw in 2^24 in float32), whose logit is -inf
            r = torch.clamp(r, min=torch.finfo(r.dtype).tiny)
            eps = torch.log(r) - torch.log1p(-r)
        h, ladj = self.transform.inverse(eps, context)  # log|det dh/d eps|
        u = torch.sigmoid(h)
        log_q = logistic_log_prob(eps) - ladj - _log_sigmoid_derivative(h)
        # Keep u strictly inside (0, 1) where the sigmoid rounds to 0 or 1 (|h| beyond ~17 in
        # float32 at the top, ~88 at the bottom): a move of at most one ulp of the cell.
        finfo = torch.finfo(u.dtype)
        return torch.clamp(u, min=finfo.tiny, max=1.0 - finfo.eps / 2), log_q

    def log_prob(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``log q(u|x)`` ``(N,)`` of given ``u`` ``(N, D)`` in ``(0, 1)`` (data -> noise)."""
        self._check(x)
        h = torch.log(u) - torch.log1p(-u)
        eps, ladj = self.transform(h, self.context(x))  # log|det d eps/dh|
        return logistic_log_prob(eps) + ladj - _log_sigmoid_derivative(h)


@register_model("variational-dequantization")
class VariationalDequantization(DensityModel):
    """An image density model trained and scored through variational dequantization.

    Points are raw pixel values (integers in ``0..levels-1``, as floats) of the inner model's
    event shape; ``log_prob`` returns a one-sample estimate of the variational bound on the
    discrete ``log P(x)`` in nats (see the module docstring).

    Args:
        inner: the density model of the preprocessed images, by registered name (with
            ``inner_options``) or as a built model. It must be trained by maximum likelihood.
        inner_options: options of ``build_model(inner, ...)``.
        levels: intensity levels per pixel ``K``.
        alpha: the logit transform's margin (None: the inner model works on ``[0, 1)^D``).
        dequantizer: options of :class:`Dequantizer` (``family`` and the family's options;
            default :data:`DEFAULT_DEQUANTIZER`, whose options fill in those not given for
            ``realnvp``).

    A CNF inner model's ``solver``, ``eval_solver`` and ``options`` show through (read only),
    so that training validation and evaluation set up its solves as for the bare model.
    """

    dequantization = "variational"

    def __init__(self, inner: str | DensityModel, inner_options: dict[str, Any] | None = None,
                 levels: int = 256, alpha: float | None = 0.05,
                 dequantizer: dict[str, Any] | None = None):
        if isinstance(inner, DensityModel):
            if inner_options is not None:
                raise ConfigError("give inner_options only with an inner model's name")
            model = inner
        else:
            model = build_model(inner, **(inner_options or {}))
        if model.name in NOT_MAXIMUM_LIKELIHOOD:
            raise ConfigError(f"variational dequantization maximizes a likelihood bound; "
                              f"{model.name} is not trained by maximum likelihood")
        if isinstance(model, VariationalDequantization):
            raise ConfigError("the inner model is already variationally dequantized")
        super().__init__(model.event_shape)
        self.inner = model
        self.preprocess = Preprocess(levels, alpha)
        self.dim = math.prod(self.event_shape)
        options = dict(dequantizer or {})
        if options.get("family", "realnvp") == "realnvp":
            options = {**DEFAULT_DEQUANTIZER, **options}
        self.dequantizer = Dequantizer(self.dim, self.preprocess.levels, **options)

    def config(self) -> dict[str, Any]:
        return {"inner": self.inner.name, "inner_options": self.inner.config(),
                "levels": self.preprocess.levels, "alpha": self.preprocess.alpha,
                "dequantizer": self.dequantizer.config()}

    # A CNF's settings, read through (AttributeError, hence hasattr False, for other models).
    @property
    def solver(self):
        return self.inner.solver

    @property
    def eval_solver(self):
        return self.inner.eval_solver

    @property
    def options(self) -> dict[str, Any]:
        return self.inner.options

    # -- the bound -------------------------------------------------------------------------------
    def _dequantize(self, x: torch.Tensor, generator: torch.Generator | None):
        """``(y, ldj, log_q)``: the model-space points of ``x + u`` with ``u ~ q(u|x)``,
        ``log|det dy/dv|`` and ``log q(u|x)``."""
        x = self.check_input(x)
        u, log_q = self.dequantizer.sample(x, generator)
        y, ldj = self.preprocess(x, noise=u.reshape(x.shape))
        return y, ldj, log_q

    def log_prob_with_stats(self, x: torch.Tensor, *, generator: torch.Generator | None = None,
                            **ode_options: Any) -> tuple[torch.Tensor, list]:
        """One-sample bound ``log p(y) + ldj - log q(u|x)`` ``(N,)`` in nats, and the inner
        model's solve stats (none for a discrete flow). ``generator`` draws ``u`` (and a CNF's
        Hutchinson probes); ``solver=``, ``divergence=`` go to a CNF inner model."""
        y, ldj, log_q = self._dequantize(x, generator)
        if hasattr(self.inner, "log_prob_with_stats"):
            logp, stats = self.inner.log_prob_with_stats(y, generator=generator, **ode_options)
        else:
            given = sorted(k for k, v in ode_options.items() if v is not None)
            if given:
                raise ConfigError(f"{', '.join(given)}: {self.inner.name} solves no ODE")
            logp, stats = self.inner.log_prob(y), []
        return logp + ldj - log_q, stats

    def log_prob(self, x: torch.Tensor, **options: Any) -> torch.Tensor:
        """One-sample estimate ``(N,)`` of the variational bound on the discrete log P(x), in
        nats (options as :meth:`log_prob_with_stats`)."""
        return self.log_prob_with_stats(x, **options)[0]

    def training_loss(self, x: torch.Tensor) -> LossOutput:
        """Minus the bound (a fresh ``u`` per image), plus the inner model's regularizers.

        The inner ``training_loss`` of the preprocessed points is their mean NLL (plus
        regularizers); the terms of the bound that are not the inner density are added."""
        y, ldj, log_q = self._dequantize(x, None)
        out = self.inner.training_loss(y)
        rest = (ldj - log_q).mean()
        metrics = {k: v for k, v in out.metrics.items() if k != "nll"}
        if "nll" in out.metrics:
            metrics["nll"] = out.metrics["nll"] - float(rest.detach())
        metrics["log_q"] = float(log_q.detach().mean())
        return LossOutput(out.loss - rest, metrics, out.stats)

    @torch.no_grad()
    def data_init(self, x: torch.Tensor) -> None:
        """The inner model's data-dependent initialization from the dequantized first batch."""
        y, _, _ = self._dequantize(x, None)
        self.inner.data_init(y)

    # -- the maps ----------------------------------------------------------------------------------
    def to_noise(self, x: torch.Tensor, *, generator: torch.Generator | None = None,
                 **options: Any):
        """Raw pixels -> noise: ``x + u`` with ``u ~ q(u|x)`` (from ``generator``), the
        preprocessing, then the inner model's ``to_noise`` (``options`` go to it). Returns what
        that returns; its log-determinant is the inner map's, from model space."""
        y, _, _ = self._dequantize(x, generator)
        if generator is not None and hasattr(self.inner, "log_prob_with_stats"):
            options["generator"] = generator  # a CNF's Hutchinson probes
        return self.inner.to_noise(y, **options)

    def base_sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        return self.inner.base_sample(sample_shape)

    def _to_pixel_units(self, y: torch.Tensor) -> torch.Tensor:
        z = y if self.preprocess.alpha is None else logit_inverse(y, self.preprocess.alpha)[0]
        return z * self.preprocess.levels

    def to_data(self, z: torch.Tensor, **options: Any) -> torch.Tensor:
        """Noise -> dequantized pixels ``v`` in pixel units (about ``[0, K)``; floor them, and
        clamp into range, for pixels). Options go to the inner model's ``to_data``."""
        return self._to_pixel_units(self.inner.to_data(z, **options))

    def to_data_with_stats(self, z: torch.Tensor, **options: Any):
        """:meth:`to_data` and a CNF inner model's solve stats."""
        if not hasattr(self.inner, "to_data_with_stats"):
            raise ConfigError(f"{self.inner.name} solves no ODE; use to_data")
        y, stats = self.inner.to_data_with_stats(z, **options)
        return self._to_pixel_units(y), stats


__all__ = ["Dequantizer", "VariationalDequantization", "logistic_log_prob"]
