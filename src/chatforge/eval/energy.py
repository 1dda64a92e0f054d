"""Energy and CO2 of a stage: wall time × average power × PUE = energy; energy × grid intensity = CO2.

This is the method of the Machine Learning CO2 Impact calculator (Lacoste et al. 2019,
https://mlco2.github.io/impact/) and of the environment chapter of Stanford's CS324 / so-large-lm:

    kWh = seconds / 3600 × watts × PUE / 1000            (Strubell et al. 2019, eq. 1, with one device)
    gCO2e = kWh × grid intensity (g/kWh)

Where the average power comes from, best first:
- GPU: NVML's power reading (`torch.cuda.power_draw`, needs the `pynvml` package), sampled once a
  second during the stage, plus the CPU estimate below for the host.
- CPU, RAPL: the package energy counter in /sys/class/powercap/intel-rapl:0/energy_uj, read before and
  after (on Linux with Intel or AMD Zen; it counts the whole socket, not only this process).
- CPU, estimate: a per-core figure × the cores torch uses. The default, 10 W per core, is a CPU's thermal
  design power divided by its cores for common server parts (AMD EPYC 7763: 280 W / 64 = 4.4 W;
  Intel Xeon Gold 6248: 150 W / 20 = 7.5 W; Xeon Platinum 8380: 270 W / 40 = 6.8 W), rounded up to
  allow for memory and the rest of the board. This is an estimate, not a measurement; say your own with
  CHATFORGE_WATTS_PER_CORE.

Defaults, each changeable by an environment variable:
- grid intensity 475 gCO2e/kWh (CHATFORGE_GRID_G_PER_KWH): the world average of electricity generation
  (IEA, Global Energy & CO2 Status Report 2019), the calculator's fallback when the region is unknown;
  France is about 50, the US about 370, India about 700.
- PUE 1.0 (CHATFORGE_PUE): a machine on a desk has no data-centre overhead; Strubell et al. used 1.58,
  hyperscale data centres report 1.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import threading
import time
from pathlib import Path

import torch

from chatforge.errors import ChatforgeError
from chatforge.train import distributed as dist
from chatforge.train.device import bf16_supported, pick_device

RAPL = Path("/sys/class/powercap/intel-rapl:0")
DEFAULTS = {"CHATFORGE_WATTS_PER_CORE": 10.0, "CHATFORGE_GRID_G_PER_KWH": 475.0, "CHATFORGE_PUE": 1.0}


def setting(name: str) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return DEFAULTS[name]
    try:
        value = float(raw)
    except ValueError:
        raise ChatforgeError(f"environment variable {name}={raw!r}: expected a number") from None
    if value < 0 or (name == "CHATFORGE_PUE" and value < 1):
        raise ChatforgeError(f"environment variable {name}={raw!r}: out of range")
    return value


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def read_rapl_uj() -> int | None:
    """The CPU package's energy counter in microjoules, or None where it is absent or unreadable."""
    try:
        return int((RAPL / "energy_uj").read_text())
    except (OSError, ValueError):
        return None


def co2_record(stage: str, seconds: float, watts: float, device: str, source: str) -> dict:
    """energy.json's fields from wall time and average power (the module docstring's two equations)."""
    pue, grid = setting("CHATFORGE_PUE"), setting("CHATFORGE_GRID_G_PER_KWH")
    seconds, watts = round(seconds, 3), round(watts, 2)
    kwh = seconds / 3600 * watts * pue / 1000
    return {"stage": stage, "seconds": seconds, "device": device, "watts": watts,
            "power_source": source, "pue": pue, "kwh": kwh, "grid_g_per_kwh": grid, "co2_g": kwh * grid}


class GpuSampler(threading.Thread):
    """Averages NVML's power reading once a second while a stage runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.readings: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0 if self.readings else 0.0):
            try:
                self.readings.append(torch.cuda.power_draw() / 1000)  # milliwatts
            except Exception:  # no pynvml, or NVML unavailable: no reading rather than a failed stage
                return


@contextlib.contextmanager
def measure(stage: str, folder: str | Path, accumulate: bool = False):
    """Times the body and writes folder/energy.json, also when the body fails or is interrupted (the
    time was spent), unless the folder was never made. `accumulate`: add to the record already there (a
    resumed stage)."""
    folder = Path(folder)
    cores = torch.get_num_threads()
    rapl_start = read_rapl_uj()
    gpu = GpuSampler() if torch.cuda.is_available() else None
    if gpu:
        gpu.start()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - t0
        rapl_end = read_rapl_uj()
        if rapl_start is not None and rapl_end is not None and rapl_end >= rapl_start and seconds > 0:
            watts, source = (rapl_end - rapl_start) / 1e6 / seconds, "RAPL (CPU package counter)"
        else:
            per_core = setting("CHATFORGE_WATTS_PER_CORE")
            watts, source = per_core * cores, f"estimate: {per_core:g} W/core × {cores} cores"
        device = f"CPU: {cpu_name()} ({torch.backends.cpu.get_cpu_capability()}), {cores} threads"
        world = dist.rank_world()[1]
        if world > 1:  # under torchrun every rank draws its own power; rank 0 writes for all
            watts, source, device = watts * world, f"{source}, × {world} ranks", f"{world} × {device}"
        if gpu:
            gpu.done.set()
            gpu.join()
            if gpu.readings:
                watts += sum(gpu.readings) / len(gpu.readings)
                source += f" + NVML ({len(gpu.readings)} readings)"
            device += f"; GPU: {torch.cuda.get_device_name()}"
        previous = load_energy(folder) if accumulate else None
        if previous:  # a resumed stage: add the time and energy of the earlier attempt(s)
            total = previous["seconds"] + seconds
            watts = (previous["watts"] * previous["seconds"] + watts * seconds) / max(total, 1e-9)
            seconds = total
        if folder.is_dir() and dist.is_main():  # not when the stage failed before it made its folder
            record = co2_record(stage, seconds, watts, device, source)
            # what train.precision = "auto" picks here: numbers differ between bf16 and fp32 machines (issue 20)
            record["auto_precision"] = "bf16" if bf16_supported(pick_device("auto")) else "fp32"
            (folder / "energy.json").write_text(json.dumps(record, indent=2) + "\n")


def load_energy(folder: str | Path) -> dict | None:
    path = Path(folder) / "energy.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
