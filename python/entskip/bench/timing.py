"""Timing of one runner: warm-up, then per-call samples, median in milliseconds.

CPU: ``time.perf_counter`` around each call. CUDA: a pair of CUDA events around each
call, all recorded back to back and read after one synchronize, so the host can run
ahead as it does in training; the L2 cache is not flushed between calls. The
gradients of a forward+backward runner are dropped between calls, outside the timed
region, and so is the output.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .peers import Runner


@dataclass(frozen=True)
class Settings:
    """``repeats`` samples after at least ``warmup`` calls and ``WARMUP_S`` seconds of warm-up;
    sampling stops early once ``budget_s`` seconds are spent and ``MIN_SAMPLES`` samples are in."""

    repeats: int
    warmup: int
    budget_s: float

    MIN_SAMPLES = 3
    WARMUP_S = 0.2

    @staticmethod
    def for_device(device: torch.device, repeats: int, budget_s: float) -> Settings:
        """Settings with the device's warm-up: 10 calls on CUDA, 5 on the CPU (plus ``WARMUP_S``).

        On the CPU the first calls of a new shape touch fresh memory: under a hypervisor the
        first use of a huge page of guest memory costs the host's page faults too, which made
        the first 3-4 calls of a case several times slower than the rest (seen on the 2-vCPU
        development machines), so one warm-up call left them among the samples.
        """
        return Settings(repeats, warmup=10 if torch.device(device).type == "cuda" else 5, budget_s=budget_s)

    def as_dict(self) -> dict:
        return {
            "repeats": self.repeats,
            "warmup_calls": self.warmup,
            "warmup_s": self.WARMUP_S,
            "budget_s": self.budget_s,
            "min_samples": self.MIN_SAMPLES,
        }


def samples_ms(runner: Runner, device: torch.device, settings: Settings) -> list[float]:
    """Per-call times in ms of ``runner.step()`` (see the module doc)."""
    cuda = torch.device(device).type == "cuda"
    start = time.perf_counter()
    calls = 0
    while calls < settings.warmup or time.perf_counter() - start < settings.WARMUP_S:
        runner.reset()
        runner.step()
        if cuda:
            torch.cuda.synchronize(device)
        calls += 1
    times, events = [], []
    start = time.perf_counter()
    while len(times) + len(events) < settings.repeats:
        runner.reset()
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            out = runner.step()
            end.record()
            events.append((begin, end))
        else:
            t0 = time.perf_counter()
            out = runner.step()
            times.append(1e3 * (time.perf_counter() - t0))
        del out
        if len(times) + len(events) >= settings.MIN_SAMPLES and time.perf_counter() - start > settings.budget_s:
            break
    if cuda:
        torch.cuda.synchronize(device)
        times = [begin.elapsed_time(end) for begin, end in events]
    return times


def synchronized(runner: Runner, device: torch.device):
    """``runner.step`` followed by a device synchronize: a callable a wall-clock timer can time."""
    if torch.device(device).type != "cuda":
        return runner.step

    def step():
        out = runner.step()
        torch.cuda.synchronize(device)
        return out

    return step
