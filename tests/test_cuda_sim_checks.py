"""The CPU execution layer must not let a kernel pass that would fail on a GPU: each deliberately
broken kernel of csrc/sim/checks.cu is reported (with its twin that follows the rule passing),
launch limits are those of the GPU, and guard bands catch accesses outside tensors."""
import pytest
import torch

from _cuda_sim import ORDERS, sim, under_orders
from gptfast import cuda_sim

pytestmark = [pytest.mark.cuda_sim, pytest.mark.cuda_sanitize]

# A missing barrier shows as a race, or (when the reader runs before the writer) as a read of
# shared memory nobody wrote yet: either way an error.
UNORDERED = "write-read race|never written since the block started"

# name -> (argument of the broken variant, message, argument of the correct twin or None)
BROKEN = {
    "neighbour": (0, UNORDERED, 1),
    "warp_neighbour": (0, UNORDERED, 1),
    "write_after_read": (0, "race", 1),
    "skipped_barrier": (0, "skipped sync_block", None),
    "different_barriers": (0, "different block barriers", None),
    "divergent_shuffle": (0, "different collectives", None),
    "exited_lane_shuffle": (0, "has exited", None),
    "partial_warp": (0, "need all 32 lanes", None),
    "cp_async_early_read": (0, "not yet completed by its cp_async_wait", 1),
    "cp_async_other_thread": (0, UNORDERED + "|not yet completed", 1),
    "cp_async_never_waited": (0, "never completed by a cp_async_wait", None),
    "cp_async_misaligned": (0, "not aligned to its 16 bytes", None),
    "ldmatrix_misaligned": (0, "not 16-byte aligned", None),
    "vector_load_misaligned": (0, "not aligned to 16", None),
    "uninitialized_read": (0, "never written since the block started", None),
    "arena_overflow": (0, "arena needs 4096 bytes", None),
    "oob_write": (0, "wrote outside out", None),
}


def test_every_check_kernel_is_covered():
    assert set(sim().check_names()) == set(BROKEN) | {"signed_overflow", "heap_overflow"} | {"oob_read", "clean"}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_kernel_is_reported_in_every_order(name):
    arg, message, fixed = BROKEN[name]
    for thread, block, seed, workers in ORDERS:
        with cuda_sim.settings(thread_order=thread, block_order=block, seed=seed, workers=workers):
            with pytest.raises(RuntimeError, match=message):
                sim().run_check(name, arg)
    if fixed is not None:
        under_orders(lambda: sim().run_check(name, fixed))


def test_layer_is_usable_after_a_failed_launch():
    with pytest.raises(RuntimeError):
        sim().run_check("skipped_barrier", 0)
    out = sim().run_check("clean", 3)
    assert out.isfinite().all()


def test_cp_async_destination_and_fresh_shared_memory_read_as_nan():
    """With race tracking off, the poison itself shows: a cp.async destination read before its
    wait, and shared memory nobody wrote, are NaN."""
    with cuda_sim.settings(check_races=False):
        early = sim().run_check("cp_async_early_read", 0)
        fresh = sim().run_check("uninitialized_read", 0)
        waited = sim().run_check("cp_async_early_read", 1)
    assert early[:32].isnan().all()
    assert fresh[:32].isnan().all()
    assert torch.equal(waited[:32], torch.arange(32.0) * 4)


def test_reads_before_an_input_see_its_nan_guard_band():
    out = sim().run_check("oob_read", 0)
    assert out[0].isnan() and torch.equal(out[1:64], torch.arange(63.0))


def test_results_are_identical_in_every_order():
    out = under_orders(lambda: sim().run_check("clean", 4))
    src = torch.arange(4 * 64, dtype=torch.float32)
    blocks = torch.arange(4).repeat_interleave(64).float()
    want = (src.view(4, 64).flip(1) * 2).reshape(-1) + blocks
    assert torch.equal(out, want)


def test_different_orders_really_run_differently():
    """The orders are not a no-op: the interleaving of a racy kernel changes what it reads
    (with the race check off, the neighbour's slot is NaN or not depending on the order)."""
    seen = set()
    for thread, block, seed, workers in ORDERS:
        with cuda_sim.settings(thread_order=thread, block_order=block, seed=seed, workers=workers,
                               check_races=False):
            out = sim().run_check("neighbour", 0)
        seen.add(int(out[:64].isnan().sum()))
    assert len(seen) > 1


@pytest.mark.parametrize("grid,block,smem,opt_in,message", [
    ((1, 1, 1), (1025, 1, 1), 0, False, "block dimensions"),
    ((1, 1, 1), (32, 32, 2), 0, False, "1024 threads"),
    ((1, 1, 1), (1, 1, 65), 0, False, "block dimensions"),
    ((1, 65536, 1), (32, 1, 1), 0, False, "65535"),
    ((1, 1, 65536), (32, 1, 1), 0, False, "65535"),
    ((0, 1, 1), (32, 1, 1), 0, False, "grid dimension is 0"),
    ((1, 1, 1), (32, 1, 1), 48 * 1024 + 16, False, "without opting in"),
    ((1, 1, 1), (32, 1, 1), 163 * 1024 + 16, True, "sm_80"),
])
def test_launch_limits_are_the_gpus(grid, block, smem, opt_in, message):
    with pytest.raises(ValueError, match=message):
        sim().check_launch_config(list(grid), list(block), smem, opt_in)


def test_launch_limits_follow_the_simulated_arch():
    big = 200 * 1024
    with cuda_sim.settings(arch=80):
        with pytest.raises(ValueError, match="sm_80"):
            sim().check_launch_config([1, 1, 1], [32, 1, 1], big, True)
    with cuda_sim.settings(arch=90):
        sim().check_launch_config([1, 1, 1], [32, 1, 1], big, True)
        sim().check_launch_config([2 ** 31 - 1, 65535, 65535], [1024, 1, 1], 48 * 1024, False)
        with pytest.raises(ValueError, match="sm_90"):
            sim().check_launch_config([1, 1, 1], [32, 1, 1], 228 * 1024, True)


def test_settings_are_validated_and_restored():
    before = cuda_sim.get_settings()
    with pytest.raises(TypeError, match="unknown CUDA sim settings"):
        cuda_sim.set_settings(nonsense=1)
    with pytest.raises(RuntimeError, match="order"):
        cuda_sim.set_settings(thread_order="sideways")
    with cuda_sim.settings(workers=3, arch=90):
        assert cuda_sim.get_settings()["workers"] == 3
    assert cuda_sim.get_settings() == before

