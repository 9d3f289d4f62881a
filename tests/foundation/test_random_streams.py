"""safeprune.utils' keyed random streams and learning-rate schedule: pure functions of their key / step, and
equal to the formulas they replaced, so refactoring onto them moved no number (the toy demo's included)."""

import math
import zlib

import numpy as np
import torch

from safeprune.utils import numpy_rng, torch_rng, warmup_cosine


def test_numpy_streams_are_keyed_and_match_the_toy_worlds_historical_seeding():
    a, b = numpy_rng(3, "finetune", 7).random(4), numpy_rng(3, "finetune", 7).random(4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, numpy_rng(3, "finetune", 8).random(4))
    assert not np.array_equal(a, numpy_rng(3, "concept", 7).random(4))
    assert not np.array_equal(a, numpy_rng(4, "finetune", 7).random(4))
    # what data/toyworld.py, data/transforms.py and data/stream.py drew before the helper existed
    assert np.array_equal(a, np.random.default_rng([3, zlib.crc32(b"finetune"), 7]).random(4))
    assert np.array_equal(numpy_rng(5).random(3), np.random.default_rng(5).random(3))


def test_torch_streams_match_the_step_and_pretrain_generators_they_replaced():
    state = np.random.SeedSequence([0, 1, 5, zlib.crc32(b"lower")]).generate_state(2, np.uint32)
    old_step = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))  # bilevel/problem.py
    assert torch.equal(torch.randn(5, generator=torch_rng(0, 1, 5, "lower")), torch.randn(5, generator=old_step))
    old_pretrain = torch.Generator().manual_seed(int(np.random.SeedSequence([0, 2, 9]).generate_state(1)[0]))
    assert torch.equal(torch.randn(5, generator=torch_rng(0, 2, 9, bits=32)), torch.randn(5, generator=old_pretrain))
    assert not torch.equal(torch.randn(5, generator=torch_rng(0, 2, 9)), torch.randn(5, generator=torch_rng(0, 2, 10)))


def test_warmup_cosine_is_the_finetune_schedule_and_decays_to_its_floor():
    lr, warmup = 5e-4, 50
    old = [lr * min(1.0, (s + 1) / warmup) for s in range(200)]  # recipes/finetune.py's lower_lr
    assert [warmup_cosine(s, lr, warmup) for s in range(200)] == old
    assert [warmup_cosine(s, lr, 0) for s in range(3)] == [lr] * 3
    peak, total = 1e-3, 1000
    values = [warmup_cosine(s, peak, 100, total, final=0.1) for s in range(total + 5)]
    assert values[99] == peak and math.isclose(values[total], 0.1 * peak) and values[-1] == values[total]
    assert all(a >= b for a, b in zip(values[99:], values[100:]))  # non-increasing after the warm-up
