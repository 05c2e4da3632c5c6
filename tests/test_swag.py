"""SWAG statistics and sampler against hand-computed values and the expected covariance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.ple import MultiTaskNet, NetConfig
from model.swag import SWAG
from model.uncertainty import summarise_samples

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# Four snapshots of a 3-weight "network".
SNAPSHOTS = torch.tensor([
    [1.0, 2.0, -1.0],
    [3.0, 2.0, 0.0],
    [2.0, 5.0, 1.0],
    [6.0, 3.0, 0.0],
])


def _collected(max_rank: int = 3, diag_only: bool = False) -> SWAG:
    swag = SWAG(3, max_rank=max_rank, diag_only=diag_only)
    for w in SNAPSHOTS:
        swag.collect(w)
    return swag


def test_mean_second_moment_and_variance_match_hand_computation():
    swag = _collected()
    # column means: (1+3+2+6)/4 = 3, (2+2+5+3)/4 = 3, (-1+0+1+0)/4 = 0
    assert swag.mean.tolist() == pytest.approx([3.0, 3.0, 0.0])
    # second moments: (1+9+4+36)/4 = 12.5, (4+4+25+9)/4 = 10.5, (1+0+1+0)/4 = 0.5
    assert swag.sq_mean.tolist() == pytest.approx([12.5, 10.5, 0.5])
    # Sigma_diag = E[w^2] - mean^2 = 3.5, 1.5, 0.5
    assert swag.variance.tolist() == pytest.approx([3.5, 1.5, 0.5])
    assert swag.n_snapshots == 4


def test_deviation_matrix_keeps_last_k_deviations_from_the_running_mean():
    swag = _collected(max_rank=3)
    # running means after snapshots 2, 3, 4: (2, 2, -0.5), (2, 3, 0), (3, 3, 0)
    expected = torch.tensor([
        [3.0 - 2.0, 2.0 - 2.0, 0.0 + 0.5],
        [2.0 - 2.0, 5.0 - 3.0, 1.0 - 0.0],
        [6.0 - 3.0, 3.0 - 3.0, 0.0 - 0.0],
    ])
    assert swag.rank == 3
    assert torch.allclose(swag.deviations, expected)


def test_variance_is_clamped_at_zero():
    swag = SWAG(2, max_rank=2)
    w = torch.tensor([0.1, 1e8])
    for _ in range(3):
        swag.collect(w)  # identical snapshots: rounding may make E[w^2] - mean^2 < 0
    swag.sq_mean = swag.mean**2 - 1e-3  # force the negative case
    assert (swag.variance >= 0).all() and swag.variance.tolist() == [0.0, 0.0]


def test_scale_zero_returns_the_swa_mean():
    swag = _collected()
    samples = swag.sample(5, scale=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(samples, swag.mean.float().expand(5, -1))


@pytest.mark.parametrize("diag_only", [False, True])
def test_sampled_weights_have_the_expected_covariance(diag_only: bool):
    swag = _collected(max_rank=3, diag_only=diag_only)
    scale = 0.7
    n = 200_000
    w = swag.sample(n, scale=scale, generator=torch.Generator().manual_seed(0)).double()
    cov = torch.cov(w.T)
    sigma = torch.diag(swag.variance)
    if diag_only:
        expected = scale * sigma
    else:
        d = swag.deviations.double().T  # P x K
        k = swag.rank
        expected = scale * (sigma / 2 + d @ d.T / (2 * (k - 1)))
    # sample covariance of n Gaussian draws: std error ~ sqrt(2/n) * scale of the entries
    assert torch.allclose(cov, expected, atol=0.03 * expected.abs().max())
    assert torch.allclose(w.mean(0), swag.mean, atol=0.02)
    if not diag_only:  # the low-rank part adds covariance between weights
        assert float(expected[1, 2]) > 0.3 and abs(float(cov[1, 2] - expected[1, 2])) < 0.03


def test_low_rank_needs_two_deviations():
    swag = SWAG(3, max_rank=3)
    swag.collect(SNAPSHOTS[0])
    assert swag.rank == 1
    s = swag.sample(3, generator=torch.Generator().manual_seed(0))  # falls back to the diagonal
    assert torch.allclose(s, swag.mean.float().expand(3, -1))  # one snapshot: zero variance


def test_snapshot_of_wrong_size_is_refused():
    swag = SWAG(3)
    with pytest.raises(ValueError, match="expected 3"):
        swag.collect(torch.zeros(4))
    with pytest.raises(RuntimeError, match="no snapshots"):
        swag.sample()


def _small_net_with_swag(seed: int = 0) -> tuple[MultiTaskNet, SWAG, np.ndarray, np.ndarray]:
    torch.manual_seed(seed)
    cfg = NetConfig(n_num=3, cardinalities=(5, 4), arch="ple", expert="transformer", d_token=4,
                    expert_dim=8, mlp_hidden=8, n_latents=2, tower_hidden=4)
    net = MultiTaskNet(cfg).eval()
    swag = SWAG(sum(p.numel() for p in net.parameters()), max_rank=4)
    base = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(5):
        swag.collect(base + 0.05 * torch.randn(base.shape, generator=gen))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    idx = np.stack([rng.integers(0, 5, 64), rng.integers(0, 4, 64)], axis=1)
    return net, swag, x, idx


def test_vmap_and_loop_inference_agree_and_leave_the_model_unchanged():
    net, swag, x, idx = _small_net_with_swag()
    before = torch.nn.utils.parameters_to_vector(net.parameters()).clone()
    a = swag.sample_logits(net, x, idx, n_samples=6, seed=3, method="vmap", batch_size=16)
    b = swag.sample_logits(net, x, idx, n_samples=6, seed=3, method="loop", batch_size=16)
    assert a.shape == (6, 64, 4)
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.equal(before, torch.nn.utils.parameters_to_vector(net.parameters()))
    # different samples give different outputs; the same seed the same ones
    assert a.std(dim=0).mean() > 1e-4
    assert torch.equal(b, swag.sample_logits(net, x, idx, n_samples=6, seed=3, method="loop"))


def test_predict_measures_follow_their_definitions():
    net, swag, x, idx = _small_net_with_swag(1)
    swag.base_rate = np.array([0.5, 0.3, 0.04, 0.01])
    logits = swag.sample_logits(net, x, idx, n_samples=7, seed=2).numpy().astype(np.float64)
    pred = swag.predict(net, x, idx, n_samples=7, seed=2)
    probs = 1 / (1 + np.exp(-logits))
    np.testing.assert_allclose(pred.mean, probs.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(pred.var, probs.var(0), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(pred.logit_var, logits.var(0), rtol=1e-4, atol=1e-9)
    shift = np.log(swag.base_rate / (1 - swag.base_rate))
    np.testing.assert_allclose(pred.relative, (1 / (1 + np.exp(-(logits - shift)))).var(0), rtol=1e-4, atol=1e-9)
    assert pred.measure("prob_var") is pred.var
    with pytest.raises(KeyError, match="unknown uncertainty measure"):
        pred.measure("entropy")


def test_base_rate_relative_moves_the_peak_to_the_base_rate():
    # same logit spread at two centres: at 0.5 and at the base rate 1%
    spread = np.array([-0.3, 0.0, 0.3])[:, None, None]
    centres = np.array([0.0, math.log(0.01 / 0.99)])[None, :, None]
    pred = summarise_samples(spread + centres, base_rate=np.array([0.01]))
    assert pred.var[0, 0] > pred.var[1, 0]  # prob_var: the q = 0.5 request looks more uncertain
    assert pred.relative[1, 0] > pred.relative[0, 0]  # relative: the base-rate request does
    np.testing.assert_allclose(pred.logit_var[:, 0], [0.06, 0.06], rtol=1e-5)


def test_state_round_trip():
    swag = _collected()
    swag.base_rate = np.array([0.5, 0.1])
    again = SWAG.from_state_dict(swag.state_dict())
    assert torch.equal(again.mean, swag.mean) and torch.equal(again.deviations, swag.deviations)
    assert again.base_rate.tolist() == [0.5, 0.1] and again.n_snapshots == 4
