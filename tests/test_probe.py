"""The probe's contract with the training process: an exit code of its own for out of memory, and the micro
batch search over powers of two (measured steps: tests/test_bench.py, tests/test_runner.py)."""

import pytest
import torch

from tinystories_lab.errors import UserError
from tinystories_lab.preemption import PREEMPTED_EXIT
from tinystories_lab.pretrain import out_of_memory
from tinystories_lab.probe import OUT_OF_MEMORY_EXIT, largest_fitting


def test_out_of_memory_is_told_by_an_exit_code_no_other_outcome_uses():
    assert OUT_OF_MEMORY_EXIT not in (0, 1, 2, PREEMPTED_EXIT)
    assert out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_the_largest_fitting_micro_batch_divides_the_batch():
    assert largest_fitting(48, lambda m: m <= 32) == 16  # 32 does not divide 48
    assert largest_fitting(64, lambda m: m <= 64) == 64
    tried = []
    assert largest_fitting(12, lambda m: tried.append(m) or m == 1) == 1
    assert tried == [4, 2, 1]  # the largest first, only divisors
    with pytest.raises(UserError, match="Not even a micro batch of 1"):
        largest_fitting(8, lambda m: False)
