"""What `tunelab run` checks before anything heavy loads: the run's data as its method sees it
(``tunelab.data.prepare``), and the metrics.

Importing this module loads neither torch nor transformers (nor does the method registry), so a config or
data error reaches the user in well under a second; ``tunelab.run`` does the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunelab.config import RunConfig
from tunelab.data import TaskData
from tunelab.data.prepare import prepare_task
from tunelab.errors import ConfigError
from tunelab.methods import get_method
from tunelab.metrics import check_names


@dataclass
class Prepared:
    """Everything validated before the first byte is written or the model is loaded."""

    cfg: RunConfig
    method: Any
    method_cfg: Any
    task: TaskData
    metrics: tuple[str, ...]


def prepare(cfg: RunConfig) -> Prepared:
    """Validate config, method options and data; raises TunelabError naming what to fix."""
    method, method_cfg = get_method(cfg.method_name), cfg.method  # options validated when cfg was built
    task = prepare_task(cfg.data, cfg.train.seed, method, method_cfg)
    metric_names = tuple(cfg.eval.metrics or task.metrics)
    check_names(metric_names)
    if cfg.eval.engine == "vllm":
        from tunelab.inference.vllm_support import refusal

        why = refusal(method.name, method.capabilities_for(method_cfg), cfg.model.name)
        if why:
            raise ConfigError(f"eval.engine=vllm: {why}")
    return Prepared(cfg, method, method_cfg, task, metric_names)
