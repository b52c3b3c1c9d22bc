"""The memory of OUR chunked kernel's schedule, which a plain correct kernel need not match (so this file is not one
of the teaching table's: a batched autograd version peaks at ~11x the output, a per-chunk loop at ~3.7x).
"""
import pytest


def test_no_grad_forward_lets_go_of_what_only_the_backward_needs():
    """Under torch.no_grad() the forward's peak tensor memory is 4x the output o plus one state per head (T and W
    freed once used, nothing saved), also when the inputs require grad; with autograd on it is 6x (fp32, Dk = Dv =
    C = 64: the module docstring's figures, measured by bench/kernels.py's probe)."""
    from bench.kernels import forward_peak, inputs as bench_inputs
    xs, xg = bench_inputs(1, 2, 512, 64), bench_inputs(1, 2, 512, 64, grad=True)
    o_bytes, h_bytes = 2 * 512 * 64 * 4, 2 * 64 * 64 * 4
    peaks = [forward_peak(x, 64, grad) for x, grad in ((xs, False), (xg, False), (xg, True))]
    if None in peaks:
        pytest.skip("this PyTorch's profiler exposes no allocation records")
    assert peaks[0] == peaks[1] <= 4 * o_bytes + 2 * h_bytes       # CPU: exactly 4 o + h (measured)
    assert peaks[2] >= 6 * o_bytes
