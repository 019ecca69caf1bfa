"""`GET /metrics` of `tunelab serve` in the Prometheus text exposition format (no client library needed).

Counters: requests by route and status, generated tokens, finished rows by reason. Gauges: queue length,
running rows. Histograms: batch occupancy per decode step, time to first token, time per output token.
"""

from __future__ import annotations

import threading
from collections import defaultdict

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_OCCUPANCY_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Counter:
    """A monotone counter, optionally split by one label value."""

    def __init__(self, name: str, help_text: str, label: str | None = None) -> None:
        self.name, self.help, self.label = name, help_text, label
        self._values: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    def inc(self, label_value: str = "", amount: float = 1.0) -> None:
        with self._lock:
            self._values[label_value] += amount

    def value(self, label_value: str = "") -> float:
        return self._values.get(label_value, 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            items = sorted(self._values.items()) or [("", 0.0)] * (self.label is None)
            for value, count in items:
                labels = f'{{{self.label}="{value}"}}' if self.label else ""
                lines.append(f"{self.name}{labels} {count:g}")
        return lines


class LabelledCounter(Counter):
    """A counter split by several labels, given as one preformatted ``a="x",b="y"`` string."""

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            lines += [f"{self.name}{{{labels}}} {count:g}" for labels, count in sorted(self._values.items())]
        return lines


class Gauge:
    """A value that goes up and down."""

    def __init__(self, name: str, help_text: str) -> None:
        self.name, self.help, self.current = name, help_text, 0.0

    def set(self, value: float) -> None:
        self.current = float(value)

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {self.current:g}"]


class Histogram:
    """Cumulative buckets, sum and count, as Prometheus histograms are exposed."""

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * len(buckets)
        self.sum, self.count = 0.0, 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.sum += value
            self.count += 1
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self.counts[i] += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            lines += [f'{self.name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts, strict=True)]
            lines += [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {self.sum:g}",
                      f"{self.name}_count {self.count}"]
        return lines


class ServeMetrics:
    """Everything `/metrics` exposes; the scheduler and the app update it from their threads."""

    def __init__(self) -> None:
        self.requests = LabelledCounter("tunelab_requests_total", "HTTP requests by route and status code")
        self.tokens = Counter("tunelab_generated_tokens_total", "tokens generated")
        self.prompt_tokens = Counter("tunelab_prompt_tokens_total", "prompt tokens prefilled")
        self.finished = Counter("tunelab_rows_finished_total", "rows that left the batch, by reason", "reason")
        self.decode_steps = Counter("tunelab_decode_steps_total", "decode steps run, by step backend "
                                    "(inference.steps: native | torch | transformers; vllm: one step of vLLM's engine, "
                                    "--engine vllm)", "step")
        self.queue_length = Gauge("tunelab_queue_length", "requests waiting to join the running batch")
        self.running = Gauge("tunelab_running_rows", "rows in the running batch")
        self.batch_occupancy = Histogram("tunelab_batch_occupancy", "running rows per decode step",
                                         _OCCUPANCY_BUCKETS)
        self.ttft = Histogram("tunelab_time_to_first_token_seconds", "time from request to its first token",
                              _LATENCY_BUCKETS)
        self.tpot = Histogram("tunelab_time_per_output_token_seconds",
                              "time per output token after the first", _LATENCY_BUCKETS)

    def render(self) -> str:
        """The text exposition format (``text/plain; version=0.0.4``)."""
        parts: list[Counter | Gauge | Histogram] = [self.requests, self.tokens, self.prompt_tokens, self.finished,
                                                     self.decode_steps, self.queue_length, self.running,
                                                     self.batch_occupancy, self.ttft, self.tpot]
        return "\n".join(line for part in parts for line in part.render()) + "\n"
