"""Shared helpers of the benchmarks: timing, environment record, tables, random-weight Inception."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from typing import Callable

import torch


def now() -> float:
    return time.perf_counter()


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device="cpu") -> float:
    """Wall seconds of one call of ``fn`` (device synchronised before and after)."""
    sync(device)
    t0 = now()
    fn()
    sync(device)
    return now() - t0


def timed2(fn: Callable, device="cpu") -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of one call of ``fn``. CPU time is not
    inflated when other processes take the cores, so on a shared machine it is the steadier measure."""
    sync(device)
    c0, t0 = time.process_time(), now()
    fn()
    sync(device)
    return now() - t0, time.process_time() - c0


def median(xs) -> float:
    return float(statistics.median(xs))


def env_info() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    with contextlib.suppress(Exception):
        info["loadavg_at_start"] = os.getloadavg()
    if torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(0)
    return info


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """Fixed-width text table; cols = (key, header, format spec)."""
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        line = []
        for k, _, f in cols:
            v = r.get(k)
            line.append("-" if v is None else (format(v, f) if f else str(v)))
        cells.append(line)
    w = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    out = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(row)) for row in cells]
    out.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(out)


def random_inception(device="cpu") -> torch.nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` (features "2048" and "logits_unbiased", as
    pfdiff_bench.fid uses) with its random initialisation: the weight download is replaced by the
    module's own freshly initialised state dict, so nothing is fetched. Same compute as the real one."""
    import torch_fidelity.feature_extractor_inceptionv3 as fi

    cls = fi.FeatureExtractorInceptionV3
    orig_url, orig_load = fi.load_state_dict_from_url, cls.load_state_dict
    fi.load_state_dict_from_url = lambda *a, **k: {}
    cls.load_state_dict = lambda self, *a, **k: None  # keep the random init
    try:
        net = cls("inception-v3-compat", ["2048", "logits_unbiased"])
    finally:
        fi.load_state_dict_from_url = orig_url
        cls.load_state_dict = orig_load
    return net.to(device).eval().requires_grad_(False)


def inception_images_per_s(device, batch: int, batches: int, repeats: int) -> dict:
    """Feature extraction throughput on uint8 NHWC 32x32 images (CIFAR-10 sample size; the extractor
    resizes to 299x299 itself), through ``pfdiff_bench.evaluation.features.extract`` when present (FID + IS
    accumulators included), else the extractor alone."""
    net = random_inception(device)
    imgs = torch.randint(0, 256, (batch * batches, 32, 32, 3), dtype=torch.uint8)
    try:
        from pfdiff_bench.evaluation.features import extract  # type: ignore

        def run():
            extract([imgs[i * batch:(i + 1) * batch] for i in range(batches)], net, fid=True, isc=True,
                    progress=False)
        how = "pfdiff_bench.evaluation.features.extract (features + FID/IS accumulators)"
    except ImportError:
        @torch.no_grad()
        def run():
            for i in range(batches):
                net(imgs[i * batch:(i + 1) * batch].permute(0, 3, 1, 2).contiguous().to(device))
        how = "FeatureExtractorInceptionV3 forward only"
    with torch.no_grad():
        net(imgs[:min(batch, 2)].permute(0, 3, 1, 2).contiguous().to(device))  # warm-up
    times = [timed(run, device) for _ in range(repeats)]
    n = batch * batches
    return {"batch": batch, "images": n, "repeats": repeats, "seconds": times, "how": how,
            "images_per_s": n / median(times)}


# ------------------------------------------------------------------ FLOPs and utilisation (issue #20)
#: dense peak TFLOP/s per (device-name fragment, precision) for the fraction-of-peak column; None if unknown
PEAK_TFLOPS = {("H100", "fp16"): 989.0, ("H100", "bf16"): 989.0, ("H100", "fp32"): 67.0,
               ("H200", "fp16"): 989.0, ("H200", "bf16"): 989.0, ("H200", "fp32"): 67.0,
               ("A100", "fp16"): 312.0, ("A100", "bf16"): 312.0, ("A100", "fp32"): 19.5}


def peak_tflops(device_name: str, precision: str):
    for (frag, prec), v in PEAK_TFLOPS.items():
        if frag in device_name and prec == precision:
            return v
    return None


def _as4(shape) -> tuple:
    # SDPA takes [..., S, d]: fold the leading dims into (batch, 1 head) for torch's 4-d counters
    n = 1
    for s in shape[:-2]:
        n *= s
    return (n, 1, *shape[-2:])


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(_as4(query_shape), _as4(key_shape), _as4(value_shape))


def _cpu_sdpa_backward_flop(grad_out_shape, out_shape_, query_shape, key_shape, value_shape, *args,
                            out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(_as4(grad_out_shape), _as4(query_shape), _as4(key_shape), _as4(value_shape))


def _cpu_sdpa_mapping() -> dict:
    """torch's FlopCounterMode counts the CUDA SDPA kernels (flash, efficient, cuDNN) but not the CPU one
    (``_scaled_dot_product_flash_attention_for_cpu``, which SDPA dispatches to on CPU), so a CPU count
    would miss the attention matmuls: the same formulas (torch's ``sdpa_flop_count`` and
    ``sdpa_backward_flop_count``) are registered for it here."""
    aten = torch.ops.aten
    out = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        out[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flop
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        out[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward_flop
    return out


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs of one call, counted by torch.utils.flop_counter.FlopCounterMode (forward and any backward
    the call runs, e.g. the classifier's gradient to its input). Matmuls and convolutions only (2 per
    multiply-add), as FlopCounterMode counts; elementwise ops, norms and softmax are not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_mapping()) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def _cpuinfo() -> dict:
    info = {}
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo").read().split("\n\n")[0].splitlines():
            if ":" in line:
                k, v = line.split(":", 1)
                info[k.strip()] = v.strip()
    return info


def cpu_peak_gflops(threads: int) -> dict:
    """Estimated fp32 peak of ``threads`` cores: cores x clock x fp32 lanes per FMA x 2 FLOP per FMA x 2 FMA
    pipes. The clock is cpufreq's maximum where the kernel exposes it, else /proc/cpuinfo's "cpu MHz"
    (under a hypervisor: the nominal clock); lanes from the widest of avx512f / avx2+fma / sse in the flags;
    2 FMA pipes per core is assumed (true of recent Intel and AMD server cores, not read from the CPU).
    AMD Zen 2-4 (family 0x17 model >= 0x30, 0x19) execute 512-bit ops as two 256-bit halves: 8 lanes.
    ``peak_gflops`` is None, with ``reason``, when the clock or the flags cannot be read."""
    ci = _cpuinfo()
    flags = set(ci.get("flags", "").split())
    mhz, src = None, None
    with contextlib.suppress(OSError, ValueError):
        mhz, src = int(open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read()) / 1e3, "cpufreq max"
    if mhz is None and ci.get("cpu MHz"):
        with contextlib.suppress(ValueError):
            mhz, src = float(ci["cpu MHz"]), "/proc/cpuinfo cpu MHz"
    out = {"threads": threads, "model": ci.get("model name"), "clock_mhz": mhz, "clock_source": src,
           "fma_pipes_assumed": 2}
    if mhz is None or not flags:
        return dict(out, peak_gflops=None, reason="clock or CPU flags not readable (no /proc/cpuinfo?): "
                                                  "GFLOP/s reported without a peak")
    lanes = 16 if "avx512f" in flags else 8 if {"avx2", "fma"} <= flags else 4
    with contextlib.suppress(ValueError):
        fam, model = int(ci.get("cpu family", "0")), int(ci.get("model", "0"))
        if ci.get("vendor_id") == "AuthenticAMD" and (fam == 0x19 or (fam == 0x17 and model >= 0x30)):
            lanes = min(lanes, 8)
    peak = threads * mhz / 1e3 * lanes * 2 * 2
    return dict(out, fp32_lanes=lanes, peak_gflops=peak,
                how=f"{threads} cores x {mhz / 1e3:.2f} GHz x {lanes} fp32 lanes x 2 (FMA) x 2 pipes")


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Best achieved GFLOP/s of an n x n float32 matmul on the CPU: the practical ceiling of these cores."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9
