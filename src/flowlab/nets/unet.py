"""A small U-Net vector field f(t, z) on images, for flow matching.

``(batch, C, H, W) -> (batch, C, H, W)``, with ``t`` in ``[0, 1]`` a scalar tensor or one time
per sample ``(batch,)`` (flow-matching training draws a time per sample). The layout follows
the U-Nets of the diffusion literature (Ho et al. 2020): a sinusoidal embedding of ``t`` and
an MLP; residual blocks ``GroupNorm -> SiLU -> conv``, plus the time embedding per channel,
``-> GroupNorm -> SiLU -> dropout -> conv`` with a residual connection; a downsampling path of
stride-2 convolutions, a bottleneck (optionally with self-attention) and an upsampling path
(nearest neighbour then a 3x3 convolution) that concatenates the features of the downsampling
path at the same resolution. The output convolution starts at zero, so the untrained field is
identically 0.

No layer mixes samples (group norm and attention act within each sample), so the Jacobian
of sample ``b``'s output involves sample ``b`` alone, as divergence computations require.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flowlab.errors import ConfigError, DataError


def _times(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``t`` as ``(1,)`` (one time for the batch) or ``(batch,)``, in ``z``'s dtype and device."""
    t = torch.as_tensor(t).to(z)
    if t.numel() == 1:
        return t.reshape(1)
    if t.shape != (z.shape[0],):
        raise ConfigError(
            f"time must be a scalar or one value per sample {(z.shape[0],)}, "
            f"got {tuple(t.shape)}"
        )
    return t


def sinusoidal_time_embedding(
    t: torch.Tensor, dim: int, max_frequency: float = 1000.0
) -> torch.Tensor:
    """``(n,) -> (n, dim)``: ``[cos(w_k t), sin(w_k t)]`` for ``dim // 2`` angular frequencies
    ``w_k`` spaced geometrically from 1 to ``max_frequency`` (one zero column pads an odd
    ``dim``). For ``t`` in ``[0, 1]`` the slowest pair varies over the whole interval and the
    fastest resolves time steps of about ``1 / max_frequency``."""
    if dim < 1:
        raise ConfigError(f"the time embedding needs dim >= 1, got {dim}")
    half = dim // 2
    log_freqs = torch.linspace(0.0, math.log(max_frequency), half, dtype=t.dtype,
                               device=t.device)
    angles = t.reshape(-1, 1) * torch.exp(log_freqs)
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    return F.pad(emb, (0, dim - 2 * half))


def norm_groups(channels: int, most: int = 8) -> int:
    """The largest group count ``<= most`` that divides ``channels`` (for ``nn.GroupNorm``)."""
    return max(g for g in range(1, min(most, channels) + 1) if channels % g == 0)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(norm_groups(channels), channels)


class ResBlock(nn.Module):
    """``(B, c_in, H, W), (B or 1, time_dim) -> (B, c_out, H, W)``, the embedding already
    passed through SiLU."""

    def __init__(self, c_in: int, c_out: int, time_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(time_dim, c_out)
        self.norm2 = _norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.conv1(F.silu(self.norm1(h)))
        x = x + self.time(emb)[:, :, None, None]
        x = self.conv2(self.dropout(F.silu(self.norm2(x))))
        return self.skip(h) + x


class SelfAttention2d(nn.Module):
    """Single-head self-attention over the ``H * W`` positions of each image, residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, c, height, width = h.shape
        q, k, v = self.qkv(self.norm(h)).flatten(2).chunk(3, dim=1)  # each (B, C, HW)
        weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), dim=-1)  # (B, HWq, HWk)
        attended = v @ weights.transpose(1, 2)  # (B, C, HWq)
        return h + self.out(attended.reshape(b, c, height, width))


class UNetVectorField(nn.Module):
    """A U-Net f(t, z) for flow matching on images.

    Args:
        shape: ``(C, H, W)`` of one image.
        channels: feature channels at full resolution.
        channel_mult: one multiplier per resolution, full resolution first; every level after
            the first halves the sides, so ``(1, 2)`` works at ``H`` and ``H / 2``.
        res_blocks: residual blocks per level on the way down (and on the way up).
        time_dim: width of the time embedding; ``None`` means ``4 * channels``.
        dropout: dropout probability inside the residual blocks, in ``[0, 1)``.
        attention: add a self-attention layer at the bottleneck (lowest resolution).

    Sides not divisible by ``2 ** (len(channel_mult) - 1)`` are padded with zeros at the bottom
    and right up to the next multiple inside :meth:`forward`, and the output is cropped back to
    ``(H, W)``; so 8x8, 28x28 and 32x32 images all work with any depth. Group norms use the
    largest group count up to 8 that divides the channels.
    """

    def __init__(
        self,
        shape: Sequence[int],
        channels: int = 32,
        channel_mult: Sequence[int] = (1, 2),
        res_blocks: int = 1,
        time_dim: int | None = None,
        dropout: float = 0.0,
        attention: bool = False,
    ):
        super().__init__()
        shape = tuple(int(s) for s in shape)
        mults = tuple(int(m) for m in channel_mult)
        time_dim = 4 * channels if time_dim is None else int(time_dim)
        if len(shape) != 3 or min(shape) < 1:
            raise ConfigError(f"shape must be positive (C, H, W), got {shape}")
        if channels < 1:
            raise ConfigError(f"channels must be positive, got {channels}")
        if not mults or min(mults) < 1:
            raise ConfigError(f"channel_mult must be a non-empty tuple of positive ints, got "
                              f"{tuple(channel_mult)}")
        if res_blocks < 1:
            raise ConfigError(f"res_blocks must be at least 1, got {res_blocks}")
        if time_dim < 1:
            raise ConfigError(f"time_dim must be positive, got {time_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        self.shape = shape
        self.channels = channels
        self.multiple = 2 ** (len(mults) - 1)

        self.time_mlp = nn.Sequential(
            nn.Linear(channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)
        )
        self.input = nn.Conv2d(shape[0], channels, 3, padding=1)
        widths = [channels * m for m in mults]

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        c = channels
        for i, w in enumerate(widths):
            blocks = []
            for _ in range(res_blocks):
                blocks.append(ResBlock(c, w, time_dim, dropout))
                c = w
            self.down.append(nn.ModuleList(blocks))
            if i < len(widths) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))

        self.mid1 = ResBlock(c, c, time_dim, dropout)
        self.attention = SelfAttention2d(c) if attention else nn.Identity()
        self.mid2 = ResBlock(c, c, time_dim, dropout)

        # Deepest level first; each level's first block takes the skip concatenated.
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(len(widths))):
            w = widths[i]
            blocks = [ResBlock(c + w, w, time_dim, dropout)]
            blocks += [ResBlock(w, w, time_dim, dropout) for _ in range(res_blocks - 1)]
            c = w
            self.up.append(nn.ModuleList(blocks))
            if i > 0:
                self.upsample.append(nn.Conv2d(c, c, 3, padding=1))

        self.out_norm = _norm(c)
        self.output = nn.Conv2d(c, shape[0], 3, padding=1)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or tuple(z.shape[1:]) != self.shape:
            raise DataError(
                f"expected images of shape (batch, {', '.join(map(str, self.shape))}), "
                f"got {tuple(z.shape)}"
            )
        emb = F.silu(self.time_mlp(sinusoidal_time_embedding(_times(t, z), self.channels)))

        height, width = z.shape[2:]
        pad_h, pad_w = -height % self.multiple, -width % self.multiple
        h = self.input(F.pad(z, (0, pad_w, 0, pad_h)) if pad_h or pad_w else z)

        skips = []
        for i, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)

        h = self.mid2(self.attention(self.mid1(h, emb)), emb)

        for i, blocks in enumerate(self.up):
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = block(h, emb)
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))

        out = self.output(F.silu(self.out_norm(h)))
        return out[:, :, :height, :width]
