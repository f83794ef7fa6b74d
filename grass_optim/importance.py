r"""Importance statistics of GRASS as pure functions of tensors.

For block ``l`` with ``N_l`` parameters and gradient ``g_t^(l)`` at optimizer step ``t``:

* per-step gradient RMS  ``r_t^(l) = sqrt(||g_t^(l)||^2 / N_l)``  (:func:`block_sq_norms`,
  :func:`block_grad_rms`); the other signals' per-block reductions (:func:`block_partial_sums` for
  ``||g||_1``, :func:`block_dots` for ``<g, theta>``),
* mean gradient norm of a window  ``m_l = mean_t r_t^(l)``  (:func:`window_mean`),
* refresh of the blocks measured in the window  ``m_l <- a * m_l(window) + (1 - a) * m_l(old)``
  (:func:`ema_update`); a block never measured before has score NaN and takes the window mean.

Everything here runs on the gradients' device without reading values back to the host, so the
optimizer can call it every step without a device synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["accumulate_window", "block_dots", "block_grad_rms", "block_partial_sums", "block_sq_norms",
           "ema_update", "foreach_norms", "window_mean"]


def block_sq_norms(grads: Sequence[Tensor], block_index: Tensor, num_blocks: int) -> Tensor:
    """Sum of squared gradient norms per block, as a float64 tensor ``[num_blocks]``.

    ``grads[i]`` belongs to block ``block_index[i]`` (a long tensor on the output device). One
    batched ``_foreach_norm`` and one ``index_add``, in float64: a finite gradient never overflows.
    """
    return block_partial_sums(grads, block_index, num_blocks, 2)


def block_partial_sums(grads: Sequence[Tensor], block_index: Tensor, num_blocks: int, ord: int) -> Tensor:
    """Per block, the sum of ``||g||_2^2`` (``ord=2``) or of ``||g||_1`` (``ord=1``) of its gradients,
    as a float64 tensor ``[num_blocks]`` (see :func:`block_sq_norms`); sparse gradients are coalesced."""
    out = torch.zeros(num_blocks, dtype=torch.float64, device=block_index.device)
    if len(grads) == 0:
        return out
    dense = [g.coalesce().values() if g.is_sparse else g for g in grads]
    norms = torch.stack([n.to(out.device, torch.float64, non_blocking=True) for n in foreach_norms(dense, ord)])
    return out.index_add_(0, block_index, norms.square() if ord == 2 else norms)


def block_dots(grads: Sequence[Tensor], params: Sequence[Tensor], block_index: Tensor, num_blocks: int) -> Tensor:
    """Per block, ``sum_i <grads[i], params[i]>`` in float64 (products taken in float32 or wider):
    before and after an update, their difference is the update's first-order loss decrease."""
    out = torch.zeros(num_blocks, dtype=torch.float64, device=block_index.device)
    if len(grads) == 0:
        return out
    dots = [torch.vdot(g.flatten().to(_wide(g.dtype)), p.flatten().to(_wide(g.dtype))) for g, p in
            zip(grads, params, strict=True)]
    return out.index_add_(0, block_index, torch.stack([d.to(out.device, torch.float64) for d in dots]))


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype products are taken in: float32 for half precision, else the tensor's own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def foreach_norms(tensors: Sequence[Tensor], ord: int = 2) -> list[Tensor]:
    """``ord``-norm of each tensor, batched, accumulated in float64 (a finite gradient of 1e20 has a
    finite norm; in float32 its squares overflow inside the reduction). A norm reads each element
    once: float64 arithmetic does not make it slower where memory bandwidth is the limit."""
    if not tensors:
        return []
    return list(torch._foreach_norm(list(tensors), ord, dtype=torch.float64))


def block_grad_rms(sq_norms: Tensor, numels: Tensor) -> Tensor:
    """``sqrt(||g||^2 / N)`` per block; blocks of size 0 give 0."""
    return torch.sqrt(sq_norms / numels.clamp(min=1))


def accumulate_window(window_sum: Tensor, window_count: Tensor, rms: Tensor, measured: Tensor) -> None:
    """Add this step's RMS of the measured blocks to the window, in place.

    Non-finite values (overflowed or NaN gradients) never enter the scores.
    """
    ok = measured & torch.isfinite(rms)
    window_sum.add_(torch.where(ok, rms, torch.zeros_like(rms)))
    window_count.add_(ok.to(window_count.dtype))


def window_mean(window_sum: Tensor, window_count: Tensor) -> Tensor:
    """Mean RMS per block over the window; 0 where a block was never measured."""
    return torch.where(window_count > 0, window_sum / window_count.clamp(min=1), torch.zeros_like(window_sum))


def ema_update(importance: Tensor, window: Tensor, measured: Tensor, alpha: float) -> Tensor:
    """``alpha * window + (1 - alpha) * importance`` where ``measured``, else the old score.

    A block without a score yet (NaN) takes the window mean as it is: averaging a first
    measurement with a placeholder would bias it by the placeholder's arbitrary scale.
    """
    updated = torch.where(torch.isnan(importance), window, alpha * window + (1.0 - alpha) * importance)
    return torch.where(measured, updated, importance)
