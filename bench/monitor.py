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


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started or since reset_peak_rss(): VmHWM, the
    high-water mark of its own address space. Not getrusage's ru_maxrss, which Linux carries over
    fork and exec: a cell started by a 2 GiB process would report 2 GiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: the best there is


def reset_peak_rss() -> None:
    """Set the peak to the present resident memory (Linux 4.0+, /proc/self/clear_refs "5"); where
    that cannot be done the peak stays the process's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class Monitor:
    """Samples this process's CPU use and RSS, and busy %, memory and power of every GPU it computes
    on (dp and model-parallel drive several from one process); reads their energy counters at the
    edges of each timed window (`window_edge`), so energy is that of the timed training alone."""

    def __init__(self, *, cuda_devices: list[int] | None = None, cuda_device: int | None = None,
                 interval_s: float = 0.2):
        self.interval_s = interval_s
        self.proc = psutil.Process()
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="emotion-bench-monitor", daemon=True)
        indices = list(cuda_devices or []) + ([cuda_device] if cuda_device is not None else [])
        handles = [_nvml_handle(i) for i in indices]
        self.nvml = [h for h in handles if h]  # (pynvml, handle) per device NVML can see
        self.devices = [i for i, h in zip(indices, handles) if h]
        self._window_start_mj: list[int | None] | None = None
        self.window_energy_mj: list[int] | None = [0] * len(self.nvml) if self.nvml else None  # per device
        self.windows_closed = 0  # energy is known once a window has closed

    def _energy_mj(self) -> list[int | None]:
        out = []
        for pynvml, h in self.nvml:
            try:
                out.append(int(pynvml.nvmlDeviceGetTotalEnergyConsumption(h)))
            except Exception:
                out.append(None)
        return out

    def window_edge(self, start: bool) -> None:
        """At a timed window's left (start=True) or right edge: the energy counters are read there
        (a host call per device, after the device was synchronised; nothing inside the window)."""
        if not self.nvml:
            return
        now = self._energy_mj()
        if start:
            self._window_start_mj = now
            return
        begun, self._window_start_mj = self._window_start_mj, None
        if begun is None or self.window_energy_mj is None:
            return
        if any(v is None for v in begun + now):
            self.window_energy_mj = None  # a device without a counter: power is integrated instead
            return
        self.window_energy_mj = [e + b - a for e, a, b in zip(self.window_energy_mj, begun, now)]
        self.windows_closed += 1

    def outside_allocator_bytes(self) -> list[int] | None:
        """Per GPU, NVML's memory used less torch's reserved: the CUDA context, NCCL's buffers (and any
        other process on the GPU). None without NVML."""
        if not self.nvml:
            return None
        import torch

        out = []
        for (pynvml, h), index in zip(self.nvml, self.devices):
            try:
                out.append(int(pynvml.nvmlDeviceGetMemoryInfo(h).used) - torch.cuda.memory_reserved(index))
            except Exception:
                return None
        return out

    def _sample(self) -> dict:
        s = {"t": time.perf_counter(), "cpu_percent": psutil.cpu_percent(None), "rss_bytes": self.proc.memory_info().rss,
             "load_1m": psutil.getloadavg()[0],
             "steal_percent": getattr(psutil.cpu_times_percent(None), "steal", None)}  # other guests' share of a VM
        busy, used, power = [], [], []
        for pynvml, h in self.nvml:
            try:
                busy.append(float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu))
                used.append(int(pynvml.nvmlDeviceGetMemoryInfo(h).used))
                power.append(pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0)
            except Exception:
                busy, used, power = [], [], []
                break
        if busy:
            s.update(gpu_busy_percent=busy, gpu_mem_used_bytes=used, gpu_power_w=power)
        return s

    def _run(self) -> None:
        psutil.cpu_percent(None)  # the first calls only start the intervals
        psutil.cpu_times_percent(None)
        while not self._stop.wait(self.interval_s):
            self.samples.append(self._sample())

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self, windows: list[tuple[float, float]]) -> dict:
        """Over the samples inside the timed windows: CPU %, RSS peak; per GPU, busy % (mean), memory
        used (peak), power (mean) and energy; and the process's totals: busy % averaged over its
        GPUs, power and energy summed over them."""
        in_windows = [s for s in self.samples if any(a <= s["t"] <= b for a, b in windows)]
        inside = in_windows or self.samples  # a window shorter than the interval: every sample, said so

        def mean(values):
            vals = [v for v in values if v is not None]
            return sum(vals) / len(vals) if vals else None

        def column(key, i):
            return [s[key][i] for s in inside if key in s]

        per_device = []
        energy_j, source = None, None
        if self.window_energy_mj is not None and self.windows_closed:
            energy_j, source = [e / 1000.0 for e in self.window_energy_mj], "nvml-energy-counter"
        elif self.nvml and self.window_energy_mj is None and windows:  # power integrated over the windows
            energy_j, source = [0.0] * len(self.nvml), "integrated-power"
            for a, b in windows:
                pw = [(s["t"], s["gpu_power_w"]) for s in self.samples if "gpu_power_w" in s and a <= s["t"] <= b]
                for (t1, p1), (t2, p2) in zip(pw, pw[1:]):
                    for i in range(len(energy_j)):
                        energy_j[i] += (t2 - t1) * (p1[i] + p2[i]) / 2
        for i, index in enumerate(self.devices):
            used = column("gpu_mem_used_bytes", i)
            per_device.append({"index": index, "gpu_busy_percent_mean": mean(column("gpu_busy_percent", i)),
                               "gpu_mem_used_peak_bytes": max(used) if used else None,
                               "gpu_power_w_mean": mean(column("gpu_power_w", i)),
                               "gpu_energy_j": energy_j[i] if energy_j else None})
        rss = [s["rss_bytes"] for s in inside]
        powers = [d["gpu_power_w_mean"] for d in per_device]
        return {
            "num_samples": len(inside),
            "samples_in_windows": len(in_windows),  # 0: the means above are over the whole training
            "sample_interval_s": self.interval_s,
            "cpu_percent_mean": mean([s["cpu_percent"] for s in inside]),
            "load_avg_1m_mean": mean([s.get("load_1m") for s in inside]),
            "cpu_steal_percent_mean": mean([s.get("steal_percent") for s in inside]),
            "process_rss_peak_bytes": max(rss) if rss else None,
            "gpu_busy_percent_mean": mean([d["gpu_busy_percent_mean"] for d in per_device]),
            "gpu_mem_used_peak_bytes": max((d["gpu_mem_used_peak_bytes"] or 0 for d in per_device), default=0) or None,
            "gpu_power_w_mean": sum(powers) if powers and None not in powers else None,
            "gpu_energy_j": sum(energy_j) if energy_j else None,
            "gpu_energy_source": source,
            "per_device": per_device,
        }
