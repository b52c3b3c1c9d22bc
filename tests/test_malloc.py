"""`common.keep_freed_memory`: after it, a training step no longer page-faults its big tensors back in.

Each mode runs in a fresh interpreter, so that neither this process's allocator settings nor its history decide the
outcome. The workload is the thing the setting is for: NTP steps of the default DeltaNet LM (2 x 512 tokens)."""
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from refine_mini.common import keep_freed_memory
from refine_mini.model import FastWeightLM, ModelConfig
from refine_mini.trainer import TrainConfig, make_optimizer, ntp_loss
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.manual_seed(0)
model = FastWeightLM(ModelConfig())
opt = make_optimizer(model, TrainConfig())
tokens = torch.randint(0, 8192, (2, 512))
def step():
    opt.zero_grad(set_to_none=True)
    ntp_loss(model(tokens)[0], tokens).backward()
    opt.step()
step(); step()
per_step = []
for _ in range(3):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    per_step.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(min(per_step))                      # the steady state: one step that happens to grow the heap is not it
"""


def faults_per_step(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning (a no-op elsewhere)")
def test_keep_freed_memory_stops_refaulting_a_training_steps_tensors():
    default, kept = faults_per_step("default"), faults_per_step("keep")
    assert default > 10_000, default          # the logits alone (2 x 512 x 8193 fp32, 34 MB) are 8 000 pages
    assert kept < default / 5, (kept, default)
