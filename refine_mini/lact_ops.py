"""LaCT fast-weight operator: how do SwiGLU fast weights learn from large chunks at test time?

Spec: /work/shared/docs/fast-weights.md §3.2 (update rule), §5 invariants 10-15, §7 pitfalls 12-16;
LaCT paper (Zhang et al. 2025, arXiv 2505.23884). Derivation in docs/lact.md.

Per fast head, f_W(x) = W1 [silu(W0 x) * (W2 x)] with W0, W2 (h, d) and W1 (d, h). Tokens are cut into
chunks at multiples of C from absolute token 0. For chunk b: (1) apply o_i = f_{W^(b)}(q_i) with the weights
*before* the update; (2) closed-form gradients of L = -sum_i eta_i <f_W(k_i), v_i> (one matmul per matrix);
(3) momentum M <- G + mean(m) M; (4) optional Muon, Delta <- NS5(M); (5) W <- rownorm(W + Delta) * n_init.

Deviations from the released code:
- An update runs for every COMPLETE chunk, including the last one of the sequence (the released loop skips
  it because nothing follows). Outputs are identical; only the returned state differs, and this is what makes
  streaming (the state carries a buffered partial chunk of < C tokens) equal the full pass exactly.
- Newton-Schulz runs in bf16 on CUDA (as released) but in the input dtype (at least fp32) on CPU; fp64 stays fp64.
- Fast weights and the math of the op run in fp32 (fp64 when the inputs are fp64), under bf16 autocast too
  (`autocast_off`); no compile.
Layout: kernel tensors (B, H, T, d); fast weights (B, H, rows, cols); lrs eta (B, H, T, 3); momentum m (B, H, T).
"""
import torch
import torch.nn.functional as F

from refine_mini.common import autocast_off
from refine_mini.delta_rule import check_chunk_size

# (a, b, c) per Newton-Schulz iteration, X <- a X + (b A + c A^2) X with A = X X^T (spec §3.2 step 4).
NS5_COEFFS = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)
ROW_NORM_EPS = 1e-5


def swiglu_fw(w0, w1, w2, x):
    """f_W(x) = W1 [silu(W0 x) * (W2 x)] for x (B, H, N, d) -> (B, H, N, d)."""
    g = x @ w0.mT  # (B,H,N,d) @ (B,H,d,h) -> (B,H,N,h)
    a = x @ w2.mT  # (B,H,N,d) @ (B,H,d,h) -> (B,H,N,h)
    return (F.silu(g) * a) @ w1.mT  # (B,H,N,h) @ (B,H,h,d) -> (B,H,N,d)


def closed_form_grads(w0, w1, w2, k, v, eta):
    """Ascent directions G_j = -dL/dW_j of L = -sum_i eta_ji <f_W(k_i), v_i> over one chunk.

    k, v (B, H, N, d); eta (B, H, N, 3) = (eta0, eta1, eta2), one lr per matrix. With g = W0 k, a = W2 k,
    z = silu(g) * a, e = W1^T v and silu'(x) = s(x) (1 + x (1 - s(x))):
      G1 = sum_i eta1_i v_i z_i^T;  G0 = sum_i eta0_i (e_i * a_i * silu'(g_i)) k_i^T;
      G2 = sum_i eta2_i (e_i * silu(g_i)) k_i^T.
    Returns G0 (B,H,h,d), G1 (B,H,d,h), G2 (B,H,h,d).
    """
    g = k @ w0.mT  # (B,H,N,d) @ (B,H,d,h) -> (B,H,N,h)
    a = k @ w2.mT  # (B,H,N,h)
    sig = torch.sigmoid(g)
    silu_g = g * sig  # (B,H,N,h)
    dsilu_g = sig * (1 + g * (1 - sig))  # silu'(g), (B,H,N,h)
    z = silu_g * a  # (B,H,N,h)
    e = v @ w1  # e_i = W1^T v_i: (B,H,N,d) @ (B,H,d,h) -> (B,H,N,h)
    eta0, eta1, eta2 = eta[..., 0:1], eta[..., 1:2], eta[..., 2:3]  # each (B,H,N,1)
    g1 = (eta1 * v).mT @ z  # (B,H,d,N) @ (B,H,N,h) -> (B,H,d,h)
    g0 = (eta0 * e * a * dsilu_g).mT @ k  # (B,H,h,N) @ (B,H,N,d) -> (B,H,h,d)
    g2 = (eta2 * e * silu_g).mT @ k  # (B,H,h,N) @ (B,H,N,d) -> (B,H,h,d)
    return g0, g1, g2


def autograd_grads(w0, w1, w2, k, v, eta):
    """Reference for closed_form_grads: torch.func.grad of sum_i eta_ji <f_W(k_i), v_i> w.r.t. each W_j.

    Weights are independent per (batch, head), so the gradient of the total sum is the per-head gradient.
    """
    weights = (w0, w1, w2)
    grads = []
    for j in range(3):
        def objective(wj, j=j):
            ws = list(weights)
            ws[j] = wj
            out = swiglu_fw(*ws, k)  # (B,H,N,d)
            return (eta[..., j:j + 1] * out * v).sum()
        grads.append(torch.func.grad(objective)(weights[j]))
    return tuple(grads)


def newton_schulz5(x):
    """Approximate orthogonalisation U V^T of x (..., m, n) -> same shape (Muon's NS5, spec §3.2 step 4).

    Runs in bf16 on CUDA, in the input dtype (at least fp32) on CPU, and in fp64 for fp64 inputs anywhere (the
    reference precision of the tests); result cast back to x.dtype.
    """
    fast = x.is_cuda and x.dtype != torch.float64
    work_dtype = torch.bfloat16 if fast else torch.promote_types(x.dtype, torch.float32)
    y = x.to(work_dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        y = y.mT  # (..., n, m): iterate on the wide orientation so A is the smaller Gram matrix
    y = y / (torch.linalg.matrix_norm(y).unsqueeze(-1).unsqueeze(-1) + 1e-7)  # Frobenius norm, (...,1,1)
    for a, b, c in NS5_COEFFS:
        gram = y @ y.mT  # (..., r, c) @ (..., c, r) -> (..., r, r)
        y = a * y + (b * gram + c * (gram @ gram)) @ y  # (..., r, r) @ (..., r, c) -> (..., r, c)
    if tall:
        y = y.mT  # back to (..., rows, cols)
    return y.to(x.dtype)


def update_fast_weights(weights, momenta, norms, grads, mu, use_momentum, use_muon):
    """Steps 3-5 for one chunk. mu (B, H) = chunk-mean momentum; norms n_j (B, H, rows, 1).

    Returns (new weights, new momenta); momenta keep the pre-Muon value. No in-place ops (autograd-safe).
    """
    new_w, new_m = [], []
    for w, m, n, g in zip(weights, momenta, norms, grads):
        if use_momentum:
            m = g + mu[..., None, None] * m  # M <- G + mu_b M, (B,H,rows,cols)
        delta = m if use_momentum else g
        if use_muon:
            delta = newton_schulz5(delta)
        w = w + delta
        w = w / (w.norm(dim=-1, keepdim=True) + ROW_NORM_EPS) * n  # each row back to its initial norm
        new_w.append(w)
        new_m.append(m)
    return tuple(new_w), tuple(new_m)


@autocast_off
def lact_chunked(q, k, v, eta, m, weights, momenta, norms, buffer, chunk_size,
                 use_momentum=True, use_muon=False, with_history=False):
    """Streaming apply-then-update over chunks (closed-form gradients).

    q, k, v (B, H, T, d); eta (B, H, T, 3); m (B, H, T). weights (W0, W1, W2), momenta (M0, M1, M2),
    norms (n0, n1, n2). buffer = (k, v, eta, m) of the current partial chunk, n_buf < C tokens, shapes
    (B, H, n_buf, ...): those tokens were already applied by an earlier call and start at a chunk boundary.
    Returns o (B, H, T, d) in q.dtype, new weights, new momenta, new buffer (the tokens after the last
    complete chunk). Every complete chunk is used for an update, the last one included.
    The fifth value, history, is None unless with_history: then [(weights, momenta)] before the first update and
    after every update, the fast weights entering each chunk (LaCT.snapshots rebuilds prefix states from it).
    """
    if q.dim() != 4 or q.shape[2] < 1:
        raise ValueError(f"lact_chunked needs q of shape (B, H, T >= 1, d), got {tuple(q.shape)}")
    B, H, T, _ = q.shape
    if k.shape[:3] != (B, H, T) or v.shape[:3] != (B, H, T) or eta.shape != (B, H, T, 3) or m.shape != (B, H, T):
        raise ValueError(f"k, v (B, H, T, d), eta (B, H, T, 3) and m (B, H, T) must match q's (B, H, T) = "
                         f"{(B, H, T)}, got {tuple(k.shape)}, {tuple(v.shape)}, {tuple(eta.shape)}, {tuple(m.shape)}")
    C = check_chunk_size(chunk_size)
    if not all(t.is_floating_point() and t.device == q.device for t in (q, k, v, eta, m, *weights, *momenta, *norms,
                                                                        *buffer)):  # o.to(q.dtype): an int q truncates
        raise ValueError("lact_chunked needs floating-point tensors on one device (q's) for q, k, v, eta, m and the "
                         "weights, momenta, norms and buffer")
    dt = torch.promote_types(weights[0].dtype, torch.float32)  # the op's math in fp32 at least
    weights, momenta, norms, buffer = (tuple(t.to(dt) for t in ts) for ts in (weights, momenta, norms, buffer))
    n_buf = buffer[0].shape[2]
    if n_buf >= C:
        raise ValueError(f"buffer holds {n_buf} tokens, must be < chunk_size {C}")
    keys = torch.cat([buffer[0], k.to(dt)], 2)  # (B,H,N,d), N = n_buf + T
    vals = torch.cat([buffer[1], v.to(dt)], 2)  # (B,H,N,d)
    lrs = torch.cat([buffer[2], eta.to(dt)], 2)  # (B,H,N,3)
    moms = torch.cat([buffer[3], m.to(dt)], 2)  # (B,H,N)
    queries = q.to(dt)  # (B,H,T,d); token t of this call sits at index n_buf + t of keys
    N = keys.shape[2]
    outs, done = [], 0
    history = [(weights, momenta)] if with_history else None
    for start in range(0, N, C):
        end = min(start + C, N)
        q_lo, q_hi = max(start, n_buf) - n_buf, end - n_buf  # this call's queries inside the chunk
        if q_hi > q_lo:
            outs.append(swiglu_fw(*weights, queries[:, :, q_lo:q_hi]))  # (B,H,n,d) with W^(b)
        if end - start == C:  # chunk complete -> update (its queries above used the old weights)
            grads = closed_form_grads(*weights, keys[:, :, start:end], vals[:, :, start:end],
                                      lrs[:, :, start:end])
            mu = moms[:, :, start:end].mean(-1)  # (B,H)
            weights, momenta = update_fast_weights(weights, momenta, norms, grads, mu,
                                                   use_momentum, use_muon)
            done = end
            if history is not None:
                history.append((weights, momenta))
    buffer = (keys[:, :, done:], vals[:, :, done:], lrs[:, :, done:], moms[:, :, done:])
    o = torch.cat(outs, 2).to(q.dtype)  # (B,H,T,d)
    return o, weights, momenta, buffer, history


@autocast_off
def lact_reference(q, k, v, eta, m, w0, w1, w2, chunk_size, use_momentum=True, use_muon=False):
    """Plain oracle: one full sequence, a per-chunk loop, gradients from torch.func.grad.

    Same shapes as lact_chunked (no buffer; initial weights w_j (B, H, rows, cols), zero momentum).
    Returns o (B, H, T, d) and the final weights (after every complete chunk).
    """
    weights = (w0, w1, w2)
    norms = tuple(w.norm(dim=-1, keepdim=True) for w in weights)  # (B,H,rows,1)
    momenta = tuple(torch.zeros_like(w) for w in weights)
    T, C = q.shape[2], chunk_size
    outs = []
    for start in range(0, T, C):
        chunk = slice(start, start + C)
        outs.append(swiglu_fw(*weights, q[:, :, chunk]))  # (B,H,<=C,d)
        if min(start + C, T) - start == C:
            grads = autograd_grads(*weights, k[:, :, chunk], v[:, :, chunk], eta[:, :, chunk])
            weights, momenta = update_fast_weights(weights, momenta, norms, grads,
                                                   m[:, :, chunk].mean(-1), use_momentum, use_muon)
    return torch.cat(outs, 2), weights
