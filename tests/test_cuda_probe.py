"""CUDA-only paths probed on a CPU machine (no GPU was lent): what bench/device_check.py, the prepared GPU check,
does with a device the machine has not got. It used to accept any CUDA index once CUDA was present, and then died
with a traceback naming the GPU (torch.cuda.get_device_name, outside its per-check guard) instead of the one-line
refusal, exit status 2, that train.py, tta.py and eval_niah.py give through common.pick_device."""
import importlib

import pytest
import torch

check = importlib.import_module("bench.device_check")


@pytest.fixture
def one_gpu(monkeypatch):
    """A machine that reports CUDA with one device; asking the driver anything more is a failure of the test."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    def no_driver(*args, **kwargs):
        raise AssertionError("the device check asked the driver about a GPU it should have refused")
    monkeypatch.setattr(torch.cuda, "get_device_name", no_driver)


@pytest.mark.parametrize("name, message", [
    ("cuda:1", "--device cuda:1: this machine has 1 CUDA device(s)"),
    ("cuda:7", "--device cuda:7: this machine has 1 CUDA device(s)"),
    ("meta", "unknown --device 'meta'; use auto, cpu, cuda or cuda:N"),
])
def test_the_device_check_refuses_a_device_the_machine_has_not_got_in_one_line(name, message, one_gpu, capsys):
    assert check.main(["--device", name, "--no-compile"]) == 2
    out, err = capsys.readouterr()
    assert err == f"error: {message}\n" and out == ""  # nothing ran: no PASS/FAIL lines


def test_the_device_check_without_cuda_still_refuses_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check.main(["--device", "cuda", "--no-compile"]) == 2
    assert capsys.readouterr().err == "error: --device cuda requested but CUDA is not available on this machine\n"
