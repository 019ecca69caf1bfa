"""The machine a result names (``envinfo.machine``): read from /proc/cpuinfo, one line to print."""

from __future__ import annotations

import pytest

from tunelab import envinfo

ZEN4 = ["processor\t: 0", "model name\t: AMD EPYC 9R14", "flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16",
        "", "processor\t: 1", "model name\t: AMD EPYC 9R14", "flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16"]
ZEN3 = ["model name\t: AMD EPYC 7R13", "flags\t\t: fpu sse2 avx avx2 fma"]
SAPPHIRE = ["model name\t: Intel(R) Xeon(R) Platinum 8488C", "flags\t\t: avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile"]
GRAVITON = ["processor\t: 0", "Features\t: fp asimd evtstrm aes", "CPU implementer\t: 0x41"]


@pytest.mark.parametrize(("lines", "cpu", "isa"), [
    (ZEN4, "AMD EPYC 9R14", "avx512_bf16"),
    (ZEN3, "AMD EPYC 7R13", "avx2"),  # the AVX2-only kind, where bf16 GEMM runs ~6x slower than fp32
    (SAPPHIRE, "Intel(R) Xeon(R) Platinum 8488C", "amx_bf16"),  # the widest flag present wins
    (GRAVITON, None, "asimd"),  # ARM: no model name line, flags under "Features"
    ([], None, None),  # no /proc/cpuinfo (macOS, Windows)
])
def test_machine_names_the_cpu_and_its_widest_speed_flag(monkeypatch, lines, cpu, isa):
    monkeypatch.setattr(envinfo, "_cpuinfo", lambda: lines)
    facts = envinfo.machine()
    assert facts["isa"] == isa and facts["cores"] and facts["arch"]
    assert facts["cpu"] == (cpu or facts["cpu"]) and facts["cpu"]  # a fallback name where cpuinfo has none
    assert "gpu" not in facts or facts["gpu"]


def test_describe_machine_is_one_line_and_says_unknown_for_older_results():
    assert envinfo.describe_machine({"cpu": "AMD EPYC 9R14", "cores": 2, "arch": "x86_64", "isa": "avx512_bf16"}) \
        == "AMD EPYC 9R14, 2 cores, avx512_bf16"
    assert envinfo.describe_machine({"cpu": "Intel Xeon", "cores": 16, "isa": "avx512f", "gpu": "NVIDIA H100"}) \
        == "Intel Xeon, 16 cores, avx512f, GPU NVIDIA H100"
    assert envinfo.describe_machine({"cpu": "x", "cores": 4, "isa": None}) == "x, 4 cores"
    assert envinfo.describe_machine({"cpu": "x", "cores": 2, "isa": "avx2", "note": "from the log"}) \
        == "x, 2 cores, avx2 (from the log)"
    assert envinfo.describe_machine(None) == envinfo.describe_machine({}) == "unknown"


def test_this_machine_is_described_from_its_own_cpuinfo():
    facts = envinfo.machine()
    assert envinfo.describe_machine(facts).startswith(facts["cpu"])
    assert facts["isa"] is None or facts["isa"] in envinfo.cpu_flags()
