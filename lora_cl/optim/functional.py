"""Routed AdamW math, two implementations of one contract.

For each tensor, with g_m the gradient that feeds the first moment and g_v the one
that feeds the second (the routing decides which is raw g and which is g~):

    m <- b1*m + (1-b1)*g_m
    v <- b2*v + (1-b2)*g_v*g_v
    p <- p - lr*wd*p - lr * (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps)

``routed_adamw_reference`` is the readable single-tensor path; it is written as
torch's ``_single_tensor_adam`` so that with g_m = g_v it equals ``torch.optim.AdamW``
bit for bit. ``routed_adamw_fused`` runs torch's fused AdamW kernel, which takes one
gradient for both moments: it is fed g_v and the first moment is pre-corrected with
m += (1-b1)/b1 * (g_m - g_v), so the kernel's b1*m + (1-b1)*g_v lands on
b1*m + (1-b1)*g_m. Tensors with g_m is g_v skip the correction and equal
``torch.optim.AdamW(fused=True)`` bit for bit.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor


def routed_adamw_reference(
    params: list[Tensor],
    grads_m: list[Tensor],
    grads_v: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One routed AdamW step, tensor by tensor (states fp32; params any float dtype)."""
    for p, g_m, g_v, m, v, step_t in zip(
        params, grads_m, grads_v, exp_avgs, exp_avg_sqs, state_steps, strict=True
    ):
        work = p if p.dtype == torch.float32 else p.detach().float()
        step_t += 1
        if weight_decay != 0:
            work.mul_(1 - lr * weight_decay)
        m.lerp_(g_m, 1 - beta1)
        v.mul_(beta2).addcmul_(g_v, g_v, value=1 - beta2)
        step = step_t.item()
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        work.addcdiv_(m, denom, value=-(lr / bias_correction1))
        if work is not p:
            p.copy_(work)


def routed_adamw_fused(
    params: list[Tensor],
    grads_m: list[Tensor],
    grads_v: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """The same step through ``torch._fused_adamw_`` (first-moment pre-correction).

    Falls back to :func:`routed_adamw_reference` where the pre-correction's error bound does not
    hold (beta1 < ``FUSED_MIN_BETA1``: the correction scales by (1-b1)/b1) or where the kernel's
    input checks would fail on a modified gradient; both are decided before any state is
    written. Should the kernel still raise, the pre-correction is undone before the error
    propagates.
    """
    if not params:
        return
    differ = [i for i, (gm, gv) in enumerate(zip(grads_m, grads_v, strict=True)) if gm is not gv]
    if beta1 < FUSED_MIN_BETA1 or not _modified_inputs_ok(params, grads_m, grads_v, differ):
        routed_adamw_reference(
            params, grads_m, grads_v, exp_avgs, exp_avg_sqs, state_steps,
            lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        )
        return
    c = (1 - beta1) / beta1
    if differ:  # m += c * g_m - c * g_v in place: no temporaries the size of the gradients
        ms = [exp_avgs[i] for i in differ]
        torch._foreach_add_(ms, [grads_m[i] for i in differ], alpha=c)
        torch._foreach_add_(ms, [grads_v[i] for i in differ], alpha=-c)
    try:
        _fused_kernel(params, grads_v, exp_avgs, exp_avg_sqs, state_steps, lr=lr, beta1=beta1,
                      beta2=beta2, eps=eps, weight_decay=weight_decay)
    except BaseException:
        if differ:  # undo the pre-correction (to rounding) before the error propagates
            torch._foreach_add_(ms, [grads_v[i] for i in differ], alpha=c)
            torch._foreach_add_(ms, [grads_m[i] for i in differ], alpha=-c)
        raise


#: Below this beta1 the fused path's pre-correction loses accuracy (relative error of m, measured
#: by ``benchmarks/fused_beta1_accuracy.py``: ~1e-7 down to beta1 = 1e-3, ~2e-6 at 1e-4, ~1e-4 at
#: 1e-6), so those steps take the reference path.
FUSED_MIN_BETA1 = 1e-3


def _modified_inputs_ok(params: list[Tensor], grads_m: list[Tensor], grads_v: list[Tensor],
                        differ: list[int]) -> bool:
    """The kernel's input checks, made before m is pre-corrected, on the tensors a modifier made.

    RoutedAdamW's own states and raw gradients are fp32 on the parameter's device by
    construction; a modifier's g~ (a replay gradient, say) might not be.
    """
    for i in differ:
        p = params[i]
        for g in (grads_m[i], grads_v[i]):
            if g.dtype != torch.float32 or g.device != p.device or g.shape != p.shape:
                return False
    return True


def fused_adamw_step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                     exp_avg_sqs: list[Tensor], state_steps: list[Tensor], *, lr: float, beta1: float,
                     beta2: float, eps: float, weight_decay: float, found_inf: Tensor) -> None:
    """Plain AdamW through the fused kernel, skipped on the device where ``found_inf`` is 1:
    p, m and v untouched and the step counts put back (torch's fused AdamW does the same)."""
    _fused_kernel(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr=lr, beta1=beta1, beta2=beta2,
                  eps=eps, weight_decay=weight_decay, found_inf=found_inf)
    torch._foreach_sub_(state_steps, [found_inf] * len(state_steps))


def _fused_kernel(params: list[Tensor], grads_v: list[Tensor], exp_avgs: list[Tensor],
                  exp_avg_sqs: list[Tensor], state_steps: list[Tensor], *, lr: float, beta1: float,
                  beta2: float, eps: float, weight_decay: float,
                  found_inf: Tensor | None = None) -> None:
    # The kernel wants params, grads and states of one dtype: lower-precision params are
    # updated through an fp32 working copy (states stay fp32).
    work = [p if p.dtype == torch.float32 else p.detach().float() for p in params]
    buckets: dict[torch.device, list[int]] = defaultdict(list)
    for i, p in enumerate(work):
        buckets[p.device].append(i)
    for idx in buckets.values():
        steps = [state_steps[i] for i in idx]
        torch._foreach_add_(steps, 1)
        torch._fused_adamw_(
            [work[i] for i in idx],
            [grads_v[i] for i in idx],
            [exp_avgs[i] for i in idx],
            [exp_avg_sqs[i] for i in idx],
            [],
            steps,
            amsgrad=False,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            eps=eps,
            maximize=False,
            grad_scale=None,
            found_inf=found_inf,
        )
    for p, w in zip(params, work, strict=True):
        if w is not p:
            p.copy_(w)


def fused_kernel_available(device: torch.device) -> bool:
    """Whether torch ships a fused AdamW kernel for ``device`` (CPU and CUDA do)."""
    return device.type in ("cpu", "cuda", "mps", "xpu") and hasattr(torch, "_fused_adamw_")

