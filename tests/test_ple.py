"""PLE / baseline networks: shapes, gates, task separation, and that they can learn."""

from __future__ import annotations

import pytest
import torch

from model.ple import BASELINES, CGC, MultiTaskNet, NetConfig

pytestmark = pytest.mark.usefixtures("torch_one_thread")

CARDS = (6, 4, 3)


def _inputs(n: int = 32, n_num: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(n, n_num, generator=g), (torch.rand(n, n_num, generator=g) < 0.2).float()], 1)
    idx = torch.stack([torch.randint(0, c, (n,), generator=g) for c in CARDS], 1)
    return x, idx


def _cfg(**kw) -> NetConfig:
    base = dict(n_num=5, cardinalities=CARDS, d_token=4, expert_dim=8, mlp_hidden=16, n_latents=3,
                tower_hidden=4, n_heads=2)
    return NetConfig(**{**base, **kw})


@pytest.mark.parametrize("name", list(BASELINES))
@pytest.mark.parametrize("n_latents", [0, 3])
def test_every_table1_model_outputs_one_logit_per_task(name: str, n_latents: int):
    net = MultiTaskNet(_cfg(n_latents=n_latents, **BASELINES[name]))
    x, idx = _inputs()
    out = net(x, idx)
    assert out.shape == (32, 4) and torch.isfinite(out).all()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())


def test_ple_has_three_shared_and_one_specific_expert_per_task_by_default():
    net = MultiTaskNet(_cfg(arch="ple", expert="mlp"))
    (level,) = net.levels
    assert isinstance(level, CGC)
    assert len(level.shared) == 3 and [len(s) for s in level.specific] == [1, 1, 1, 1]
    assert level.shared_gate is None  # single level: no shared output needed
    two = MultiTaskNet(_cfg(arch="ple", expert="transformer", n_levels=2))
    assert len(two.levels) == 2 and two.levels[0].shared_gate is not None
    assert two(*_inputs()).shape == (32, 4)


def test_task_specific_expert_only_feeds_its_own_task():
    net = MultiTaskNet(_cfg(arch="ple", expert="mlp"))
    x, idx = _inputs()
    out = net(x, idx)
    out[:, 0].sum().backward()  # click's loss
    click_expert, deal_expert = net.levels[0].specific[0][0], net.levels[0].specific[3][0]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in click_expert.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in deal_expert.parameters())


def test_unknown_category_index_is_a_valid_row_and_rows_do_not_interact():
    net = MultiTaskNet(_cfg(expert="transformer")).eval()
    x, idx = _inputs()
    idx[:, 0] = 1  # every request has an unseen city
    full = net(x, idx)
    half = net(x[:16], idx[:16])
    assert torch.allclose(full[:16], half, atol=1e-5)  # no batch statistics anywhere


@pytest.mark.parametrize("expert", ["mlp", "transformer"])
def test_network_learns_a_feature_driven_task(expert: str):
    torch.manual_seed(0)
    x, idx = _inputs(n=256, seed=1)
    y = torch.stack([(x[:, 0] > 0).float(), (idx[:, 0] >= 3).float(), (x[:, 1] > 1).float(),
                     ((x[:, 0] > 0) & (idx[:, 1] == 2)).float()], 1)
    net = MultiTaskNet(_cfg(expert=expert))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    first = loss_fn(net(x, idx), y).item()
    for _ in range(100):
        opt.zero_grad()
        loss = loss_fn(net(x, idx), y)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="arch"):
        _cfg(arch="mmoe")
    with pytest.raises(ValueError, match="divisible"):
        _cfg(d_token=5, n_heads=2)
