"""metrics.jsonl rows, resume truncation, TensorBoard mirroring, progress text, memory."""

import json
import sys
import types

import torch

from peftchat.train.metrics import MetricsLogger, format_postfix, peak_memory_gb, perplexity


def test_rows_and_truncation(tmp_path):
    log = MetricsLogger(tmp_path)
    for step in (1, 2, 3):
        log.log({"step": step, "loss": 1.0 / step, "lr": 0.1})
    log.log({"step": 3, "eval_loss": 0.5, "eval_ppl": perplexity(0.5)})
    log.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "lo')  # a line cut short by a crash
    MetricsLogger.truncate_after(tmp_path, 2)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 1.0, "lr": 0.1}, {"step": 2, "loss": 0.5, "lr": 0.1}]


def test_tensorboard_gets_the_numbers_when_installed(tmp_path, monkeypatch):
    written = []

    class FakeWriter:
        def __init__(self, logdir):
            self.logdir = logdir

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

        def close(self):
            written.append("closed")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    log = MetricsLogger(tmp_path, tensorboard=True)
    log.log({"step": 5, "loss": 2.0, "lr": 1e-3, "note": "text is skipped"})
    log.log({"step": 5, "eval_loss": 1.5})
    log.close()
    assert written == [("train/loss", 2.0, 5), ("train/lr", 1e-3, 5), ("eval/eval_loss", 1.5, 5), "closed"]
    assert MetricsLogger(tmp_path, tensorboard=False)._tb is None


def test_progress_text_and_memory():
    assert format_postfix(2.31412, 1.9e-4, 5210.4, 3.214) == "loss 2.3141 | lr 1.90e-04 | 5,210 tok/s | mem 3.21 GiB"
    gb, kind = peak_memory_gb(torch.device("cpu"))
    assert kind == "peak_rss" and 0.01 < gb < 64
    assert perplexity(0.0) == 1.0 and perplexity(1e4) == float("inf")


def test_interval_meter_means_over_its_steps_and_restarts():
    from peftchat.train.metrics import IntervalMeter

    meter = IntervalMeter(torch.device("cpu"))
    meter.add(torch.tensor(2.0, dtype=torch.float64), tokens=100, step_time_s=0.5)
    meter.add(torch.tensor(4.0, dtype=torch.float64), tokens=300, step_time_s=1.5)
    assert meter.take() == (3.0, 200.0)
    meter.add(torch.tensor(1.0, dtype=torch.float64), tokens=10, step_time_s=1.0)
    assert meter.take() == (1.0, 10.0)  # nothing of the previous interval left


def test_last_row_value_reads_the_run_across_resumes(tmp_path):
    from peftchat.train.metrics import last_row_value

    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 3.0}\n{"step": 2, "eval_loss": 2.5}\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo'
    )
    assert last_row_value(tmp_path, "loss") == 2.0 and last_row_value(tmp_path, "loss", first=True) == 3.0
    assert last_row_value(tmp_path, "eval_loss") == 2.5 and last_row_value(tmp_path / "none", "loss") is None
