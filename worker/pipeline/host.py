"""The machine a job runs on, as the report states it: ``measured_on`` and ``target_match``.

A latency figure is only worth what the hardware it was timed on: a ``cpu-arm`` job compressed on
x86 or under qemu, or a ``gpu`` job timed on the CPU provider, says nothing about its target.
This module owns the facts the report gives about the host and every choice the pipeline made
from the host's CPU:

- ``cpu_info()``: architecture, CPU model, the ISA features that decide something (x86: AVX2,
  AVX-512, VNNI, AVX-512 FP16; aarch64: NEON, dotprod, fp16 arithmetic, i8mm), cores this process
  may use, and whether it runs emulated (qemu-user);
- ``cuda_problem()``: why CUDA cannot run a model here, or None - proved by running a small model
  on the CUDA execution provider alone, never by listing providers (onnxruntime-gpu lists the CUDA
  provider on a machine without a driver, then quietly runs everything on the CPU);
- ``provider_for(target)``: the provider a job for ``target`` is measured with;
- ``note_choice(options, ...)``: a choice made from the host's CPU, recorded in the step context's
  options so the report names the feature it read (``measured_on.choices``);
- ``measured_on(...)`` / ``target_match(...)`` / ``target_notice(...)``: the report's fields.

Emulation: set ``FEATHERWEIGHT_EMULATED=1`` where a worker runs under an emulator; without it, a
qemu-user binfmt handler registered for this process's own architecture means this architecture is
not the kernel's (a kernel registers qemu only for foreign ones).
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, MutableMapping

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
GPU_PROVIDERS = (CUDA_PROVIDER, TENSORRT_PROVIDER)
CHOICES_KEY = "host_choices"         # ctx.options key holding the choices made from this host's CPU

X86_MACHINES = frozenset({"x86_64", "amd64", "i686", "x86"})
ARM_MACHINES = frozenset({"aarch64", "arm64", "armv8l", "armv8b"})
# /proc/cpuinfo flag -> the name the report gives it (x86 "flags", aarch64 "Features")
X86_FEATURES = {"avx2": "avx2", "fma": "fma", "avx512f": "avx512", "avx512_vnni": "vnni", "avx_vnni": "vnni",
                "amx_int8": "amx_int8", "avx512_fp16": "fp16", "f16c": "f16c"}
ARM_FEATURES = {"asimd": "neon", "asimddp": "dotprod", "asimdhp": "fp16", "i8mm": "i8mm", "sve": "sve"}


@dataclass(frozen=True)
class CpuInfo:
    machine: str                          # platform.machine(), lower case
    arch: str                             # "x86_64" | "aarch64" | what the machine says
    model: str
    features: dict[str, bool] = field(default_factory=dict)
    flags: frozenset[str] = frozenset()
    cores: int = 1
    emulated: bool = False

    def has(self, feature: str) -> bool:
        return bool(self.features.get(feature))


def _cpuinfo_fields(text: str) -> dict[str, str]:
    """The first processor's ``key: value`` lines of /proc/cpuinfo."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    return fields


def _emulated(machine: str) -> bool:
    forced = os.environ.get("FEATHERWEIGHT_EMULATED", "").strip().lower()
    if forced in ("1", "true", "yes"):
        return True
    if forced in ("0", "false", "no"):
        return False
    name = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(machine, machine)
    return Path(f"/proc/sys/fs/binfmt_misc/qemu-{name}").exists()


# aarch64 AT_HWCAP / AT_HWCAP2 bits (the kernel's asm/hwcap.h), for where /proc/cpuinfo is the
# host's (qemu-user shows the x86 host's file): what the emulated CPU offers, as ORT itself reads it
ARM_HWCAP = {"asimd": 1 << 1, "asimdhp": 1 << 10, "asimddp": 1 << 20, "sve": 1 << 22}
ARM_HWCAP2 = {"i8mm": 1 << 13}


def _arm_hwcap_flags() -> frozenset[str]:
    try:
        import ctypes

        getauxval = ctypes.CDLL(None).getauxval
        getauxval.restype = ctypes.c_ulong
        hwcap, hwcap2 = getauxval(16), getauxval(26)     # AT_HWCAP, AT_HWCAP2
    except (OSError, AttributeError):
        return frozenset()
    return frozenset([f for f, bit in ARM_HWCAP.items() if hwcap & bit] + [f for f, bit in ARM_HWCAP2.items() if hwcap2 & bit])


def parse_cpu(text: str, machine: str, cores: int = 1, emulated: bool = False,
              hwcap_flags: frozenset[str] | None = None) -> CpuInfo:
    """A CpuInfo from /proc/cpuinfo's text and the machine name (separate for tests);
    ``hwcap_flags``: aarch64 features from the auxiliary vector, used where cpuinfo has none."""
    machine = machine.lower()
    fields = _cpuinfo_fields(text)
    flags = frozenset((fields.get("flags") or fields.get("features") or "").split())
    if machine in X86_MACHINES:
        arch, names = "x86_64", X86_FEATURES
    elif machine in ARM_MACHINES:
        arch, names = "aarch64", ARM_FEATURES
    else:
        arch, names = machine, {}
    foreign = arch == "aarch64" and "features" not in fields    # the host's x86 cpuinfo under qemu
    if foreign:
        flags = frozenset(hwcap_flags or ())
    features = {name: False for name in names.values()}
    for flag, name in names.items():
        if flag in flags:
            features[name] = True
    model = fields.get("model name") or fields.get("hardware") or ""
    if not model and "cpu implementer" in fields:      # aarch64 kernels name the part, not the model
        model = f"implementer {fields['cpu implementer']} part {fields.get('cpu part', '?')}"
    if foreign:
        model = f"emulated aarch64 on {model or 'an unknown host CPU'}"
    return CpuInfo(machine=machine, arch=arch, model=model or platform.processor() or machine,
                   features=features, flags=flags, cores=max(1, cores), emulated=emulated)


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    machine = platform.machine().lower()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:          # not Linux: no flags known
        text = ""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    hwcap = _arm_hwcap_flags() if machine in ARM_MACHINES else None
    return parse_cpu(text, machine, cores=cores, emulated=_emulated(machine), hwcap_flags=hwcap)


# ---------------------------------------------------------------------------- GPU


def _tiny_model() -> bytes:
    """Y = MatMul(X, W) + 1 in float32: small, but a real CUDA kernel (cuBLAS) and a real copy."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4) / 16, "W")
    one = numpy_helper.from_array(np.ones((1,), np.float32), "one")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["XW"]), helper.make_node("Add", ["XW", "one"], ["Y"])],
        "cuda_probe", [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [2, 4])], initializer=[w, one])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8).SerializeToString()


def probe_cuda() -> str | None:
    """Run the tiny model on the CUDA provider with the CPU fallback disabled; None when it ran
    there and gave the right numbers, else why not (one line)."""
    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError as exc:
        return f"onnxruntime is not installed ({exc})"
    if CUDA_PROVIDER not in ort.get_available_providers():
        return (f"this ONNX Runtime ({ort.__version__}, {ort.get_device()}) has no {CUDA_PROVIDER}: "
                "install the gpu extra (pip install 'featherweight[gpu]') on a machine with an NVIDIA GPU")
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:    # CUDA and cuDNN from the nvidia-* wheels of onnxruntime-gpu[cuda,cudnn], where installed
            preload()
        except Exception:  # noqa: BLE001 - the session below reports what is really missing
            pass
    options = ort.SessionOptions()
    options.log_severity_level = 4
    # every node must run on the GPU: a session that quietly put them on the CPU proves nothing
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    try:
        session = ort.InferenceSession(_tiny_model(), options, providers=[CUDA_PROVIDER])
        if session.get_providers()[0] != CUDA_PROVIDER:
            return f"ONNX Runtime did not start {CUDA_PROVIDER} (it offered {session.get_providers()})"
        y = session.run(None, {"X": x})[0]
    except Exception as exc:   # ORT raises its own types (a missing libcudart, no device, a driver too old)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"{CUDA_PROVIDER} cannot run a model here: {first}"
    expected = x @ (np.arange(16, dtype=np.float32).reshape(4, 4) / 16) + 1
    if not np.allclose(y, expected, rtol=1e-3, atol=1e-3):
        return f"{CUDA_PROVIDER} ran a test model with wrong results"
    return None


@lru_cache(maxsize=1)
def cuda_problem() -> str | None:
    """``probe_cuda()`` once per process (a CUDA context costs seconds)."""
    return probe_cuda()


def tensorrt_present() -> bool:
    """True where this ONNX Runtime offers TensorRT and CUDA runs (TensorRT builds on CUDA)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return TENSORRT_PROVIDER in ort.get_available_providers() and cuda_problem() is None


def provider_for(target: str) -> str:
    """The provider a job for ``target`` is evaluated and timed with: CUDA for ``gpu`` where it
    proved to run, the CPU provider otherwise (the report then says the target was not matched)."""
    if target == "gpu" and cuda_problem() is None:
        return CUDA_PROVIDER
    return CPU_PROVIDER


def require_target(target: str, allow_mismatch: bool = False) -> None:
    """Refuse (``TargetUnavailable`` at ``target``) a ``gpu`` job where CUDA cannot run, unless
    the request allowed measuring on other hardware: gpu never silently becomes CPU."""
    if allow_mismatch:
        return
    refusal = gpu_refusal(target)
    if refusal is not None:
        from core.errors import TargetUnavailable

        raise TargetUnavailable(refusal, [{"loc": ["target"], "msg": refusal}])


def probe_cuda_isolated(timeout: float = 180.0) -> str | None:
    """``probe_cuda()`` in a child interpreter: a CUDA context made before a fork is unusable in the
    forked children (the worker's job processes), so the worker's main process never makes one."""
    import json
    import subprocess
    import sys

    try:
        done = subprocess.run([sys.executable, "-m", "worker.pipeline.host", "--probe-cuda"], capture_output=True,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return f"running a test model on {CUDA_PROVIDER} took longer than {timeout:.0f} s"
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"the CUDA probe process failed (exit {done.returncode}): {tail}"
    return json.loads(lines[-1])["problem"]


def gpu_refusal(target: str) -> str | None:
    """The one-line reason a ``gpu`` job cannot run on this host, or None."""
    if target != "gpu":
        return None
    problem = cuda_problem()
    if problem is None:
        return None
    return (f"target gpu needs CUDA, and this host cannot run it ({problem}); "
            "pass --allow-target-mismatch (REST: allow_target_mismatch) to compress for gpu on this CPU anyway")


# ---------------------------------------------------------------------------- choices and the report


def note_choice(options: MutableMapping[str, Any] | None, choice: str, value: Any, read: str) -> None:
    """Record that ``choice`` took ``value`` because of ``read`` (the host feature it looked at)."""
    if options is None:
        return
    entry = {"choice": choice, "value": value, "read": read}
    choices = options.setdefault(CHOICES_KEY, [])
    if entry not in choices:
        choices.append(entry)


def feature_text(cpu: CpuInfo, *names: str) -> str:
    """"vnni absent on x86_64 (Intel Xeon ...)" - the features read, as the report names them."""
    parts = [f"{name} {'present' if cpu.has(name) else 'absent'}" for name in names]
    return f"{', '.join(parts)} on this host's {cpu.arch} CPU ({cpu.model})"


def _target_arch(target: str) -> str | None:
    return {"cpu-x86": "x86_64", "cpu-arm": "aarch64"}.get(target)


def target_match(target: str, provider: str, cpu: CpuInfo | None = None) -> bool:
    """True when the figures were measured on the target's kind of hardware: the target's
    architecture natively (never emulated) on the CPU provider, or a GPU provider for ``gpu``."""
    cpu = cpu or cpu_info()
    if target == "gpu":
        return provider in GPU_PROVIDERS
    return provider == CPU_PROVIDER and cpu.arch == _target_arch(target) and not cpu.emulated


def target_notice(target: str, provider: str, cpu: CpuInfo | None = None, allowed_mismatch: bool = False) -> str | None:
    """The sentence report.html and the CLI show when the figures are not the target's."""
    cpu = cpu or cpu_info()
    if target_match(target, provider, cpu):
        return None
    where = f"{cpu.arch} ({cpu.model}){' under emulation' if cpu.emulated else ''} with {provider}"
    notice = (f"Latency was not measured on the target's hardware: target {target}, measured on {where}. "
              f"The latency figures describe this host, not {target}; size and fidelity still hold.")
    if cpu.emulated:
        notice += " Emulated timings are not a performance figure."
    if allowed_mismatch:
        notice += " The target mismatch was allowed by the request (allow_target_mismatch)."
    return notice


def onnxruntime_version() -> str:
    try:
        import onnxruntime as ort
    except ImportError:
        return "not installed"
    return ort.__version__


def measured_on(provider: str, options: MutableMapping[str, Any] | None = None, cpu: CpuInfo | None = None) -> dict[str, Any]:
    """report.json's ``measured_on``: where every figure of this report was measured."""
    cpu = cpu or cpu_info()
    return {
        "architecture": cpu.arch,
        "cpu_model": cpu.model,
        "isa": dict(cpu.features),
        "cores": cpu.cores,
        "onnxruntime": onnxruntime_version(),
        "execution_provider": provider,
        "emulated": cpu.emulated,
        "choices": list((options or {}).get(CHOICES_KEY, [])),
    }


if __name__ == "__main__":   # python -m worker.pipeline.host --probe-cuda (see probe_cuda_isolated)
    import json
    import sys

    if sys.argv[1:] != ["--probe-cuda"]:
        sys.exit("usage: python -m worker.pipeline.host --probe-cuda")
    print(json.dumps({"problem": probe_cuda()}))
