"""What `compute_dtype: auto` means on a CPU, read from its flags (config.policy)."""

from __future__ import annotations

import pytest

from qsweep.config import policy


@pytest.mark.parametrize("flags,expected", [
    ({"avx512f", "amx_bf16", "avx512_bf16"}, "bfloat16"),  # Xeon Sapphire Rapids and later
    ({"avx512f", "avx512_bf16"}, "bfloat16"),  # AMD EPYC Zen 4, Xeon Cooper Lake
    ({"avx512f", "avx2"}, "float32"),  # bf16 would be emulated
])
def test_a_cpu_computes_in_bf16_where_it_has_bf16_instructions(monkeypatch, flags, expected):
    monkeypatch.setattr(policy, "_cpu_flags", lambda: flags)
    policy.fastest_compute_dtype.cache_clear()
    try:
        assert policy.fastest_compute_dtype("cpu")[0] == expected
        assert policy.scoring_dtype("auto", "cpu") == expected
        assert policy.scoring_dtype("float32", "cpu") == "float32"
    finally:
        policy.fastest_compute_dtype.cache_clear()
