import itertools
import math

import pytest
import torch

from flowlab.data import get_dataset
from flowlab.errors import ConfigError, DataError
from flowlab.eval import REFERENCE_SEED, TEST_SEED, mmd2, sample_quality, sampling_sweep
from flowlab.models import build_model
from flowlab.ode import SolverConfig


def draw(name: str, n: int, seed: int) -> torch.Tensor:
    return get_dataset(name).sample(n, generator=torch.Generator().manual_seed(seed),
                                    dtype=torch.float64)


def test_mmd2_near_zero_for_one_law_and_large_for_a_shifted_or_scaled_one():
    x, y = draw("8gaussians", 1000, 1), draw("8gaussians", 1000, 2)
    same, same_se = mmd2(x, y)
    assert abs(same) < 3 * same_se
    for other in (y + 0.5, 1.2 * y):
        value, se = mmd2(x, other)
        assert value > 5 * se, (value, se)


def test_mmd2_standard_error_against_the_spread_of_repeated_estimates():
    """The block s.e. is close to (and above) the true spread when the laws differ, and
    conservative, never too small, when they are equal."""
    for shift, low, high in ((1.0, 0.8, 2.0), (0.0, 1.5, 8.0)):
        values, ses = [], []
        for rep in range(20):
            value, se = mmd2(draw("8gaussians", 400, 2 * rep + 10),
                             draw("8gaussians", 400, 2 * rep + 11) + shift)
            values.append(value)
            ses.append(se)
        ratio = float(torch.tensor(ses).median()) / float(torch.tensor(values).std())
        assert low < ratio < high, (shift, ratio)


def test_mmd2_by_hand_and_symmetric():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    value, se = mmd2(x, y, bandwidths=(1.0,), blocks=1)
    # k(a, b) = exp(-|a - b|^2 / 2): within x and within y the pair is at distance 1; across,
    # the distances^2 are 0, 1, 1, 2.
    e = math.exp(-0.5)
    assert value == pytest.approx(2 * e - (1 + 2 * e + e**2) / 2, abs=1e-15)
    assert value < 0 and math.isnan(se)  # unbiased, so it can be negative
    # two bandwidths: the kernel is the sum of the two Gaussians
    value2, _ = mmd2(x, y, bandwidths=(1.0, 2.0), blocks=1)
    e2 = math.exp(-0.125)
    assert value2 == pytest.approx(value + 2 * e2 - (1 + 2 * e2 + e2**2) / 2, abs=1e-15)
    # blocks: the s.e. is the spread of the two blocks' estimates (std / sqrt(2) = |a - b| / 2)
    xx = torch.cat([x, x + 10.0])
    yy = torch.cat([y, 2 * y + 10.0])
    _, se2 = mmd2(xx, yy, bandwidths=(1.0,), blocks=2)
    first = mmd2(x, y, bandwidths=(1.0,), blocks=1)[0]
    second = mmd2(x + 10.0, 2 * y + 10.0, bandwidths=(1.0,), blocks=1)[0]
    assert se2 == pytest.approx(abs(first - second) / 2, rel=1e-12)
    a, b = draw("moons", 60, 3), draw("moons", 45, 4) * 1.1
    assert mmd2(a, b) == pytest.approx(mmd2(b, a), rel=1e-12)
    # computed in float64 whatever the input dtype
    assert mmd2(a.float(), b.float()) == mmd2(a.float().double(), b.float().double())


def test_mmd2_is_exactly_unbiased_by_enumeration():
    """Two points per sample from laws on three atoms: averaging over every draw gives the
    expectation, which must be exactly MMD^2 = sum_ab (p_a - q_a)(p_b - q_b) k(a, b)."""
    atoms = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    gram = torch.exp(-torch.cdist(atoms, atoms).pow(2) / 2)
    for p, q in (([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]), ([0.2, 0.3, 0.5], [0.6, 0.3, 0.1])):
        p, q = torch.tensor(p, dtype=torch.float64), torch.tensor(q, dtype=torch.float64)
        expected = float((p - q) @ gram @ (p - q))
        mean = 0.0
        for i, j, k, l in itertools.product(range(3), repeat=4):
            weight = float(p[i] * p[j] * q[k] * q[l])
            mean += weight * mmd2(atoms[[i, j]], atoms[[k, l]], bandwidths=(1.0,), blocks=1)[0]
        assert mean == pytest.approx(expected, abs=1e-12)
    assert expected > 0.01  # the second pair of laws differs: a biased estimator would fail


@pytest.mark.parametrize(
    "x, y, kwargs, error",
    [
        (torch.zeros(40, 2), torch.zeros(40, 3), {}, DataError),  # points of two dimensions
        (torch.zeros(19, 2), torch.zeros(40, 2), {}, ConfigError),
        (torch.zeros(40, 2), torch.zeros(7, 2), {"blocks": 4}, ConfigError),
        (torch.zeros(40), torch.zeros(40), {}, ConfigError),
        (torch.zeros(40, 2), torch.zeros(40, 2), {"blocks": 0}, ConfigError),
        (torch.zeros(40, 2), torch.zeros(40, 2), {"bandwidths": (1.0, -1.0)}, ConfigError),
        (torch.zeros(40, 2), torch.full((40, 2), float("nan")), {}, DataError),
    ],
)
def test_mmd2_rejects_bad_input(x, y, kwargs, error):
    with pytest.raises(error):
        mmd2(x, y, **kwargs)


@pytest.mark.parametrize("name", ["8gaussians", "moons"])
def test_cross_entropy_of_true_samples_is_the_entropy(name):
    data = get_dataset(name)
    quality = sample_quality(draw(name, 2000, 1), data)
    assert quality.n == 2000 and quality.outside_fraction == 0.0
    assert quality.entropy == data.entropy
    assert abs(quality.cross_entropy - data.entropy) < 3 * quality.cross_entropy_se
    assert abs(quality.mmd2) < 3 * quality.mmd2_se


def test_mode_collapse_lowers_cross_entropy_below_entropy_but_not_mmd():
    """Samples shrunk towards the eight centres score below H; the MMD exposes them."""
    data = get_dataset("8gaussians")
    x = draw("8gaussians", 2000, 6)
    centres = x / x.norm(dim=1, keepdim=True) * 2.0 * math.sqrt(2.0)
    collapsed = sample_quality(centres + 0.3 * (x - centres), data)
    assert collapsed.cross_entropy < data.entropy - 10 * collapsed.cross_entropy_se
    assert collapsed.mmd2 > 5 * collapsed.mmd2_se
    spread = sample_quality(1.3 * x, data)
    assert spread.cross_entropy > data.entropy + 10 * spread.cross_entropy_se


def test_outside_fraction_on_checkerboard():
    data = get_dataset("checkerboard")
    inside = sample_quality(draw("checkerboard", 500, 7), data)
    assert inside.outside_fraction == 0.0
    assert inside.cross_entropy == pytest.approx(math.log(32.0)) and inside.cross_entropy_se < 1e-12
    far = sample_quality(torch.rand(100, 2, dtype=torch.float64) * 10 + 10, data)
    assert far.outside_fraction == 1.0 and math.isnan(far.cross_entropy)
    assert far.mmd2 > 5 * far.mmd2_se
    # (1, 1) lies in cell (0, 0) of the board, (3, 1) in the empty cell (1, 0)
    half = torch.tensor([[1.0, 1.0]] * 20 + [[3.0, 1.0]] * 20) + 0.01 * torch.rand(40, 2)
    mixed = sample_quality(half, data)
    assert mixed.outside_fraction == 0.5
    assert mixed.cross_entropy == pytest.approx(math.log(32.0))


def test_sample_quality_reference_points():
    data = get_dataset("moons")
    x = draw("moons", 200, 8).float()
    first, again = sample_quality(x, data), sample_quality(x, data)
    assert first == again  # the fresh points are drawn with a fixed seed
    assert REFERENCE_SEED != TEST_SEED
    reference = draw("moons", 300, REFERENCE_SEED)
    assert sample_quality(x, data, n_reference=300) == sample_quality(x, data,
                                                                      reference=reference)
    assert sample_quality(x, data, seed=9).mmd2 != first.mmd2
    assert set(first.to_dict()) == {"n", "cross_entropy", "cross_entropy_se", "outside_fraction",
                                    "mmd2", "mmd2_se", "entropy"}
    with pytest.raises(ConfigError):
        sample_quality(x, data, reference=reference, n_reference=300)
    with pytest.raises(ConfigError):
        sample_quality(x[:, :1], data)
    with pytest.raises(DataError):
        sample_quality(torch.cat([x, torch.full((1, 2), float("inf"))]), data)


def test_sampling_sweep_counts_nfe_and_keeps_the_noise_fixed():
    torch.manual_seed(0)
    model = build_model("cfm", dim=2, hidden=[16, 16])
    model.train()
    rows = sampling_sweep(model, get_dataset("moons"), steps=(1, 2, 16), n=200)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    stages = {"euler": 1, "midpoint": 2, "rk4": 4}  # torchdiffeq: evaluations per step
    fixed = [row for row in rows if row["steps"] is not None]
    assert [(row["solver"], row["steps"]) for row in fixed] == [
        (s, k) for s in stages for k in (1, 2, 16)]
    for row in fixed:
        assert row["nfe"] == row["steps"] * stages[row["solver"]]
        assert row["error"] is None and row["n"] == 200 and row["seconds"] > 0
    adaptive = rows[-1]
    assert len(rows) == 10 and adaptive["solver"] == "dopri5" and adaptive["steps"] is None
    assert adaptive["nfe"] > 0 and adaptive["error"] is None
    # the same noise in every row: 16 rk4 steps and dopri5 (atol 1e-5) land on the same points
    rk4 = fixed[-1]
    assert rk4["cross_entropy"] == pytest.approx(adaptive["cross_entropy"], abs=1e-3)
    assert rk4["mmd2"] == pytest.approx(adaptive["mmd2"], abs=1e-4)
    assert fixed[0]["mmd2"] != pytest.approx(adaptive["mmd2"], abs=1e-4)
    # several blocks: the NFE is summed over their solves
    model = build_model("ffjord", dim=2, hidden=[8], num_blocks=2).eval()
    rows = sampling_sweep(model, get_dataset("moons"), steps=(3,), solvers=("rk4",),
                          adaptive=None, n=40)
    assert len(rows) == 1 and rows[0]["nfe"] == 2 * 3 * 4 and not model.training
    z = torch.randn(5, 2)
    x, stats = model.to_data_with_stats(z, solver=SolverConfig(solver="euler", steps=2))
    assert torch.equal(x, model.to_data(z, solver=SolverConfig(solver="euler", steps=2)))
    assert [s.nfe_forward for s in stats] == [2, 2]


def test_sampling_sweep_reports_non_finite_sampling():
    model = build_model("cfm", dim=2, hidden=[8])
    with torch.no_grad():
        model.blocks[0].field.layers[-1].linear.bias.fill_(float("inf"))
    rows = sampling_sweep(model, get_dataset("moons"), steps=(2,), n=40)
    assert len(rows) == 4
    for row in rows:
        assert row["error"] and row["cross_entropy"] is None and row["mmd2"] is None


@pytest.mark.parametrize(
    "kwargs",
    [{"solvers": ("dopri5",)}, {"adaptive": SolverConfig(solver="euler", steps=2)},
     {"n": 10}, {"steps": (0,)}],
)
def test_sampling_sweep_rejects_bad_input(kwargs):
    model = build_model("cfm", dim=2, hidden=[8])
    with pytest.raises(ConfigError):
        sampling_sweep(model, get_dataset("moons"), **{"n": 40, **kwargs})
