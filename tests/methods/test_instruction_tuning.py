"""Instruction tuning holds out whole tasks: evaluation only on tasks training never saw."""

import pytest

from tunelab.data import Example, TaskData
from tunelab.errors import ConfigError, DataError
from tunelab.methods import method_config


def _task(n_tasks=8, per_task=5):
    rows = [Example(id=f"{t}-{i}", task=f"task{t}", instruction=f"Do task {t}.", input=str(i), output="x")
            for t in range(n_tasks) for i in range(per_task)]
    return TaskData("mix", rows[:], rows[:], ("exact_match",))


def test_held_out_tasks_are_disjoint_from_training_and_interleaved():
    method, config = method_config({"name": "instruction_tuning", "n_held_out": 3})
    task = method.prepare_data(config, _task(), seed=0)
    train_tasks, eval_tasks = {e.task for e in task.train}, {e.task for e in task.eval}
    assert len(eval_tasks) == 3 and train_tasks.isdisjoint(eval_tasks) and len(train_tasks) == 5
    assert config.held_out_tasks == sorted(eval_tasks)
    assert {e.task for e in task.eval[:3]} == eval_tasks  # interleaved: a max_eval cap keeps every task
    again = method.prepare_data(method_config({"name": "instruction_tuning", "n_held_out": 3})[1], _task(), seed=5)
    assert {e.task for e in again.eval} == eval_tasks  # the held-out set does not depend on the seed


def test_named_held_out_tasks_and_per_task_cap():
    method, config = method_config({"name": "instruction_tuning", "held_out_tasks": ["task1", "task2"],
                                    "max_per_task": 2})
    task = method.prepare_data(config, _task(), seed=0)
    assert {e.task for e in task.eval} == {"task1", "task2"}
    assert len(task.train) == 6 * 2
    with pytest.raises(ConfigError, match="held_out_tasks"):
        method.prepare_data(method_config({"name": "instruction_tuning", "held_out_tasks": ["nope"]})[1], _task(), 0)


def test_a_single_task_is_refused_and_weights_option_sets_lr():
    method, config = method_config({"name": "instruction_tuning"})
    with pytest.raises(DataError, match="mixture of tasks"):
        method.prepare_data(config, _task(n_tasks=1), seed=0)
    assert config.lr == 2e-4 and method_config({"name": "instruction_tuning", "weights": "full"})[1].lr == 2e-5
