"""bench/gpu_check.py without a GPU: a configuration that fails on the user's machine (a compiler, kernel or
memory it lacks) costs its own row, not the rest of the check, and every row is printed as it is measured (the
shell wrapper stops the check at 8 minutes)."""

from __future__ import annotations

import argparse
import time

import torch

from bench import gpu_check


def test_a_failing_configuration_costs_its_row_only_and_rows_print_as_they_come(monkeypatch, capsys):
    def run_darkroom(runner, request, device):  # noqa: ANN001, ANN202
        if runner.compiler.enabled:
            raise RuntimeError("simulated: inductor found no C++ compiler\nsecond line")
        return {"its": 2.0, "peak": 2**30, "wall": 0.5, "attention": "sdpa 17", "estimate": 0, "plan": ""}

    monkeypatch.setattr(gpu_check, "run_darkroom", run_darkroom)
    args = argparse.Namespace(warm=False, no_diffusers=True)
    lines = gpu_check.check_family("sd15", 64, 64, 4, "tiny", torch.device("cpu"), args, time.monotonic() + 600)
    failed = [line for line in lines if "compile" in line]
    assert len(failed) == 2 and all("failed (RuntimeError: simulated: inductor found no C++ compiler)" in line
                                    for line in failed)
    assert [line.split()[2] for line in failed] == ["fp16", "bf16"]  # the bf16 rows came after fp16's failure
    assert sum("2.00 it/s" in line for line in lines) >= 2 * 3  # eager and both caches, each precision
    assert capsys.readouterr().out.splitlines() == list(lines)
