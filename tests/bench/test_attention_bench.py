"""The attention timing table: every path runs at a small shape, and the GEMM-free path leaves quant.attention as
it found it."""
import math

from bench.attention import attention_paths, attention_table
from quant import attention


def test_every_attention_path_is_timed_and_int8_attention_is_left_intact():
    original = attention._batched_int_matmul
    table = attention_table(keys=(24,), reps=1, queries=16, heads=2)
    assert set(table) == {24}
    assert set(table[24]) == set(attention_paths(24, queries=16, heads=2))
    assert {"fp32 SDPA", "int8 integer", "int8 without its GEMMs", "int8 GEMMs: _int_mm per head"} <= set(table[24])
    assert all(math.isfinite(ms) and ms > 0 for ms in table[24].values())
    assert attention._batched_int_matmul is original


def test_the_gemm_free_path_returns_an_attention_shaped_result():
    out = attention_paths(24, queries=16, heads=2)["int8 without its GEMMs"]()
    assert out.shape == (2, 2, 16, 64)
