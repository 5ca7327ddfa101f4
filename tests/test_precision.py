"""Mixed precision keeps the autoregressive state in fp32 on both bf16 paths.

DDP + bf16 autocasts over fp32 weights; DeepSpeed bf16 holds bf16 weights and autocasts nothing
(here: the model cast with `.to(bfloat16)`, as the engine does). Keeping the state itself in
bf16, as the DeepSpeed path once did, loses ~3 digits per step: 13x DDP's rollout error over 64
steps was measured in a run; this test shows 24x for the old path and ~1x for the current one.
"""

from __future__ import annotations

import copy

import torch

from noa_dist.models.uafno import UAFNO
from noa_dist.rollout import rollout_states

STEPS = 64


def _model_and_inputs():
    torch.manual_seed(0)
    model = UAFNO(
        in_channels=1,
        cond_channels=1,
        base_channels=8,
        encoder_levels=2,
        afno_blocks=1,
        afno_num_blocks=4,
        modes=4,
    )
    with torch.no_grad():  # a trained-looking head: small increments, a stable 64-step rollout
        model.head.weight.normal_(0, 0.02)
        model.head.bias.zero_()
        model.delta_scale.fill_(0.05)
    return model, torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32)


def _rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref) ** 2).mean().sqrt().item()


def test_zero_bf16_rollout_error_over_64_steps_is_within_2x_of_ddp_bf16():
    model, u0, cond = _model_and_inputs()
    fp32 = rollout_states(lambda u: model(u, cond), u0, STEPS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ddp_bf16 = rollout_states(lambda u: model(u, cond), u0, STEPS)
    bf16_weights = copy.deepcopy(model).to(torch.bfloat16)
    zero_bf16 = rollout_states(lambda u: bf16_weights(u, cond), u0, STEPS)
    assert zero_bf16.dtype == torch.float32
    ddp_error, zero_error = _rmse(ddp_bf16, fp32), _rmse(zero_bf16, fp32)
    print(
        f"rollout RMSE vs fp32 over {STEPS} steps: DDP bf16 {ddp_error:.2e}, ZeRO bf16 {zero_error:.2e}"
    )
    assert 0 < zero_error < 2 * ddp_error

    def bf16_state(u):  # the old DeepSpeed path: inputs cast to bf16, residual add in bf16
        out = bf16_weights(u.to(torch.bfloat16), cond.to(torch.bfloat16))
        return out._replace(state=out.state.to(torch.bfloat16))

    assert _rmse(rollout_states(bf16_state, u0, STEPS), fp32) > 5 * ddp_error  # the test can fail


def test_an_fp16_overflow_skip_updates_the_grad_scaler_so_the_next_step_runs():
    """fp16 under DDP (GPUs) goes through a GradScaler. The old skip path returned before
    `scaler.update()`, so the next step's `unscale_()` failed ("unscale_() has already been
    called"). Real GradScaler (CPU device), the trainer's apply_or_discard."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from noa_dist.distributed import apply_or_discard

    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    accelerator = SimpleNamespace(scaler=scaler, distributed_type=DistributedType.MULTI_GPU)
    before = model.weight.detach().clone()
    scaler.scale(model(torch.full((2, 4), 1e30)).sum() * 1e30).backward()  # overflows
    scaler.unscale_(optimizer)
    assert not all(torch.isfinite(p.grad).all() for p in model.parameters())
    apply_or_discard(accelerator, model, optimizer, scheduler, applied=False)
    assert scaler.get_scale() == 2.0**15 and torch.equal(model.weight, before)
    scaler.scale(model(torch.ones(2, 4)).sum()).backward()
    scaler.unscale_(optimizer)  # raised before the fix
    scaler.step(optimizer)
    scaler.update()
    assert not torch.equal(model.weight, before)
