"""Backends without a cluster: per-cell resources from the grid, GPU pinning in the local pool, flag checks."""

from __future__ import annotations

import threading

import pytest

from tunelab.compare.backends import GpuPool, LocalBackend, Resources, check_backend, resolve, visible_gpus
from tunelab.compare.grid import expand, parse_grid
from tunelab.errors import ConfigError, TunelabError

GRID = {"model": {"name": "tiny"}, "methods": [{"name": "icl", "k": 0}], "tasks": ["date_format"]}


def test_grid_resources_are_parsed_checked_and_left_out_of_cell_keys():
    plain = parse_grid(GRID)
    asked = parse_grid({**GRID, "resources": {"gpus": 1, "cpus": "4"}})
    assert Resources(**asked.resources) == Resources(cpus=4, gpus=1.0) and Resources(**plain.resources) == Resources()
    assert [c.key for c in expand(plain)] == [c.key for c in expand(asked)]  # where a cell runs is not what it is
    with pytest.raises(ConfigError, match="unknown config key 'resources.gpu'"):
        parse_grid({**GRID, "resources": {"gpu": 1}})
    with pytest.raises(ConfigError, match="resources.cpus: 0 is out of range"):
        parse_grid({**GRID, "resources": {"cpus": 0}})


def test_unset_resources_come_from_the_backend_defaults():
    assert resolve(Resources(gpus=2), Resources(cpus=8, gpus=1)) == Resources(cpus=8, gpus=2)
    assert LocalBackend(workers=2, gpu_ids=["0", "1"]).defaults().gpus == 1
    cpu_only = LocalBackend(workers=2, gpu_ids=[]).defaults()
    assert cpu_only.gpus == 0 and cpu_only.cpus >= 1


def test_visible_gpus_keeps_the_users_device_list():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "3, 5"}, count=8) == ["3", "5"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, count=8) == []
    assert visible_gpus({}, count=3) == ["0", "1", "2"]


def test_gpu_pool_hands_out_disjoint_ids_and_refuses_too_many():
    pool = GpuPool(["0", "1", "2"])
    a, b = pool.acquire(2), pool.acquire(1)
    assert a == ["0", "1"] and b == ["2"] and not pool.free
    pool.release(a)
    assert sorted(pool.acquire(2)) == ["0", "1"]
    with pytest.raises(TunelabError, match="asks for 4 GPUs but this machine shows 3"):
        pool.acquire(4)


_barrier = threading.Barrier(2, timeout=30)


def _hold(i: int, *, gpus: list[str] | None) -> tuple[int, list[str] | None]:
    if i < 2:
        _barrier.wait()  # the first two units run at the same time: their GPUs must not overlap
    return i, gpus


def test_local_pool_pins_each_running_cell_to_its_own_gpus():
    backend = LocalBackend(workers=2, gpu_ids=["0", "1", "2", "3"])
    for i in range(4):
        backend.submit(i, _hold, i, resources=Resources(gpus=2))
    got = {d.tag: d.value[1] for d in backend.results()}
    backend.close()
    assert all(len(ids) == 2 for ids in got.values())
    assert not set(got[0]) & set(got[1])  # concurrent: disjoint
    assert sorted(got[0] + got[1]) == ["0", "1", "2", "3"]


def test_local_pool_on_a_cpu_machine_pins_nothing_and_refuses_fractions():
    backend = LocalBackend(workers=1, gpu_ids=[])
    backend.submit("a", _hold, 9, resources=Resources(gpus=0))
    assert [d.value for d in backend.results()] == [(9, None)]
    with pytest.raises(ConfigError, match="pins whole GPUs"):
        backend.submit("b", _hold, 9, resources=Resources(gpus=0.5))
    backend.close()


def test_backend_flags_are_checked_before_the_grid_runs():
    with pytest.raises(ConfigError, match="unknown backend 'slurm'"):
        check_backend("slurm")
    with pytest.raises(ConfigError, match="--address is for --backend ray"):
        check_backend("local", address="auto")
    with pytest.raises(ConfigError, match="--workers is for the local pool"):
        check_backend("ray", workers=2)


def test_an_address_nobody_listens_on_fails_in_seconds():
    pytest.importorskip("ray", reason="needs ray: pip install 'tunelab[ray]'")
    from tunelab.compare.backends import _check_reachable

    with pytest.raises(TunelabError, match="cannot reach a Ray cluster at --address 127.0.0.1:9"):
        _check_reachable("127.0.0.1:9")
    _check_reachable("auto")  # resolved by Ray itself (the cluster started on this machine)


def test_a_cell_whose_ray_worker_kept_dying_is_stored_with_why():
    ray = pytest.importorskip("ray", reason="needs ray: pip install 'tunelab[ray]'")
    from tunelab.compare.backends import _ray_error

    message = _ray_error(ray.exceptions.WorkerCrashedError(), retries=3)
    assert message.startswith("the Ray worker running the cell died 4 times (WorkerCrashedError")


_four = threading.Barrier(4, timeout=30)


def _together(i: int, *, gpus: list[str] | None) -> tuple[list[str] | None, float | None]:
    _four.wait()  # all four units hold their GPU at once
    return gpus, getattr(gpus, "memory_fraction", None)


def test_one_gpu_runs_several_cells_at_once_each_capped_at_its_share(monkeypatch):
    import torch

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one card, no CUDA_VISIBLE_DEVICES
    backend = LocalBackend(workers=4)
    for i in range(4):
        backend.submit(i, _together, i, resources=backend.defaults())
    got = [d.value for d in backend.results()]
    backend.close()
    assert got == [(["0"], 0.25)] * 4


def test_several_gpus_pin_one_cell_per_card_with_no_cap():
    backend = LocalBackend(workers=4, gpu_ids=["0", "1", "2", "3"])
    for i in range(4):
        backend.submit(i, _together, i, resources=backend.defaults())
    got = [d.value for d in backend.results()]
    backend.close()
    assert sorted(ids[0] for ids, _ in got) == ["0", "1", "2", "3"] and {f for _, f in got} == {None}


def test_a_shared_pool_spreads_cells_and_gives_multi_gpu_cells_whole_cards():
    pool = GpuPool(["0", "1"], share=2)
    a, b, c = pool.acquire(1), pool.acquire(1), pool.acquire(1)
    assert [a, b, c] == [["0"], ["1"], ["0"]] and a.memory_fraction == 0.5  # least loaded card first
    assert pool.free == []
    pool.release(a), pool.release(b)
    assert pool.free == ["1"]  # card 0 still runs c
    pool.release(c)
    whole = pool.acquire(2)
    assert whole == ["0", "1"] and whole.memory_fraction is None and pool.free == []
    pool.release(whole)
    assert pool.free == ["0", "1"]


def test_pin_sets_the_cells_gpus_and_share_and_clears_an_inherited_share():
    from tunelab.compare.backends import Gpus, pin, ray_gpus
    from tunelab.distributed import MEMORY_FRACTION_ENV

    env = {MEMORY_FRACTION_ENV: "0.5"}  # left by another cell in a forked child
    pin(["1"], env)
    assert env == {"CUDA_VISIBLE_DEVICES": "1"}
    pin(Gpus(["0"], memory_fraction=1 / 3), env)
    assert env == {"CUDA_VISIBLE_DEVICES": "0", MEMORY_FRACTION_ENV: "0.333333"}
    pin(None, env)  # no GPUs on the machine: left alone
    assert env["CUDA_VISIBLE_DEVICES"] == "0"
    # Ray: a task with num_gpus=0.25 shares its card, capped at a quarter; whole GPUs are its own
    assert ray_gpus(["0"], 0.25).memory_fraction == 0.25 and ray_gpus(["0"], 1).memory_fraction is None


def test_the_share_survives_the_trip_to_the_cells_process():
    import pickle

    from tunelab.compare.backends import Gpus

    back = pickle.loads(pickle.dumps(Gpus(["0"], memory_fraction=0.25)))
    assert back == ["0"] and back.memory_fraction == 0.25
