"""Allowed values of config fields whose owning module imports torch (or sits above ``tunelab.config``).

Their one home is here, a module that imports nothing, so ``tunelab.config`` declares ``choice(SCHEDULES)``
with a plain constant and still loads no torch; the module that acts on each value imports it from here.
Lists owned by light modules stay with them (``models.DTYPES``, ``formatting.TEMPLATES``, ``metrics.METRICS``).
"""

from __future__ import annotations

SCHEDULES = ("linear", "constant")  # train.schedule (tunelab.train.lr_lambda)
PRECISIONS = ("fp32", "bf16", "auto")  # train.precision (tunelab.distributed), eval/serve precision (tunelab.precision)
PROTOCOLS = ("standard", "super_ni")  # `tunelab eval --protocol` (tunelab.protocols)
SCHEDULERS = ("continuous", "static")  # `tunelab serve --scheduler` (tunelab.serve.app)
PRUNERS = ("none", "median")  # a tuning grid's pruner (tunelab.compare.pruning)
ENGINES = ("tunelab", "vllm")  # eval.engine, `tunelab serve --engine` (tunelab.inference / inference.vllm_engine)
