"""bench/measure.py's CPU peak-memory probe reports the high-water mark of the tensors a call holds; the bench
scripts refuse bad flags in one line."""
import importlib
import os

import pytest
import torch

from bench.measure import cpu_peak_bytes


def test_cpu_peak_bytes_is_the_high_water_mark_of_held_tensors():
    def run():
        a = torch.empty(1 << 18)                                        # 1 MiB
        b = torch.empty(1 << 19)                                        # 2 MiB while a is held: 3 MiB
        del a, b
        c = torch.empty(1 << 18)                                        # 1 MiB again: below the mark
        return c

    held = torch.empty(1 << 20)                                         # held before the call: not counted
    peak = cpu_peak_bytes(run)
    assert peak == 3 << 20                                              # exact: the CPU allocator rounds nothing here
    del held                                                            # held until here


def test_cpu_peak_bytes_keeps_the_profilers_lines_off_stderr_and_restores_it(capfd):
    cpu_peak_bytes(lambda: torch.empty(16))
    os.write(2, b"after\n")                                             # file descriptor 2 works again
    err = capfd.readouterr().err
    assert err == "after\n"                                             # no 'USDT ... profiler_start' lines


@pytest.mark.parametrize("script, argv", [("kernels", ["--repeats", "0"]), ("kernels", ["--chunk", "0"]),
                                          ("refine_step", ["--batch", "0"]), ("refine_step", ["--mixers", "rnn"]),
                                          ("refine_step", ["--seq-len", "20"]), ("refine_step", ["--devices", "tpu"]),
                                          ("memory", ["--batch", "0"]), ("memory", ["--lengths", "512", "20"]),
                                          ("memory", ["--mixers", "rnn"]), ("memory", ["--device", "tpu"]),
                                          ("precision", ["--reps", "0"]), ("precision", ["--lengths", "20"]),
                                          ("precision", ["--mixers", "rnn"]), ("precision", ["--device", "tpu"])])
def test_bench_scripts_refuse_bad_flags_in_one_line(script, argv, capsys):
    main = importlib.import_module(f"bench.{script}").main
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_the_compiled_kernel_check_catches_a_kernel_that_computes_something_else():
    """bench/kernels.py refuses to time a compiled kernel unless it matches eager (CUDA only; checked here on CPU
    with stand-ins): zero error against itself, and a 1 % error in the state's gradient path is seen."""
    kernels = importlib.import_module("bench.kernels")
    xs = kernels.inputs(1, 2, 40, 8, grad=True)
    assert kernels.compiled_error(kernels.delta_rule_chunked, xs, 16) == 0.0

    def off(*args, **kwargs):
        o, S = kernels.delta_rule_chunked(*args, **kwargs)
        return o, S * 1.01
    assert 5e-3 < kernels.compiled_error(off, xs, 16) < 2e-2


def test_the_device_check_passes_on_cpu_and_catches_a_wrong_kernel(monkeypatch, capsys):
    """bench/device_check.py is the prepared script for a GPU; here it runs its checks on CPU (no compile, no CLI):
    all pass, and a chunked kernel whose state is 1 % off fails the first one, with exit status 1."""
    check = importlib.import_module("bench.device_check")
    assert check.main(["--device", "cpu", "--no-compile"]) == 0
    assert "FAIL" not in capsys.readouterr().out
    real = check.delta_rule_chunked

    def off(*args, **kwargs):
        o, S = real(*args, **kwargs)
        return o, S * 1.01
    monkeypatch.setattr(check, "delta_rule_chunked", off)
    assert check.main(["--device", "cpu", "--no-compile"]) == 1
    assert "FAIL  chunked == recurrent" in capsys.readouterr().out

    def crash(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access")
    monkeypatch.setattr(check, "refine_step", crash)  # a crash fails its group; the groups after it still run
    assert check.main(["--device", "cpu", "--no-compile"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  check_refine_step: RuntimeError: CUDA error" in out and "PASS  checkpoint saved on cpu" in out
    assert check.main(["--device", "tpu"]) == 2
