"""A run's data as its method sees it: loaded with the run's ``data`` options, then the method's
``prepare_data``, then the caps. `tunelab run` prepares its data through this, and evaluation, serving and
export rebuild a saved run's rows (its demonstration pool, its teacher rows) through it too, from the
run's saved ``data`` section and seed: one preparation, so they see exactly the run's rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunelab.data import TaskData, load_task

if TYPE_CHECKING:
    from tunelab.methods.base import Method, MethodConfig
    from tunelab.sections import DataConfig


def prepare_task(data: DataConfig, seed: int, method: Method, method_cfg: MethodConfig) -> TaskData:
    """``data.task`` (or its explicit train/eval files) loaded, adjusted by the method (instruction tuning
    holds out whole tasks), then cut to ``data.max_train`` / ``data.max_eval``."""
    task = load_task(data.task, data.train, data.eval, skip_bad=data.skip_bad, task_cap=data.task_cap,
                     mixture=data.mixture, seed=seed, sni_encoding=data.sni_encoding)
    task = method.prepare_data(method_cfg, task, seed)
    if data.max_train is not None:
        task.train = task.train[: data.max_train]
    if data.max_eval is not None:
        task.eval = task.eval[: data.max_eval]
    return task
