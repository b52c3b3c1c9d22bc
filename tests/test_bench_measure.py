"""bench/measure.py's CPU peak-memory probe reports the high-water mark of the tensors a call holds."""
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
