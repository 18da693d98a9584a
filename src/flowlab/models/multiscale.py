"""FFJORD's multiscale CNF for images (Grathwohl, Chen et al. 2019), after the multiscale
architecture of RealNVP (Dinh et al. 2017).

Data -> noise is the forward direction. For images ``(C, H, W)`` and ``scales`` scales, scale
``s`` starts on ``(C_s, H_s, W_s)`` (``(C, H, W)`` at ``s = 0``) and applies, in order:

1. ``blocks_per_scale`` CNF blocks on ``(C_s, H_s, W_s)``;
2. except at the last scale: a squeeze ``(C_s, H_s, W_s) -> (4 C_s, H_s / 2, W_s / 2)``
   (each 2x2 patch becomes 4 channels), ``blocks_per_scale`` more CNF blocks on the squeezed
   shape, and a factor-out: the last ``2 C_s`` channels leave the flow (they are noise from
   then on), the first ``2 C_s`` go on to scale ``s + 1`` as ``(2 C_s, H_s / 2, W_s / 2)``.

CNF blocks come both before and after each squeeze, as in FFJORD's own multiscale model
(``StackedCNFLayers`` with ``squeeze=True``: blocks, squeeze, blocks); the last scale has no
squeeze, so its blocks run once. That is ``blocks_per_scale * (2 * scales - 1)`` blocks in
all. H and W must be divisible by ``2 ** (scales - 1)``.

The noise ``z`` has the shape of the image, ``(C, H, W)``: the factored-out channels are put
back where they left by undoing the squeezes and factor-outs alone (the CNF blocks taken as
the identity). Squeeze and factor-out only move numbers (log|det J| = 0), so ``z`` is
standard normal under the base, every piece factored out included, and ``base_sample``,
``sample`` and the bits/dim bookkeeping of :class:`~flowlab.models.ffjord.FFJORD` carry over.

Divergences: the exact divergence of a field on ``(C, H, W)`` costs ``C * H * W``
vector-Jacobian products per evaluation (784 on MNIST), so both training and eval mode default
to Hutchinson's estimator, with one probe drawn per block solve (from the caller's generator
when given). Its log-density estimate is unbiased; average over probes (and images) for a
reported number, or ask for ``divergence="exact"`` on small images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from flowlab.cnf import CNF, ConvVectorField
from flowlab.errors import ConfigError
from flowlab.models.base import register_model
from flowlab.models.cnf_density import BlockPass, CNFDensity
from flowlab.ode import SolverConfig
from flowlab.transforms.reshape import Squeeze

# Steps of the data -> noise pass: a CNF block (with its index in ``blocks``), a squeeze, or a
# factor-out of the last half of the channels.
CNF_STEP, SQUEEZE, FACTOR = "cnf", "squeeze", "factor"


def _halvings(n: int) -> int:
    """How many times ``n`` can be halved exactly."""
    count = 0
    while n % 2 == 0:
        n, count = n // 2, count + 1
    return count


@register_model("ffjord-multiscale")
class MultiscaleFFJORD(CNFDensity):
    """Multiscale CNF density on images ``(C, H, W)`` (see the module docstring).

    ``log p(x) = log N(z) + sum over blocks of int_0^T tr(df/dz) dt``, with ``z = to_noise(x)``
    of shape ``(batch, C, H, W)``.

    Args:
        image_shape: ``(C, H, W)`` of one image.
        scales: number of scales (1: no squeeze, a plain stack of convolutional CNF blocks).
        blocks_per_scale: CNF blocks at each scale, before the squeeze and again after it.
        hidden: hidden channels of each block's :class:`~flowlab.cnf.ConvVectorField`.
        strides: one per convolution (``len(hidden) + 1``; 1, 2 or -2, as in
            :class:`~flowlab.cnf.ConvVectorField`), the same for every block; None: all 1.
        layer: time conditioning of the convolutions (``concatsquash``, ``concat``,
            ``ignore``).
        activation: ``softplus`` (FFJORD's choice for images), ``tanh``, ``swish``, ``elu``.
        T: initial integration time of each block; ``train_T`` learns it.
        divergence: used in training: ``hutchinson`` (default) or ``exact``.
        probe: Hutchinson probe distribution, ``rademacher`` or ``gaussian``.
        solver: training solver (dict of :class:`SolverConfig` fields).
        eval_solver: solver in eval mode and for ``flowlab eval`` (default dopri5 with
            atol = rtol = 1e-5, FFJORD's tolerance on images).
        eval_divergence: divergence in eval mode (``hutchinson`` by default, see above).
        kinetic, jacobian: RNODE regularizer weights (0 disables them).

    Attributes:
        scale_shapes: the shape each scale starts on.
        block_shapes: the shape each CNF block in ``blocks`` acts on.
        steps: the data -> noise pass as ``(kind, block index or None)`` pairs.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        scales: int = 2,
        blocks_per_scale: int = 2,
        hidden: Sequence[int] = (64, 64, 64),
        strides: Sequence[int] | None = None,
        layer: str = "concatsquash",
        activation: str = "softplus",
        T: float = 0.5,
        train_T: bool = True,
        divergence: str = "hutchinson",
        probe: str = "rademacher",
        solver: dict | SolverConfig | None = None,
        eval_solver: dict | SolverConfig | None = None,
        eval_divergence: str = "hutchinson",
        kinetic: float = 0.0,
        jacobian: float = 0.0,
    ):
        shape = tuple(int(s) for s in image_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ConfigError(f"ffjord-multiscale models images: image_shape must be positive "
                              f"(C, H, W), got {tuple(image_shape)}")
        if int(scales) != scales or scales < 1:
            raise ConfigError(f"scales must be a whole number >= 1, got {scales}")
        if int(blocks_per_scale) != blocks_per_scale or blocks_per_scale < 1:
            raise ConfigError(f"blocks_per_scale must be a whole number >= 1, got "
                              f"{blocks_per_scale}")
        scales, blocks_per_scale = int(scales), int(blocks_per_scale)
        _, height, width = shape
        squeezes = scales - 1
        if height % 2**squeezes or width % 2**squeezes:
            most = 1 + min(_halvings(height), _halvings(width))
            raise ConfigError(
                f"{scales} scales squeeze the image "
                f"{'once' if squeezes == 1 else f'{squeezes} times'}, so its height and width "
                f"must be divisible by {2**squeezes}; {height}x{width} is not: use at most "
                f"{most} scale{'s' if most > 1 else ''} for this image size (--scales {most}), "
                "or crop or pad the images"
            )
        super().__init__(
            shape, divergence=divergence, eval_divergence=eval_divergence, probe=probe,
            solver=solver, eval_solver=eval_solver,
            default_eval_solver=SolverConfig(atol=1e-5, rtol=1e-5),
            kinetic=kinetic, jacobian=jacobian,
        )
        hidden = [int(h) for h in hidden]
        self.options.update({
            "image_shape": list(shape), "scales": scales, "blocks_per_scale": blocks_per_scale,
            "hidden": hidden, "strides": None if strides is None else [int(s) for s in strides],
            "layer": layer, "activation": activation, "T": T, "train_T": train_T,
        })

        def block(scale: int, on: tuple[int, int, int]) -> CNF:
            try:
                field = ConvVectorField(on, hidden, layer, activation, strides)
            except ConfigError as err:
                raise ConfigError(f"scale {scale} (blocks on {on[0]}x{on[1]}x{on[2]}): "
                                  f"{err}") from err
            return CNF(field, T, train_T, divergence)

        blocks: list[CNF] = []
        steps: list[tuple[str, int | None]] = []
        block_shapes: list[tuple[int, int, int]] = []
        scale_shapes: list[tuple[int, int, int]] = []
        current = shape
        for scale in range(scales):
            scale_shapes.append(current)
            stages = [current]
            if scale < scales - 1:
                c, h, w = current
                stages.append((4 * c, h // 2, w // 2))
            for stage, on in enumerate(stages):
                if stage == 1:
                    steps.append((SQUEEZE, None))
                for _ in range(blocks_per_scale):
                    steps.append((CNF_STEP, len(blocks)))
                    blocks.append(block(scale, on))
                    block_shapes.append(on)
            if scale < scales - 1:
                steps.append((FACTOR, None))
                c, h, w = stages[1]
                current = (c // 2, h, w)
        self.blocks = nn.ModuleList(blocks)
        self.steps = tuple(steps)
        self.block_shapes = tuple(block_shapes)
        self.scale_shapes = tuple(scale_shapes)
        self.squeeze = Squeeze()

    # -- the maps -----------------------------------------------------------------------------
    def _walk(
        self,
        h: torch.Tensor,
        factored: list[torch.Tensor],
        reverse: bool,
        solve: Callable[[CNF, torch.Tensor, bool], torch.Tensor] | None = None,
        steps: Sequence[tuple[str, int | None]] | None = None,
    ) -> torch.Tensor:
        """``h`` through ``steps`` (default: all): in order (towards noise), or undoing them in
        reverse order.

        In order, factored-out channels are appended to ``factored``; in reverse they are
        taken back from its end. ``solve(block, h, reverse)`` applies a CNF step; without it
        the blocks are skipped, which leaves only the shape changes (the map between the noise
        in image layout and its per-scale parts).
        """
        steps = self.steps if steps is None else steps
        for kind, index in reversed(steps) if reverse else steps:
            if kind == CNF_STEP:
                if solve is not None:
                    h = solve(self.blocks[index], h, reverse)
            elif kind == SQUEEZE:
                h = self.squeeze.inverse(h)[0] if reverse else self.squeeze(h)[0]
            elif reverse:
                h = torch.cat([h, factored.pop()], dim=1)
            else:
                half = h.shape[1] // 2  # FFJORD keeps the first half and factors out the rest
                h, out = h[:, :half], h[:, half:]
                factored.append(out)
        return h

    def _through_blocks(self, run: BlockPass, x: torch.Tensor, reverse: bool) -> torch.Tensor:
        factored: list[torch.Tensor] = []
        if reverse:  # noise (image layout) -> its parts -> data
            parts = self._walk(self.check_input(x), factored, reverse=False)
            return self._walk(parts, factored, reverse=True, solve=run.solve)
        # data -> the last scale's output and the factored-out parts -> noise in image layout
        last = self._walk(x, factored, reverse=False, solve=run.solve)
        return self._walk(last, factored, reverse=True)

    # -- pictures -----------------------------------------------------------------------------
    def _image_view(self, h: torch.Tensor, position: int,
                    factored: list[torch.Tensor]) -> torch.Tensor:
        """The state ``h`` met after ``steps[:position]``, seen as an image ``(batch, C, H, W)``:
        those shape changes undone, with the channels factored out so far put back."""
        return self._walk(h, list(factored), reverse=True, steps=self.steps[:position])

    def flow_frames(
        self,
        x: torch.Tensor,
        steps_per_block: int,
        *,
        to_data: bool,
        solver: SolverConfig | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, float, float]]]:
        """States along the flow in image layout, for pictures (no gradients, no divergence).

        ``to_data=False`` carries data ``x`` to noise, ``to_data=True`` noise ``x`` to data
        (both ``(batch, C, H, W)``); each block is visited at ``steps_per_block`` equal time
        steps. Returns ``(states, velocities, times)``: states and velocities
        ``(1 + steps_per_block * len(blocks), batch, C, H, W)``, frame 0 being ``x``, every
        state seen as an image (see :meth:`_image_view`: the noise frame is ``to_noise``'s
        ``z``), velocities ``dz/ds`` along the direction of travel (``+f`` to noise, ``-f`` to
        data; zero on the channels already factored out); ``times`` has ``(block index, t, T
        of that block)`` per frame (block indices in ``blocks``, data -> noise order).
        """
        if steps_per_block < 1:
            raise ConfigError(f"steps_per_block must be >= 1, got {steps_per_block}")
        solver = solver or self.eval_solver
        grid = torch.linspace(0.0, 1.0, steps_per_block + 1)
        fractions = 1.0 - grid if to_data else grid
        sign = -1.0 if to_data else 1.0
        factored: list[torch.Tensor] = []
        states, velocities, times = [], [], []

        def record(h: torch.Tensor, position: int, block: CNF, index: int, t: float) -> None:
            v = sign * block.field(torch.tensor(t, dtype=h.dtype, device=h.device), h)
            states.append(self._image_view(h, position, factored))
            velocities.append(self._image_view(v, position, [f.new_zeros(f.shape)
                                                             for f in factored]))
            times.append((index, t, float(block.T.detach())))

        with torch.no_grad():
            x = self.check_input(x)
            if to_data:  # (the first step undone is always a block of the last scale)
                h = self._walk(x, factored, reverse=False)
                last = len(self.blocks) - 1
                record(h, len(self.steps), self.blocks[last], last,
                       float(self.blocks[last].T.detach()))
            else:  # (the first step is always a block of the first scale)
                h = x
                record(h, 0, self.blocks[0], 0, 0.0)
            order = list(enumerate(self.steps))
            for position, (kind, index) in reversed(order) if to_data else order:
                if kind == CNF_STEP:
                    block = self.blocks[index]
                    T = float(block.T.detach())
                    traj, _ = block.trajectory(h, fractions, solver=solver)
                    for j in range(1, steps_per_block + 1):
                        record(traj[j], position, block, index, T * float(fractions[j]))
                    h = traj[-1]
                else:  # a shape change (or its undoing), through the same walk
                    h = self._walk(h, factored, reverse=to_data,
                                   steps=self.steps[position:position + 1])
        return torch.stack(states), torch.stack(velocities), times
