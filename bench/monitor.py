"""Background utilisation sampler: CPU % and RSS (psutil); GPU busy %, memory, power (NVML).

Samples are timestamped with time.perf_counter so the harness can summarise them over the
timed window only. Without a GPU, or without NVML, the GPU fields are None and nothing fails.
"""
from __future__ import annotations

import threading
import time

import psutil


def _nvml_handle(device_index: int):
    """An NVML handle for a CUDA device, or None when NVML is unusable."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            import torch

            # by PCI address: NVML numbers devices without regard to CUDA_VISIBLE_DEVICES
            p = torch.cuda.get_device_properties(device_index)
            bus_id = f"{p.pci_domain_id:08X}:{p.pci_bus_id:02X}:{p.pci_device_id:02X}.0"
            return pynvml, pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
        except Exception:
            return pynvml, pynvml.nvmlDeviceGetHandleByIndex(device_index)
    except Exception:
        return None


def free_device_bytes(device_index: int) -> int:
    """Free memory of a CUDA device, from NVML where it can: asking CUDA (mem_get_info) would
    create a context on the device, hundreds of MiB that a launcher process would then hold
    while its workers train."""
    handle = _nvml_handle(device_index)
    if handle:
        pynvml, h = handle
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(h).free)
        except Exception:
            pass
    import torch

    return torch.cuda.mem_get_info(device_index)[0]


class Monitor:
    def __init__(self, *, cuda_device: int | None = None, interval_s: float = 0.2):
        self.interval_s = interval_s
        self.proc = psutil.Process()
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="emotion-bench-monitor", daemon=True)
        self.nvml = _nvml_handle(cuda_device) if cuda_device is not None else None
        self.energy_start_mj = self._energy_mj()

    def _energy_mj(self) -> int | None:
        if not self.nvml:
            return None
        pynvml, h = self.nvml
        try:
            return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(h))
        except Exception:
            return None

    def _sample(self) -> dict:
        s = {"t": time.perf_counter(), "cpu_percent": psutil.cpu_percent(None), "rss_bytes": self.proc.memory_info().rss}
        if self.nvml:
            pynvml, h = self.nvml
            try:
                s["gpu_busy_percent"] = float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
                s["gpu_mem_used_bytes"] = int(pynvml.nvmlDeviceGetMemoryInfo(h).used)
                s["gpu_power_w"] = pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0
            except Exception:
                pass
        return s

    def _run(self) -> None:
        psutil.cpu_percent(None)  # the first call only starts the interval
        while not self._stop.wait(self.interval_s):
            self.samples.append(self._sample())

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self, windows: list[tuple[float, float]]) -> dict:
        """Means and peaks over the samples that fall inside the timed windows."""
        inside = [s for s in self.samples if any(a <= s["t"] <= b for a, b in windows)] or self.samples

        def mean(key):
            vals = [s[key] for s in inside if key in s]
            return sum(vals) / len(vals) if vals else None

        def peak(key):
            vals = [s[key] for s in inside if key in s]
            return max(vals) if vals else None

        out = {
            "num_samples": len(inside),
            "sample_interval_s": self.interval_s,
            "cpu_percent_mean": mean("cpu_percent"),
            "process_rss_peak_bytes": peak("rss_bytes"),
            "gpu_busy_percent_mean": mean("gpu_busy_percent"),
            "gpu_mem_used_peak_bytes": peak("gpu_mem_used_bytes"),
            "gpu_power_w_mean": mean("gpu_power_w"),
            "gpu_energy_j": None,
            "gpu_energy_source": None,
        }
        # energy over the whole training (windows and the rest): the counter if the GPU has one,
        # else power integrated over time (trapezoids)
        end = self._energy_mj()
        if self.energy_start_mj is not None and end is not None:
            out["gpu_energy_j"], out["gpu_energy_source"] = (end - self.energy_start_mj) / 1000.0, "nvml-energy-counter"
        else:
            pw = [(s["t"], s["gpu_power_w"]) for s in self.samples if "gpu_power_w" in s]
            if len(pw) >= 2:
                out["gpu_energy_j"] = sum((t2 - t1) * (p1 + p2) / 2 for (t1, p1), (t2, p2) in zip(pw, pw[1:]))
                out["gpu_energy_source"] = "integrated-power"
        return out
