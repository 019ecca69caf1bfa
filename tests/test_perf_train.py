"""Length-grouped batches: deterministic, resumable (pure in (seed, step, lengths)), every example once
per epoch, far less padding than random batches, batch order still random."""

import random

from tunelab.config import TrainConfig
from tunelab.train import batch_indices, step_indices

N, B = 1000, 8
LENGTHS = [random.Random(i).randint(10, 300) for i in range(N)]


def _padding(batches):
    return sum(max(LENGTHS[i] for i in b) * len(b) - sum(LENGTHS[i] for i in b) for b in batches)


def test_grouped_batches_are_a_pure_function_of_seed_step_and_lengths():
    first = [batch_indices(N, B, step, 3, LENGTHS) for step in range(40)]
    # a "resumed" process asks for steps out of order and must get the same batches
    assert [batch_indices(N, B, step, 3, LENGTHS) for step in reversed(range(40))] == first[::-1]
    assert [batch_indices(N, B, s, 4, LENGTHS) for s in range(40)] != first


def test_every_example_once_per_epoch_including_ragged_epochs():
    for n in (N, 997):  # 997: epochs do not end on a batch boundary
        lengths = LENGTHS[:n]
        stream = [i for step in range(3 * n // B) for i in batch_indices(n, B, step, 0, lengths)]
        for epoch in range(2):
            assert sorted(stream[epoch * n:(epoch + 1) * n]) == list(range(n))


def test_grouping_cuts_padding_and_keeps_batch_order_random():
    steps = N // B
    grouped = [batch_indices(N, B, s, 0, LENGTHS) for s in range(steps)]
    plain = [batch_indices(N, B, s, 0) for s in range(steps)]
    assert _padding(grouped) < 0.2 * _padding(plain)
    longest = [max(LENGTHS[i] for i in b) for b in grouped]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)


def test_grad_accum_steps_are_consecutive_micro_batches_and_ungrouped_is_unchanged():
    assert step_indices(N, B, 2, 5, 0, LENGTHS) == batch_indices(N, B, 10, 0, LENGTHS) + batch_indices(N, B, 11, 0, LENGTHS)
    # without lengths the stream is the one older checkpoints were made with
    assert step_indices(N, B, 2, 5, 0) == batch_indices(N, 2 * B, 5, 0)


def test_grouping_is_on_by_default():
    assert TrainConfig().group_by_length is True
