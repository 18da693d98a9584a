"""Discrete normalizing flows: a standard-normal base and a stack of bijections.

Every family is a configuration of the shared pieces in :mod:`flowlab.transforms`, registered
by name with :func:`register_family`; there is one model class, :class:`Flow`:

============== ===============================================================================
``planar``     planar layers (Rezende & Mohamed 2015); density by 1-D root finding per layer
``radial``     radial layers (same paper); density in closed form
``nice``       additive couplings on alternating features, then a diagonal scaling (NICE)
``realnvp``    affine couplings on alternating features [+ batch norm] (RealNVP); on images a
               multiscale stack of checkerboard couplings with squeeze and factor-out
``glow``       ActNorm, invertible linear (1x1 convolution, LU form), affine coupling (Glow);
               on images multiscale with squeeze and factor-out
``maf``        masked affine autoregressive steps, order reversed between steps (MAF)
``iaf``        the same transform used the other way: one-pass sampling (IAF)
``nsf-coupling`` rational-quadratic spline couplings + invertible linear maps (NSF)
``nsf-ar``     rational-quadratic autoregressive splines (NSF)
============== ===============================================================================

Directions as everywhere in flowlab: the transform maps data to noise (``to_noise``), its
inverse maps noise to data (``to_data``). A flow behaves like a ``torch.distributions``
distribution: ``log_prob``, ``sample``, ``rsample``; a conditional flow (``context_dim``)
takes a ``(batch, context_dim)`` context and then has batch shape ``(batch,)``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from flowlab.errors import ConfigError
from flowlab.models.base import MODELS, DensityModel, LossOutput, standard_normal_log_prob
from flowlab.transforms import Compose, Transform
from flowlab.transforms.autoregressive import LOG_SCALE_BOUND
from flowlab.transforms.coupling import AdditiveCoupling, AffineCoupling, Scaling
from flowlab.transforms.linear import ActNorm, BatchNorm, InvertibleLinearLU
from flowlab.transforms.reshape import Split, Squeeze

Builder = Callable[..., Transform]
FAMILIES: dict[str, Builder] = {}


class Flow(DensityModel):
    """A standard-normal base distribution pushed through ``transform`` (noise -> data by
    its inverse). Build families by name with ``build_model(family, **options)``."""

    def __init__(self, family: str, options: dict[str, Any], transform: Transform,
                 event_shape: Sequence[int], context_dim: int | None = None):
        super().__init__(tuple(event_shape))
        self.name = family
        self.options = json.loads(json.dumps(options))  # as a checkpoint will hold them
        self.transform = transform
        self.context_dim = context_dim
        self.latent_shape = tuple(transform.output_shape(self.event_shape))

    def config(self) -> dict[str, Any]:
        return dict(self.options)

    # -- the maps ---------------------------------------------------------------------------
    def to_noise(self, x: torch.Tensor, context: torch.Tensor | None = None):
        """``(y, log|det dy/dx|)`` for data points ``x``."""
        return self.transform(self.check_input(x), context)

    def to_data(self, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x, _ = self.transform.inverse(z, context)
        return x

    def log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Log-density in nats: ``(batch, *event_shape) -> (batch,)``."""
        y, ladj = self.to_noise(x, context)
        return standard_normal_log_prob(y) + ladj

    def base_sample(self, sample_shape=()) -> torch.Tensor:
        ref = self._reference()
        shape = torch.Size(sample_shape)
        return torch.randn((*shape, *self.latent_shape), dtype=ref.dtype, device=ref.device)

    def rsample(self, sample_shape=(), context: torch.Tensor | None = None) -> torch.Tensor:
        """Samples ``(*sample_shape, *event_shape)``; with a context of ``B`` rows,
        ``(*sample_shape, B, *event_shape)`` (one batch of samples per context)."""
        shape = torch.Size(sample_shape)
        n = math.prod(shape)
        if context is None:
            z = self.base_sample((n,))
            return self.to_data(z).reshape(*shape, *self.event_shape)
        rows = context.shape[0]
        z = self.base_sample((n * rows,))
        x = self.to_data(z, context.repeat(n, 1))
        return x.reshape(*shape, rows, *self.event_shape)

    def sample(self, sample_shape=(), context: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape, context)

    # -- training ----------------------------------------------------------------------------
    def training_loss(self, x: torch.Tensor, context: torch.Tensor | None = None) -> LossOutput:
        nll = -self.log_prob(x, context).mean()
        return LossOutput(nll, {"nll": float(nll.detach())})

    @torch.no_grad()
    def data_init(self, x: torch.Tensor, context: torch.Tensor | None = None) -> None:
        """Data-dependent initialization (ActNorm) from a first batch, before training."""
        was_training = self.training
        self.train()
        try:
            self.transform(self.check_input(x), context)
        finally:
            self.train(was_training)


def register_family(name: str) -> Callable[[Builder], Builder]:
    """Decorator on ``builder(shape, context_dim, **options) -> Transform``: ``name`` becomes
    a model that ``build_model(name, dim=... | image_shape=..., **options)`` makes."""

    def decorate(builder: Builder) -> Builder:
        if name in MODELS:
            raise ValueError(f"model name {name!r} is registered twice")
        FAMILIES[name] = builder

        def make(dim: int | None = None, image_shape: Sequence[int] | None = None,
                 context_dim: int | None = None, **options: Any) -> Flow:
            if (dim is None) == (image_shape is None):
                raise ConfigError(f"{name}: give dim (vectors) or image_shape (C, H, W)")
            shape = (int(dim),) if dim is not None else tuple(int(s) for s in image_shape)
            if any(s < 1 for s in shape) or len(shape) not in (1, 3):
                raise ConfigError(f"{name}: shapes must be (D,) or (C, H, W), positive, got "
                                  f"{shape}")
            if context_dim is not None and int(context_dim) < 1:
                raise ConfigError(f"{name}: context_dim must be positive, got {context_dim}")
            try:
                transform = builder(shape, context_dim, **options)
            except TypeError as err:  # an option this family does not have
                raise ConfigError(f"{name}: {err}") from err
            config = {"dim": dim} if dim is not None else {"image_shape": list(shape)}
            config.update(context_dim=context_dim, **options)
            return Flow(name, config, transform, shape, context_dim)

        MODELS[name] = make
        return builder

    return decorate


# -- the families ----------------------------------------------------------------------------------
def _positive(name: str, **values: int) -> None:
    for key, value in values.items():
        if int(value) < 1:
            raise ConfigError(f"{name}: {key} must be at least 1, got {value}")


def _vector(name: str, shape: tuple[int, ...]) -> int:
    if len(shape) != 1:
        raise ConfigError(f"{name} is a flow of vectors: give dim, not image_shape")
    return shape[0]


def _no_context(name: str, context_dim: int | None) -> None:
    if context_dim is not None:
        raise ConfigError(f"{name} has no conditional version; drop context_dim")


@register_family("planar")
def _planar(shape, context_dim, num_blocks: int = 16) -> Transform:
    from flowlab.transforms.planar import Planar

    _no_context("planar", context_dim)
    _positive("planar", num_blocks=num_blocks)
    return Compose([Planar(_vector("planar", shape)) for _ in range(num_blocks)])


@register_family("radial")
def _radial(shape, context_dim, num_blocks: int = 16) -> Transform:
    from flowlab.transforms.planar import Radial

    _no_context("radial", context_dim)
    _positive("radial", num_blocks=num_blocks)
    return Compose([Radial(_vector("radial", shape)) for _ in range(num_blocks)])


@register_family("nice")
def _nice(shape, context_dim, num_blocks: int = 4, hidden: Sequence[int] = (64, 64)) -> Transform:
    dim = _vector("nice", shape)
    _positive("nice", num_blocks=num_blocks)
    layers: list[Transform] = [
        AdditiveCoupling((dim,), "alternate", i, hidden, context_dim) for i in range(num_blocks)
    ]
    return Compose([*layers, Scaling((dim,))])


def _multiscale(shape: tuple[int, int, int], levels: int,
                step: Callable[[tuple[int, ...], int], list[Transform]],
                steps_per_level: int) -> Transform:
    """Squeeze, ``steps_per_level`` steps, then factor out half the channels and recurse."""
    c, h, w = shape
    squeezed = (4 * c, h // 2, w // 2)
    if h % 2 or w % 2:
        raise ConfigError(f"{levels} levels of squeezing need sides divisible by 2**levels, "
                          f"got {shape}")
    layers: list[Transform] = [Squeeze()]
    for k in range(steps_per_level):
        layers += step(squeezed, k)
    if levels > 1:
        inner = _multiscale((squeezed[0] - squeezed[0] // 2, *squeezed[1:]), levels - 1, step,
                            steps_per_level)
        layers.append(Split(squeezed, inner))
    return Compose(layers)


@register_family("realnvp")
def _realnvp(shape, context_dim, num_blocks: int = 8, hidden: Sequence[int] = (64, 64),
             batch_norm: bool = False, levels: int = 2) -> Transform:
    _positive("realnvp", num_blocks=num_blocks, levels=levels)
    if len(shape) == 3:
        _no_context("realnvp on images", context_dim)
        width = int(tuple(hidden)[0]) if hidden else 64

        def step(s, k):
            layer = [AffineCoupling(s, "checkerboard", k, width)]
            return layer + ([BatchNorm(s[0])] if batch_norm else [])

        return _multiscale(shape, levels, step, num_blocks)
    dim = shape[0]
    layers: list[Transform] = []
    for i in range(num_blocks):
        layers.append(AffineCoupling((dim,), "alternate", i, hidden, context_dim))
        if batch_norm and i < num_blocks - 1:
            layers.append(BatchNorm(dim))
    return Compose(layers)


@register_family("glow")
def _glow(shape, context_dim, num_blocks: int = 8, hidden: Sequence[int] = (64, 64),
          levels: int = 2) -> Transform:
    _positive("glow", num_blocks=num_blocks, levels=levels)
    if len(shape) == 3:
        _no_context("glow on images", context_dim)
        width = int(tuple(hidden)[0]) if hidden else 64

        def step(s, k):
            return [ActNorm(s[0]), InvertibleLinearLU(s[0], seed=k),
                    AffineCoupling(s, "channel", k, width)]

        return _multiscale(shape, levels, step, num_blocks)
    dim = shape[0]
    layers: list[Transform] = []
    for i in range(num_blocks):
        layers += [ActNorm(dim), InvertibleLinearLU(dim, seed=i),
                   AffineCoupling((dim,), "half", i, hidden, context_dim)]
    return Compose(layers)


def _orders(dim: int, num_blocks: int) -> list[list[int]]:
    natural = list(range(dim))
    return [natural if i % 2 == 0 else natural[::-1] for i in range(num_blocks)]


@register_family("maf")
def _maf(shape, context_dim, num_blocks: int = 5, hidden: Sequence[int] = (64, 64),
         batch_norm: bool = False, log_scale_bound: float = LOG_SCALE_BOUND) -> Transform:
    from flowlab.transforms.autoregressive import maf_step

    dim = _vector("maf", shape)
    _positive("maf", num_blocks=num_blocks)
    layers: list[Transform] = []
    for i, order in enumerate(_orders(dim, num_blocks)):
        layers.append(maf_step(dim, hidden=hidden, context_dim=context_dim, order=order,
                               log_scale_bound=log_scale_bound))
        if batch_norm and i < num_blocks - 1:
            layers.append(BatchNorm(dim))
    return Compose(layers)


@register_family("iaf")
def _iaf(shape, context_dim, num_blocks: int = 5, hidden: Sequence[int] = (64, 64),
         log_scale_bound: float = LOG_SCALE_BOUND) -> Transform:
    from flowlab.transforms.autoregressive import iaf_step

    dim = _vector("iaf", shape)
    _positive("iaf", num_blocks=num_blocks)
    return Compose([iaf_step(dim, hidden=hidden, context_dim=context_dim, order=order,
                             log_scale_bound=log_scale_bound)
                    for order in _orders(dim, num_blocks)])


@register_family("nsf-coupling")
def _nsf_coupling(shape, context_dim, num_blocks: int = 4, hidden: Sequence[int] = (64, 64),
                  bins: int = 8, bound: float = 4.0) -> Transform:
    from flowlab.transforms.splines import RQSCoupling

    dim = _vector("nsf-coupling", shape)
    _positive("nsf-coupling", num_blocks=num_blocks)
    layers: list[Transform] = []
    for i in range(num_blocks):
        layers.append(RQSCoupling(dim, bins=bins, bound=bound, hidden=hidden,
                                  context_dim=context_dim, parity=i % 2))
        if i < num_blocks - 1:
            layers.append(InvertibleLinearLU(dim, seed=i))
    return Compose(layers)


@register_family("nsf-ar")
def _nsf_ar(shape, context_dim, num_blocks: int = 4, hidden: Sequence[int] = (64, 64),
            bins: int = 8, bound: float = 4.0) -> Transform:
    from flowlab.transforms.splines import RQSAutoregressive

    dim = _vector("nsf-ar", shape)
    _positive("nsf-ar", num_blocks=num_blocks)
    return Compose([RQSAutoregressive(dim, bins=bins, bound=bound, hidden=hidden,
                                      context_dim=context_dim, order=order)
                    for order in _orders(dim, num_blocks)])


__all__ = ["FAMILIES", "Flow", "register_family"]
