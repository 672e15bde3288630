"""head.compute_dtype=auto: fp32 on a CPU without bf16 matrix units under a bf16 JSON, the JSON elsewhere."""

from __future__ import annotations

import torch

from megaface.train.build import auto_head_dtype, cpu_has_bf16_units

XEON_AVX512 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw avx512vl\n"
XEON_AMX = "processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n"
EPYC_ZEN4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_flags_decide() -> None:
    assert not cpu_has_bf16_units(XEON_AVX512)
    assert cpu_has_bf16_units(XEON_AMX) and cpu_has_bf16_units(EPYC_ZEN4) and cpu_has_bf16_units(GRAVITON3)
    assert cpu_has_bf16_units("no flags line at all")  # unknown: keep what the JSON asks for


def test_auto_falls_back_to_fp32_only_where_bf16_is_emulated() -> None:
    lines: list[str] = []
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert auto_head_dtype("auto", "bf16", cpu, lines.append, XEON_AVX512) == "fp32"
    assert len(lines) == 1 and "no bf16 matrix units" in lines[0] and "head.compute_dtype=bf16" in lines[0]
    assert auto_head_dtype("auto", "bf16", cpu, lines.append, XEON_AMX) == "auto"  # resolved to bf16 later
    assert auto_head_dtype("auto", "bf16", cuda, lines.append, XEON_AVX512) == "auto"
    assert auto_head_dtype("bf16", "bf16", cpu, lines.append, XEON_AVX512) == "bf16"  # asked for explicitly
    assert auto_head_dtype("auto", "fp32", cpu, lines.append, XEON_AVX512) == "auto"
    assert len(lines) == 1
