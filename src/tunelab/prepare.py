"""What `tunelab run` checks before anything heavy loads: the run's data as its method sees it, and the metrics.

Importing this module loads neither torch nor transformers (nor does the method registry), so a config or
data error reaches the user in well under a second; ``tunelab.run`` does the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tunelab.config import RunConfig
from tunelab.data import TaskData, load_task
from tunelab.methods import get_method
from tunelab.metrics import check_names

if TYPE_CHECKING:
    from tunelab.methods.base import Method, MethodConfig


@dataclass
class Prepared:
    """Everything validated before the first byte is written or the model is loaded."""

    cfg: RunConfig
    method: Any
    method_cfg: Any
    task: TaskData
    metrics: tuple[str, ...]


def prepare_task(cfg: RunConfig, method: Method, method_cfg: MethodConfig) -> TaskData:
    """The run's data as its method sees it: loaded with the run's options, then the method's
    ``prepare_data``, then the caps. Evaluation and serving rebuild demonstrations through this too."""
    task = load_task(cfg.data.task, cfg.data.train, cfg.data.eval, skip_bad=cfg.data.skip_bad,
                     task_cap=cfg.data.task_cap, mixture=cfg.data.mixture, seed=cfg.train.seed,
                     sni_encoding=cfg.data.sni_encoding)
    task = method.prepare_data(method_cfg, task, cfg.train.seed)  # e.g. instruction tuning holds out tasks
    if cfg.data.max_train is not None:
        task.train = task.train[: cfg.data.max_train]
    if cfg.data.max_eval is not None:
        task.eval = task.eval[: cfg.data.max_eval]
    return task


def prepare(cfg: RunConfig) -> Prepared:
    """Validate config, method options and data; raises TunelabError naming what to fix."""
    method, method_cfg = get_method(cfg.method_name), cfg.method  # options validated when cfg was built
    task = prepare_task(cfg, method, method_cfg)
    metric_names = tuple(cfg.eval.metrics or task.metrics)
    check_names(metric_names)
    return Prepared(cfg, method, method_cfg, task, metric_names)
