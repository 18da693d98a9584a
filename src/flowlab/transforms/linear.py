"""Volume-changing and volume-preserving linear maps over the feature (or channel) axis:
fixed permutations, ActNorm, batch normalization, Glow's invertible 1x1 convolution.

All act on axis 1 of ``(batch, D)`` vectors or ``(batch, C, H, W)`` images; for images the
log-determinant of a per-channel map is counted once per pixel (times H*W).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from flowlab.errors import ConfigError
from flowlab.transforms.base import Pair, Transform, randomize_, register_example


def _per_channel(param: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A ``(C,)`` parameter shaped to broadcast against ``x`` along axis 1."""
    return param.reshape(1, -1, *([1] * (x.ndim - 2)))


def _pixels(x: torch.Tensor) -> int:
    return int(x[0, 0].numel())


class Permutation(Transform):
    """A fixed permutation of axis 1 (features or channels): ``y[:, i] = x[:, perm[i]]``."""

    def __init__(self, perm: Sequence[int] | torch.Tensor):
        super().__init__()
        perm = torch.as_tensor(perm, dtype=torch.long)
        if perm.ndim != 1 or not torch.equal(perm.sort().values, torch.arange(len(perm))):
            raise ConfigError(f"not a permutation of 0..{len(perm) - 1}: {perm.tolist()}")
        self.register_buffer("perm", perm)
        self.register_buffer("inv", torch.argsort(perm))

    @classmethod
    def reverse(cls, size: int) -> Permutation:
        return cls(torch.arange(size - 1, -1, -1))

    @classmethod
    def random(cls, size: int, seed: int = 0) -> Permutation:
        return cls(torch.randperm(size, generator=torch.Generator().manual_seed(seed)))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Pair:
        return x[:, self.perm], x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> Pair:
        return y[:, self.inv], y.new_zeros(y.shape[0])


class ActNorm(Transform):
    """Glow's activation normalization: ``y = (x + bias) * exp(log_scale)`` per channel.

    Data-dependent initialization: the first forward call in training mode sets bias and
    scale so that that batch leaves with zero mean and unit variance per channel. The
    ``initialized`` flag is a buffer, so a saved model is never re-initialized on load.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        axes = [0, *range(2, x.ndim)]
        mean = x.mean(dim=axes)
        std = x.std(dim=axes) if x.shape[0] * _pixels(x) > 1 else torch.ones_like(mean)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std.clamp_min(1e-6)))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Pair:
        if self.training and not bool(self.initialized):
            self.initialize(x)
        y = (x + _per_channel(self.bias, x)) * torch.exp(_per_channel(self.log_scale, x))
        return y, (self.log_scale.sum() * _pixels(x)).expand(x.shape[0])

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> Pair:
        x = y * torch.exp(-_per_channel(self.log_scale, y)) - _per_channel(self.bias, y)
        return x, (-self.log_scale.sum() * _pixels(y)).expand(y.shape[0])


class BatchNorm(Transform):
    """Batch normalization as a bijection (RealNVP, MAF): ``y = (x - m) / sqrt(v + eps) *
    exp(log_gamma) + beta``.

    In training mode ``m, v`` are the batch's statistics (and the running averages are
    updated); in eval mode they are the running averages, so the map is a fixed bijection.
    ``inverse`` always uses the running averages (there is no batch of x to take them from).
    """

    def __init__(self, channels: int, momentum: float = 0.05, eps: float = 1e-5):
        super().__init__()
        if not 0 < momentum <= 1:
            raise ConfigError(f"momentum must be in (0, 1], got {momentum}")
        self.momentum, self.eps = momentum, eps
        self.log_gamma = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Pair:
        if self.training:
            axes = [0, *range(2, x.ndim)]
            mean, var = x.mean(dim=axes), x.var(dim=axes, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean), self.momentum)
                self.running_var.lerp_(var.detach().to(self.running_var), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        inv_std = torch.rsqrt(var + self.eps)
        y = (x - _per_channel(mean, x)) * _per_channel(inv_std * torch.exp(self.log_gamma), x)
        y = y + _per_channel(self.beta, x)
        ladj = (self.log_gamma + torch.log(inv_std)).sum() * _pixels(x)
        return y, ladj.expand(x.shape[0])

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> Pair:
        mean, var = self.running_mean, self.running_var
        std = torch.sqrt(var + self.eps)
        x = (y - _per_channel(self.beta, y)) * _per_channel(std * torch.exp(-self.log_gamma), y)
        x = x + _per_channel(mean, y)
        ladj = -(self.log_gamma - torch.log(std)).sum() * _pixels(y)
        return x, ladj.expand(y.shape[0])


class InvertibleLinearLU(Transform):
    """Glow's invertible 1x1 convolution in LU form (also a learned linear map of vectors):
    ``y[:, i] = sum_j W[i, j] x[:, j]`` with ``W = P L (U + diag(sign * exp(log_s)))``.

    ``P`` is a fixed permutation, ``L`` unit lower triangular, ``U`` strictly upper
    triangular; log|det W| = sum(log_s), times H*W for images. Initialized from a random
    rotation (fixed seed), as in Glow.
    """

    def __init__(self, channels: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=gen, dtype=torch.float64))
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("p", p.float())
        self.register_buffer("sign", torch.sign(s).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(lower.float() * self.lower_mask)
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(torch.log(s.abs()).float())

    def weight(self) -> torch.Tensor:
        eye = torch.eye(self.log_s.numel(), dtype=self.log_s.dtype, device=self.log_s.device)
        lower = self.lower * self.lower_mask + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign * torch.exp(self.log_s))
        return self.p @ lower @ upper

    def _mix(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ij,bj...->bi...", weight, x)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Pair:
        return self._mix(x, self.weight()), (self.log_s.sum() * _pixels(x)).expand(x.shape[0])

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> Pair:
        weight_inv = torch.linalg.inv(self.weight())
        return self._mix(y, weight_inv), (-self.log_s.sum() * _pixels(y)).expand(y.shape[0])


@register_example("permutation-random", event_shape=(5,))
def _permutation_example() -> Transform:
    return Permutation.random(5, seed=1)


@register_example("permutation-channels", event_shape=(3, 2, 2))
def _channel_permutation_example() -> Transform:
    return Permutation.reverse(3)


@register_example("actnorm", event_shape=(3,))
def _actnorm_example() -> Transform:
    layer = ActNorm(3)
    layer(2.0 + 3.0 * torch.randn(64, 3))  # data-dependent initialization, then trained
    return randomize_(layer, std=0.2)


@register_example("actnorm-image", event_shape=(2, 3, 3))
def _actnorm_image_example() -> Transform:
    layer = ActNorm(2)
    layer(torch.randn(8, 2, 3, 3) * 2.0 - 1.0)
    return randomize_(layer, std=0.2)


@register_example("batchnorm", event_shape=(3,), train_eval_differ=True)
def _batchnorm_example() -> Transform:
    layer = randomize_(BatchNorm(3), std=0.3)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        layer.running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
    return layer


@register_example("lu-linear", event_shape=(4,))
def _lu_example() -> Transform:
    return randomize_(InvertibleLinearLU(4, seed=2), std=0.2)


@register_example("glow-1x1-conv", event_shape=(3, 2, 2))
def _conv_example() -> Transform:
    return randomize_(InvertibleLinearLU(3, seed=3), std=0.2)
