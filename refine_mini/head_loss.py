"""The LM head's next-token cross-entropy, computed in row blocks: the (B, T, V) logits never exist (method.md §1.2,
§1.9, §3).

Question answered: why does a REFINE step at the paper's 16K context fit in a laptop's memory?

Every training loss here is a weighted sum of per-position cross-entropies through the LM head W (V, D):
    z_r = W h_r (V,),   nll_r = logsumexp(z_r) − z_r[y_r],   L = Σ_r w_r · nll_r
(w_r = 1 for NTP; answer-weighted pre-training and REFINE's λ_NTP / n_targets only rescale it; rows whose target is
IGNORE count 0). At V = 8193 and D = 128 the logits are 64× wider than the hidden states: a (4, 16384) batch has
2 GiB of them, and autograd's plain path holds three to four such tensors at its peak (logits, log-softmax, their
gradients) -- more than all of the model's own activations.

The gradient of L is known in closed form, row by row:
    ∂L/∂z_r = w_r (softmax(z_r) − onehot(y_r)),   ∂L/∂h_r = Wᵀ ∂L/∂z_r,   ∂L/∂W = Σ_r ∂L/∂z_r h_rᵀ,
and the row weights are known before the backward. So `head_loss` computes L, the per-row nll, optionally the
entropy H_r = −Σ_v p_v log p_v (REFINE step 1, read off the same logits), AND both gradients in ONE pass over blocks
of `block_rows` rows. Each block's (rows, V) logits live only while that block is processed (in the CPU's cache at
the default 256 rows). The backward then scales the stored gradients by ∂loss/∂L: no recomputation, the same three
matmuls as the plain path. Extra memory: ∂L/∂h (N, D), the size of the hidden states, and ∂L/∂W (V, D).

`head_loss_reference` is the plain path (full logits, F.cross_entropy, autograd); tests/test_head_loss.py proves the
two agree in L, nll, entropy and both gradients. Deviation from the plain path: none in value; the sums run in a
different order, so fp32 results differ in the last bits. The fused path supports one backward (a double backward
raises).
Under bf16 autocast (the model's precision "bf16") the three matmuls run in bf16, as autocast runs the plain path's,
and the softmax, the sums over rows and the gradients' accumulation over blocks in fp32.
"""
import torch
import torch.nn.functional as F

IGNORE = -100  # a position without a target: the last token of a document, padding, a prompt token in SFT


def default_block_rows(device: torch.device) -> int:
    """Rows per block: 256 on CPU (a (256, 8193) fp32 block is 8 MiB; on a 2-core EPYC 128 to 512 rows ran at the
    same speed, 64 and 1024 slower); 4096 on CUDA, where the matmuls need tall blocks to fill the device (not
    measured: no GPU was lent while this was written)."""
    return 4096 if device.type == "cuda" else 256


def _block(h, W, targets, w, dtype, with_entropy: bool, grad_weight):
    """One block of n rows: h (n, D) and W (V, D) in the matmuls' dtype, targets (n,), w (n,) -> nll (n,), entropy
    (n,) or None, and ∂L/∂h (n, D) with ∂L/∂W added into grad_weight (V, D) -- or None, None when grad_weight is None
    (no gradient wanted). The softmax and the sums run in `dtype` (fp32 at least)."""
    logp = torch.log_softmax((h @ W.T).to(dtype), dim=-1)  # (n, D) @ (D, V) -> (n, V): the logits, normalised
    nll = -logp.gather(1, targets[:, None])[:, 0]  # (n, V) gather (n, 1) -> (n,)
    p = logp.exp()  # (n, V) softmax
    entropy = -(p * logp).sum(-1) if with_entropy else None  # H = −Σ_v p_v log p_v, (n,)
    if grad_weight is None:
        return nll, entropy, None
    del logp
    g = p.scatter_add_(1, targets[:, None], p.new_full((len(targets), 1), -1.0))  # p − onehot(y), in place
    g.mul_(w[:, None])  # (n, V): ∂L/∂z = w (softmax − onehot)
    if h.dtype == dtype:
        grad_weight.addmm_(g.T, h)  # (V, n) @ (n, D) -> (V, D), summed over blocks
    else:  # bf16 matmuls (autocast): the (V, D) product in bf16, summed over blocks in fp32
        g = g.to(h.dtype)
        grad_weight += g.T @ h  # (V, n) @ (n, D) -> (V, D) in bf16, added into the fp32 sum
    return nll, entropy, g @ W  # (n, V) @ (V, D) -> (n, D)


class _FusedHeadLoss(torch.autograd.Function):
    """(hidden (N, D), weight (V, D), targets (N,), row_weights (N,)) -> (L, nll (N,), entropy (N,) or empty)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, row_weights, block_rows: int, with_entropy: bool, want_grad: bool):
        dtype = torch.promote_types(hidden.dtype, torch.float32)  # softmax in fp32 at least (fp64 stays fp64)
        device = hidden.device.type  # under autocast the matmuls take its dtype, as they would on the plain path
        mm = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else dtype
        W = weight.to(mm)  # (V, D)
        valid = targets != IGNORE  # (N,)
        safe_targets = torch.where(valid, targets, 0)  # (N,) any real id where ignored; its nll is zeroed below
        w = torch.where(valid, row_weights.to(dtype), 0)  # (N,): ignored rows weigh 0
        nll = hidden.new_empty(targets.shape, dtype=dtype)  # (N,)
        entropy = hidden.new_empty(targets.shape if with_entropy else (0,), dtype=dtype)
        grad_hidden = torch.empty_like(hidden, dtype=dtype) if want_grad else None  # (N, D)
        grad_weight = torch.zeros_like(W, dtype=dtype) if want_grad else None  # (V, D), summed over blocks in dtype
        for lo in range(0, hidden.shape[0], block_rows):
            rows = slice(lo, lo + block_rows)
            with torch.autocast(device, enabled=False):  # the casts are explicit: h and W in mm, the rest in dtype
                out = _block(hidden[rows].to(mm), W, safe_targets[rows], w[rows], dtype, with_entropy, grad_weight)
            nll[rows], entropy_rows, grad_rows = out  # the block's (n, V) tensors are freed on _block's return
            if with_entropy:
                entropy[rows] = entropy_rows
            if want_grad:
                grad_hidden[rows] = grad_rows
        nll = torch.where(valid, nll, 0)  # ignored rows: nll 0
        loss = (w * nll).sum()  # L = Σ_r w_r nll_r
        if want_grad:
            ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(nll, entropy)
        return loss, nll, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_nll, _grad_entropy):
        if torch.is_grad_enabled():  # autograd runs a backward in grad mode only under create_graph=True
            raise RuntimeError("the fused head loss is not twice differentiable (its gradient is precomputed); "
                               "set model.fused_head = False for higher derivatives")
        grad_hidden, grad_weight = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        gh = (grad_hidden * grad_loss).to(h_dtype) if ctx.needs_input_grad[0] else None  # (N, D)
        gw = (grad_weight * grad_loss).to(w_dtype) if ctx.needs_input_grad[1] else None  # (V, D)
        return gh, gw, None, None, None, None, None


def head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, row_weights=None,
              with_entropy: bool = False, block_rows: int | None = None):
    """Fused path. hidden (..., D), weight (V, D), targets (...) with IGNORE where none, row_weights (...) or None
    (all 1) -> (L = Σ w_r nll_r with grad, nll (...) detached, entropy (...) detached or None)."""
    shape = targets.shape
    row_weights = torch.ones(shape, device=hidden.device) if row_weights is None else row_weights
    block_rows = default_block_rows(hidden.device) if block_rows is None else block_rows
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)  # else skip the gradients
    loss, nll, entropy = _FusedHeadLoss.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                              row_weights.reshape(-1), block_rows, with_entropy,
                                              want_grad)  # (..., D) -> (N, D)
    return loss, nll.view(shape), entropy.view(shape) if with_entropy else None  # (N,) -> (...)


def head_loss_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, row_weights=None,
                        with_entropy: bool = False):
    """The plain path, same contract: the full logits (..., V), F.cross_entropy and autograd."""
    logits = F.linear(hidden, weight)  # (..., D) @ (D, V) -> (..., V)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    flat = logits.reshape(-1, logits.shape[-1])  # (N, V)
    nll = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE, reduction="none")  # (N,)
    nll = nll.view(targets.shape)  # (N,) -> (...)
    w = torch.ones_like(nll) if row_weights is None else row_weights.to(nll.dtype)
    loss = (w * nll).sum()  # ignored rows have nll 0
    entropy = None
    if with_entropy:
        logp = torch.log_softmax(flat.detach(), dim=-1)  # (N, V)
        entropy = -(logp.exp() * logp).sum(-1).view(targets.shape)  # (N,) -> (...)
    return loss, nll.detach(), entropy
