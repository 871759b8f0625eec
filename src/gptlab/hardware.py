"""What the hardware configs leave to the machine: the training precision and TF32 matmuls,
and the description of the machine that every run and evaluation records beside its figures.

`trainer.precision: auto` (hardware=auto and hardware=cpu) is resolved here, at the start of
a run, because the answer depends on the machine and on the model:
- a GPU trains in bf16 mixed precision where it has bf16, else in fp16 mixed precision;
- a CPU trains in bf16 autocast only where it has native bf16 matrix units (AMX-BF16 or
  AVX512-BF16) and a training step of this very model is measured faster that way; CPUs
  without them emulate bf16 many times slower than fp32, and fp16 is slow on every CPU.
The choice and its reason are printed at the start of the run. A measured choice is kept in
the cache folder for that machine, model and batch shape, so the next run of the same model
gets the same arithmetic even when a timing under load would have tipped the other way, and
a resumed run keeps the precision it trained in (pipeline.py).
"""

from __future__ import annotations

import json
import logging
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch.utilities.seed import isolate_rng

from gptlab.data.documents import digest
from gptlab.utils.files import write_atomic

log = logging.getLogger("gptlab")

AUTO = "auto"
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
GPU_ACCELERATORS = ("gpu", "cuda", "auto")
# bf16 must beat fp32 by this factor to be chosen: a marginal gain is not worth its rounding.
BF16_MIN_SPEEDUP = 1.1


def _cpuinfo(field: str) -> str | None:
    """The first `field` line's value in Linux's /proc/cpuinfo (None elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.startswith(field)), None)


def cpu_bf16_feature() -> str | None:
    """The CPU flag that gives native bf16 matmuls (Linux /proc/cpuinfo), or None."""
    flags = (_cpuinfo("flags") or "").split()
    return next((flag for flag in NATIVE_BF16_FLAGS if flag in flags), None)


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform module reports."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def machine(accelerator: str, precision: str, processes: int = 1) -> dict:
    """What a run's speed, and through its arithmetic its figures, depend on: the processor
    (CPU model, threads, native bf16; the GPU where one trains), the number of processes,
    the precision and torch's version."""
    info = {"cpu": cpu_model(), "threads": torch.get_num_threads(),
            "native_bf16": cpu_bf16_feature(), "processes": processes,
            "precision": str(precision), "torch": torch.__version__}
    if on_gpu(accelerator):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def recorded_machines(run_dir: Path) -> list[dict]:
    """The machines a run trained on, from its machine.json (none before runs recorded it)."""
    path = Path(run_dir) / "machine.json"
    return json.loads(path.read_text()) if path.is_file() else []


def describe_machine(info: dict) -> str:
    """One line, e.g. 'AMD EPYC (2 threads, no native bf16); 32-true; torch 2.13.0+cpu'."""
    processes = f" x {info['processes']} processes" if info["processes"] > 1 else ""
    if info.get("gpu"):
        where = f"{info['gpu']}{processes}"
    else:
        bf16 = info["native_bf16"] or "no native bf16"
        threads = f"{info['threads']} thread{'s' if info['threads'] != 1 else ''}"
        where = f"{info['cpu']} ({threads}, {bf16}){processes}"
    return f"{where}; {info['precision']}; torch {info['torch']}"


def on_gpu(accelerator: str) -> bool:
    return str(accelerator) in GPU_ACCELERATORS and torch.cuda.is_available()


def gpu_precision() -> str:
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def resolve_precision(precision: str, accelerator: str,
                      time_step: Callable[[str], float] | None = None) -> tuple[str, str]:
    """(Lightning precision, why) for the configured `precision`, which may be "auto".

    `time_step(precision)` times a few training steps of the run's model; without it
    (evaluation) a CPU keeps fp32.
    """
    if str(precision) != AUTO:
        return str(precision), "set by the configuration"
    if on_gpu(accelerator):
        chosen = gpu_precision()
        has = "has" if chosen.startswith("bf16") else "lacks"
        return chosen, f"{torch.cuda.get_device_name()} {has} bf16"
    feature = cpu_bf16_feature()
    if feature is None:
        return "32-true", ("this CPU has no native bf16 (no AMX-BF16 or AVX512-BF16), so bf16 "
                           "would be emulated and slower than fp32")
    if time_step is None:
        return "32-true", "evaluation keeps fp32 on CPUs"
    fp32, bf16 = time_step("32-true"), time_step("bf16-mixed")
    speed = f"timed training steps took {bf16 * 1e3:.0f} ms in bf16 and {fp32 * 1e3:.0f} ms in fp32"
    if fp32 >= BF16_MIN_SPEEDUP * bf16:
        return "bf16-mixed", f"this CPU has native bf16 ({feature}) and {speed}"
    return "32-true", f"this CPU has native bf16 ({feature}) but {speed}"


def remembered_choice(cache_dir: str | Path, key: dict,
                      choose: Callable[[], tuple[str, str]]) -> tuple[str, str]:
    """choose()'s (precision, why), measured once per `key` (machine, model, data) and
    then read back from `cache_dir`/precision: two runs of one model on one machine must not
    differ in arithmetic because one was timed while the machine was busy."""
    path = Path(cache_dir) / "precision" / f"{digest(key)[:16]}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        return saved["precision"], f"{saved['why']}; measured by an earlier run, kept in {path}"
    precision, why = choose()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"precision": precision, "why": why, "key": key}, indent=2))
    return precision, why


def step_timer(module: torch.nn.Module, steps: list[Callable[[], torch.Tensor]],
               repeats: int = 2) -> Callable[[str], float]:
    """A `time_step` for resolve_precision: the seconds of forward + backward over `steps`
    (one loss each, e.g. one per batch), each the median of `repeats`.

    Runs in a forked RNG state and clears the gradients, so the run itself is unchanged.
    """

    def seconds(loss_of: Callable[[], torch.Tensor], autocast: bool) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_of()
        loss.backward()
        return time.perf_counter() - start

    def time_step(precision: str) -> float:
        autocast = precision.startswith("bf16")
        with isolate_rng():
            seconds(steps[0], autocast)  # warms up kernels and allocator
            total = sum(statistics.median(seconds(step, autocast) for _ in range(repeats))
                        for step in steps)
        module.zero_grad(set_to_none=True)
        return total

    return time_step


def set_matmul_precision(setting: str | None, accelerator: str) -> None:
    """TF32 for fp32 matmuls on GPUs that have it ("high"); CPUs keep exact fp32."""
    if setting and on_gpu(accelerator):
        torch.set_float32_matmul_precision(setting)
        log.info("float32 matmul precision: %s", setting)


def fsdp_strategy(activation_checkpointing: bool = False, sharding_strategy: str = "FULL_SHARD",
                  **kwargs):
    """Lightning's FSDP with one unit per transformer block (and the rest as the root unit).

    Without a wrap policy the whole model is one unit, so every rank gathers every parameter
    at once and FSDP saves no memory over DDP.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    from gptlab.models.gpt import Block

    blocks = {Block}
    return FSDPStrategy(auto_wrap_policy=blocks, sharding_strategy=sharding_strategy,
                        activation_checkpointing_policy=blocks if activation_checkpointing
                        else None, **kwargs)
