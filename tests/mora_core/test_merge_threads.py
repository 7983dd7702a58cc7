"""The streaming merge runs its kernels on all CPUs but one (the writer's hash thread and
the kernel's writes use that one) and gives torch's thread count back afterwards, also
after an error."""

from __future__ import annotations

import os

import pytest
import torch

from exporters.safetensors_out import SafetensorsFolderWriter
from mora_core.adapter import load_adapter
from mora_core.checkpoint import open_checkpoint
from mora_core.errors import MergeError
from mora_core.merge import plan_merge, stream_merge
from mora_core.threads import spare_one_core
from tests.builders import H, llama_like, mora_shapes, write_mora_adapter, write_tensor_base


class _Recording(SafetensorsFolderWriter):
    """A real folder writer that notes torch's thread count whenever it receives a tensor."""

    seen: list[int]

    def write(self, planned, tensor) -> None:
        self.seen.append(torch.get_num_threads())
        super().write(planned, tensor)


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _merge(tmp_path, out: str, adapter, weight: float = 1.0) -> list[int]:
    ck = open_checkpoint(tmp_path / "base")
    plan = plan_merge(ck, [adapter], [weight])
    (tmp_path / out).mkdir()
    with _Recording(tmp_path / out) as writer:
        writer.seen = []
        stream_merge(ck, plan, writer)
        writer.finish()
        return writer.seen


def test_kernels_spare_one_core_and_the_count_is_restored(tmp_path, restore_threads):
    write_tensor_base(tmp_path / "base", llama_like(dtype=torch.bfloat16), shards=2)
    write_mora_adapter(tmp_path / "a", mora_shapes(), r=8, mora_type=6)
    adapter = load_adapter(tmp_path / "a")
    torch.set_num_threads(3)
    seen = _merge(tmp_path, "o", adapter)
    cpus = len(os.sched_getaffinity(0))
    assert seen and set(seen) == {max(1, min(3, cpus - 1))}  # never more than asked nor than CPUs - 1
    assert spare_one_core() == max(1, min(3, cpus - 1))
    assert torch.get_num_threads() == 3


def test_thread_count_restored_after_an_error(tmp_path, restore_threads):
    write_tensor_base(tmp_path / "base", llama_like(dtype=torch.float16))
    write_mora_adapter(tmp_path / "a", {"model.layers.0.self_attn.q_proj": (H, H)}, scale=1.0)
    adapter = load_adapter(tmp_path / "a")
    torch.set_num_threads(3)
    with pytest.raises(MergeError, match="not finite"):
        _merge(tmp_path, "o", adapter, weight=1e6)  # float16 overflows
    assert torch.get_num_threads() == 3
