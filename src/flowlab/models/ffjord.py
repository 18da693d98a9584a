"""FFJORD (Grathwohl, Chen et al. 2019): a stack of CNF blocks on a standard Gaussian base."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from flowlab.cnf import CNF, ConvVectorField, FourierVectorField, MLPVectorField
from flowlab.errors import ConfigError
from flowlab.models.base import register_model
from flowlab.models.cnf_density import BlockPass, CNFDensity
from flowlab.nets import UNetVectorField
from flowlab.ode import SolverConfig


@register_model("ffjord")
class FFJORD(CNFDensity):
    """Continuous normalizing flow density ``log p(x) = log N(z(T)) + int_0^T tr(df/dz) dt``.

    Data -> noise is the forward direction (blocks in order, each from t=0 to its T); sampling
    runs the blocks in reverse order, each from its T back to 0.

    Args:
        dim: dimension of the data (vectors; or give ``image_shape``).
        hidden: hidden widths of each block's vector field (channels for ``conv``; for
            ``unet`` the first is the base channel count and the others set the channels of
            the lower resolutions, e.g. ``(32, 64)``).
        layer: time conditioning (``concat``, ``concatsquash``, ``ignore``).
        activation: ``tanh``, ``softplus``, ``swish``, ``elu``.
        image_shape: ``(C, H, W)`` for images.
        field: on vectors ``mlp`` or ``fourier`` (an MLP on Fourier features of the state and
            time, :class:`~flowlab.cnf.nets.FourierVectorField`: ``layer`` is then unused); on
            images ``conv`` (FFJORD's concatsquash convolutions) or ``unet`` (a time-embedded
            U-Net, for flow matching).
        fourier_features, fourier_scale: the ``fourier`` field's number and scale of random
            frequencies.
        num_blocks: number of stacked CNF blocks.
        T: initial integration time of each block; ``train_T`` learns it.
        divergence: used in training: ``exact`` or ``hutchinson``.
        probe: Hutchinson probe distribution, ``rademacher`` or ``gaussian``.
        solver: training solver (dict of :class:`SolverConfig` fields).
        eval_solver: solver used in eval mode (``model.eval()``) and by ``flowlab eval``.
        eval_divergence: divergence in eval mode (``exact`` by default: no estimator noise).
        kinetic, jacobian: RNODE regularizer weights (0 disables them).
    """

    def __init__(
        self,
        dim: int | None = None,
        hidden: Sequence[int] = (64, 64, 64),
        layer: str = "concatsquash",
        activation: str = "tanh",
        num_blocks: int = 1,
        T: float = 0.5,
        train_T: bool = True,
        divergence: str = "exact",
        probe: str = "rademacher",
        solver: dict | SolverConfig | None = None,
        eval_solver: dict | SolverConfig | None = None,
        eval_divergence: str = "exact",
        kinetic: float = 0.0,
        jacobian: float = 0.0,
        image_shape: Sequence[int] | None = None,
        field: str = "mlp",
        fourier_features: int = 64,
        fourier_scale: float = 3.0,
    ):
        if (dim is None) == (image_shape is None):
            raise ConfigError("give dim (vectors) or image_shape (C, H, W), not both or neither")
        shape = (int(dim),) if image_shape is None else tuple(int(s) for s in image_shape)
        if field not in FIELDS or (field in VECTOR_FIELDS) != (len(shape) == 1):
            raise ConfigError(f"field {field!r} does not fit shape {shape}: use mlp or fourier "
                              "for vectors, conv or unet for (C, H, W) images")
        if num_blocks < 1:
            raise ConfigError(f"num_blocks must be at least 1, got {num_blocks}")
        super().__init__(
            shape, divergence=divergence, eval_divergence=eval_divergence, probe=probe,
            solver=solver, eval_solver=eval_solver,
            default_eval_solver=SolverConfig(atol=1e-6, rtol=1e-6),
            kinetic=kinetic, jacobian=jacobian,
        )
        self.options.update({
            "dim": dim, "hidden": [int(h) for h in hidden], "layer": layer,
            "activation": activation, "num_blocks": num_blocks, "T": T, "train_T": train_T,
        })
        # (stored only when used: older configs stay equal)
        if image_shape is not None:
            self.options.update(image_shape=list(shape), field=field)
        fourier = {}
        if field == "fourier":
            fourier = {"features": int(fourier_features), "scale": float(fourier_scale)}
            self.options.update(field=field, fourier_features=fourier["features"],
                                fourier_scale=fourier["scale"])
        self.blocks = nn.ModuleList(
            CNF(_make_field(field, shape, hidden, layer, activation, **fourier), T, train_T,
                divergence)
            for _ in range(num_blocks)
        )

    def _through_blocks(self, run: BlockPass, x: torch.Tensor, reverse: bool) -> torch.Tensor:
        for block in reversed(self.blocks) if reverse else self.blocks:
            x = run.solve(block, x, reverse)
        return x

    def trajectory(
        self,
        x: torch.Tensor,
        steps_per_block: int = 20,
        *,
        fractions: Sequence[float] | torch.Tensor | None = None,
        to_data: bool = True,
        solver: SolverConfig | None = None,
    ) -> torch.Tensor:
        """Positions along the flow: ``(frames, batch, dim)``, frame 0 being ``x``.

        ``to_data=True`` starts from noise ``x`` and ends at data; False goes the other way.
        Each block is visited at the times ``fractions * T`` (increasing values from 0 to 1,
        read in the direction of travel: 0 is where the block is entered), by default
        ``steps_per_block`` equal steps.
        """
        solver = solver or self.eval_solver
        if fractions is None:
            grid = torch.linspace(0.0, 1.0, steps_per_block + 1)
        else:
            grid = torch.as_tensor(fractions, dtype=torch.float64).float()
            if grid.ndim != 1 or len(grid) < 2 or grid[0] != 0 or grid[-1] != 1 or \
                    not bool((grid[1:] > grid[:-1]).all()):
                raise ConfigError(
                    "fractions must increase strictly from 0 to 1, e.g. [0, 0.25, 0.5, 1]"
                )
        frames = [x.unsqueeze(0)]
        z = x
        blocks = reversed(self.blocks) if to_data else self.blocks
        for block in blocks:
            # Noise -> data runs each block from its T back to 0.
            times = 1.0 - grid if to_data else grid
            traj, _ = block.trajectory(z, times, solver=solver)
            frames.append(traj[1:])
            z = traj[-1]
        return torch.cat(frames, dim=0)


VECTOR_FIELDS = ("mlp", "fourier")
FIELDS = (*VECTOR_FIELDS, "conv", "unet")


def _make_field(field: str, shape: tuple[int, ...], hidden: Sequence[int], layer: str,
                activation: str, **fourier) -> nn.Module:
    if field == "mlp":
        return MLPVectorField(shape[0], hidden, layer, activation)
    if field == "fourier":
        return FourierVectorField(shape[0], hidden, activation, **fourier)
    if field == "conv":
        return ConvVectorField(shape, tuple(hidden), layer, activation)
    hidden = [int(h) for h in hidden]
    if not hidden or any(h < 1 or h % hidden[0] for h in hidden):
        raise ConfigError(f"unet widths must be multiples of the first, e.g. 32,64; got {hidden}")
    return UNetVectorField(shape, channels=hidden[0],
                           channel_mult=tuple(h // hidden[0] for h in hidden))
