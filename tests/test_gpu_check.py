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


def test_the_compiled_rows_check_the_cuda_graph_replay_against_the_run_without_it(monkeypatch):
    """The graphs were never run on a GPU here; the check compares a replayed job's image with the same job
    compiled without graphs, on the owner's GPU, and says when they differ."""
    from PIL import Image

    replay = {"broken": False}

    def run_darkroom(runner, request, device):  # noqa: ANN001, ANN202
        graphed = runner.compiler.enabled and runner.compiler.graphs
        shade = 101 if graphed and replay["broken"] else 100
        return {"its": 2.0, "peak": 2**30, "wall": 0.5, "attention": "sdpa 17", "estimate": 0, "plan": "",
                "image": Image.new("RGB", (8, 8), (shade, 50, 50)),
                "graphs": "1 capture(s), 3 replays" if graphed else None}

    monkeypatch.setattr(gpu_check, "run_darkroom", run_darkroom)
    args = argparse.Namespace(warm=False, no_diffusers=True)
    for broken, verdict in ((False, "identical pixels"), (True, "DIFFERS: up to 1/255 per channel (a bug: report it)")):
        replay["broken"] = broken
        lines = gpu_check.check_family("sd15", 64, 64, 4, "tiny", torch.device("cpu"), args, time.monotonic() + 600)
        checks = [line.strip() for line in lines if "CUDA graph:" in line]
        assert checks == [f"CUDA graph: 1 capture(s), 3 replays; against no graph: {verdict}"] * 2  # fp16, bf16
