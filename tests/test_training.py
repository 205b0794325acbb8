"""training.py: the helpers sft.py and grpo.py share (their schedules and parameter groups are
also tested through each script in test_sft.py / test_grpo.py)."""
import math

import pytest
import torch

from support import checkpoint
from support import training


def test_lr_at_warmup_then_cosine_to_min_lr():
    lrs = [training.lr_at(s, 1.0, 0.1, warmup=2, end=12) for s in range(14)]
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert lrs[7] == pytest.approx(0.55) and lrs[12] == pytest.approx(0.1) and lrs[13] == pytest.approx(0.1)
    assert training.lr_at(5, 2.0, 2.0, 0, 9) == 2.0                      # min_lr = lr: exactly constant


def test_set_lr_scales_each_group():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    opt = training.make_optimizer(net, 1.0, 0.0)
    opt.param_groups[0]["lr_scale"] = 0.25
    del opt.param_groups[1]["lr_scale"]                                 # a checkpoint written without it
    training.set_lr(opt, 2.0)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 2.0]


def test_clip_grad_norm_clips_reports_and_refuses_non_finite():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 3.0)                                      # norm 6
    assert training.clip_grad_norm([p], 0.0, loss=1.0) == pytest.approx(6.0) and p.grad[0] == 3.0   # 0 = off
    assert training.clip_grad_norm([p], 1.5, loss=1.0) == pytest.approx(6.0)
    assert p.grad.norm() == pytest.approx(1.5, rel=1e-5)
    with pytest.raises(checkpoint.NonFiniteLoss, match="loss nan, grad norm"):
        training.clip_grad_norm([p], 1.0, loss=math.nan)
    p.grad[0] = math.inf
    with pytest.raises(checkpoint.NonFiniteLoss, match="grad norm (inf|nan)"):
        training.clip_grad_norm([p], 1.0, loss=1.0)
