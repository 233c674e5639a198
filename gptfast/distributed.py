"""Training on several processes, launched by PyTorch's own `torchrun`:

    torchrun --nproc_per_node=8 -m gptfast train --parallel fsdp ...
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv-backend=c10d \\
             --rdzv-endpoint=HOST:29500 -m gptfast train --parallel ddp ...

    launch = launch_from_env()             # None: not launched by torchrun
    ctx = setup("fsdp", "auto")            # process group (NCCL on GPUs, gloo on CPUs), device
    model = ctx.wrap(model)                # DDP, or FSDP2 (fully_shard per block, then the root)
    with ctx.sync_gradients(model, last):  # micro-steps before the last: no communication
        loss.backward()
    ctx.close()

Modes:
  ddp   every process holds the whole model; gradients are averaged (all-reduce) after the last
        micro-step. Checkpoints: rank 0 writes the usual single file (gptfast.checkpoint),
        loadable by any number of processes and by `gptfast generate`.
  fsdp  `torch.distributed.fsdp.fully_shard` on every Block, then on the GPT (its root group
        holds wte, wpe and ln_f: the tied token embedding is used at the start of the forward
        (embedding) and at its end (the fused loss), both inside the root's forward, so it is
        gathered once and its two gradients add up before the reduce-scatter). Parameters,
        gradients and AdamW's moments are sharded. Checkpoints: torch.distributed.checkpoint
        folders (`save_sharded`), resharded on load to any number of processes (or one).

Everything here communicates only through collectives every process reaches in the same
order; a decision that must be unanimous (stop on a non-finite loss) is reduced first.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch

__all__ = ["Launch", "launch_from_env", "launch_device", "DistContext", "setup", "single", "MODES",
           "save_sharded", "load_sharded", "load_full_into_sharded", "full_model_state",
           "shard_folder", "remove_stale_shards"]

MODES = ("ddp", "fsdp")
SHARD_KEY = "sharded"      # a checkpoint file whose tensors live in a DCP folder beside it


@dataclass(frozen=True)
class Launch:
    """What torchrun (or any launcher that sets its variables) told this process."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def launch_from_env(env=None) -> Optional[Launch]:
    """The launch described by RANK / WORLD_SIZE / LOCAL_RANK (torchrun sets them for every
    process it starts); None when WORLD_SIZE is not set. ValueError for inconsistent values."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return None

    def read(name, default=None):
        value = env.get(name, default)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"torchrun environment: {name}={value!r} is not an integer") from None

    world = read("WORLD_SIZE")
    rank = read("RANK")
    local_rank = read("LOCAL_RANK", 0)
    local_world = read("LOCAL_WORLD_SIZE", world)
    if world < 1 or not 0 <= rank < world or not 0 <= local_rank < max(local_world, 1):
        raise ValueError(f"torchrun environment: RANK={rank}, WORLD_SIZE={world}, "
                         f"LOCAL_RANK={local_rank} are inconsistent")
    return Launch(rank, world, local_rank, local_world)


@dataclass
class DistContext:
    """This process's place in the run. `mode` None: one process, nothing distributed."""

    mode: Optional[str]
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.mode is not None

    # ---- collectives (no-ops on one process) ---------------------------------------------
    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place; op: "sum", "mean" or "max". Returns t."""
        if not self.active:
            return t
        import torch.distributed as dist
        if op == "max":
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)   # gloo has no AVG
            if op == "mean":
                t /= self.world_size
        return t

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every process."""
        if not self.active:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # ---- the model -----------------------------------------------------------------------
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP(model), or model itself sharded in place by FSDP2; model itself on one process.
        Call before building the optimizer (FSDP2 replaces the parameters by DTensors)."""
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP
            cuda = self.device.type == "cuda"
            return DDP(model, device_ids=[self.device.index] if cuda else None)
        if self.mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
            mesh = init_device_mesh(self.device.type, (self.world_size,))
            for block in model.h:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)   # root group: wte (tied output weight), wpe, ln_f
            if hasattr(model, "logits"):    # scheduled sampling's no-grad pass calls it
                register_fsdp_forward_method(model, "logits")
            return model
        return model

    @contextlib.contextmanager
    def sync_gradients(self, wrapped: torch.nn.Module, sync: bool) -> Iterator[None]:
        """Around a micro-step's backward: communicate gradients only when `sync` (the last
        micro-step of an optimizer step); before it they accumulate locally."""
        if self.mode == "ddp" and not sync:
            with wrapped.no_sync():
                yield
            return
        if self.mode == "fsdp":
            wrapped.set_requires_gradient_sync(sync)
        yield

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False


def single(device: torch.device) -> DistContext:
    return DistContext(None, 0, 1, 0, device)


def launch_device(name: str, launch: Launch) -> torch.device:
    """cuda:LOCAL_RANK on GPUs (each process its own), else the CPU."""
    if name in (None, "", "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"invalid device {name!r}: {e}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device {name!r}: a torchrun launch trains on cuda or cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    if dev.index is not None and launch.local_world_size > 1 and dev.index != launch.local_rank:
        raise ValueError(f"device {name!r}: under torchrun each process takes cuda:LOCAL_RANK; "
                         f"pass --device cuda")
    index = dev.index if dev.index is not None else launch.local_rank
    if index >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {launch.local_rank} needs cuda:{index}, but this node has "
                         f"{torch.cuda.device_count()} GPU(s): --nproc_per_node must not exceed it")
    return torch.device("cuda", index)


def setup(parallel: Optional[str], device: str = "auto",
          launch: Optional[Launch] = None) -> DistContext:
    """The process group and device for `parallel` ("ddp" | "fsdp"; None: "ddp" under
    torchrun, else one process). Joins a process group the caller already made; otherwise
    makes one (NCCL on CUDA, gloo on the CPU) that `close()` destroys.
    ValueError (naming what to change) for a mode without a launch, or a bad device."""
    if parallel is not None and parallel not in MODES:
        raise ValueError(f"parallel must be one of {', '.join(MODES)}, got {parallel!r}")
    launch = launch if launch is not None else launch_from_env()
    if launch is None:
        if parallel is not None:
            raise ValueError(
                f"parallel {parallel!r} needs a torchrun launch (torchrun --nproc_per_node=N -m "
                f"gptfast train --parallel {parallel} ...); a plain `gptfast train` is one process")
        from .train import resolve_device
        return single(resolve_device(device))
    dev = launch_device(device, launch)
    import torch.distributed as dist
    owns = False
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
        owns = True
    elif dev.type == "cuda":
        torch.cuda.set_device(dev)
    return DistContext(parallel or "ddp", dist.get_rank(), dist.get_world_size(),
                       launch.local_rank, dev, owns)


# ---- sharded checkpoints (FSDP2) -----------------------------------------------------------

def shard_folder(ckpt_path: Path, ckpt: Dict[str, Any]) -> Optional[Path]:
    """The DCP folder a checkpoint file points to (None: the tensors are in the file)."""
    name = ckpt.get(SHARD_KEY)
    return None if name is None else Path(ckpt_path).parent / name


def remove_stale_shards(out_dir: Path, keep: Optional[str] = None) -> None:
    """Rank 0, after a checkpoint file was replaced: DCP folders (and unfinished temporary
    ones) of this run folder that the file no longer points to."""
    for p in Path(out_dir).glob("ckpt-*.dcp"):
        if p.name != keep:
            shutil.rmtree(p, ignore_errors=True)
    for p in Path(out_dir).glob(".ckpt-*.dcp.tmp"):
        shutil.rmtree(p, ignore_errors=True)


def save_sharded(ctx: DistContext, ckpt_path: Path, step: int, model, optimizer,
                 meta: Dict[str, Any]) -> Path:
    """Every process writes its shards into `.ckpt-<step>.dcp.tmp/` (torch.distributed.
    checkpoint, files fsynced); rank 0 renames the complete folder to `ckpt-<step>.dcp/`,
    then atomically replaces `ckpt_path` by a small file holding `meta` and the folder's
    name, then removes the folder the old file pointed to. A crash at any point leaves
    `ckpt_path` pointing at a complete checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from .checkpoint import save_checkpoint

    out_dir = Path(ckpt_path).parent
    name = None
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        name, n = f"ckpt-{step:08d}.dcp", 0
        while (out_dir / name).exists():        # a folder the current file may still point to
            n += 1
            name = f"ckpt-{step:08d}.{n}.dcp"
        shutil.rmtree(out_dir / f".{name}.tmp", ignore_errors=True)
    name = ctx.broadcast_object(name)
    tmp = out_dir / f".{name}.tmp"
    msd, osd = get_state_dict(model, optimizer)
    with _one_process_quiet():
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp))
    ctx.barrier()                                # every shard is on disk
    if ctx.is_main:
        os.replace(tmp, out_dir / name)
        save_checkpoint(ckpt_path, dict(meta, **{SHARD_KEY: name}))
        remove_stale_shards(out_dir, keep=name)
    ctx.barrier()
    return out_dir / name


@contextlib.contextmanager
def _one_process_quiet(force: bool = False) -> Iterator[None]:
    """DCP warns that it "assumes the intent" to save or load in a single process when no
    process group exists: that is the intent here."""
    import torch.distributed as dist
    if force or not dist.is_initialized():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*in a single process", category=UserWarning)
            yield
    else:
        yield


def _checkpoint_error(msg: str):
    from .checkpoint import CheckpointError
    return CheckpointError(msg)


def _stored_tensors(folder: Path) -> Dict[str, Any]:
    """{flattened key: TensorStorageMetadata} of a DCP folder (CheckpointError if unreadable)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    if not folder.is_dir():
        raise _checkpoint_error(f"{folder}: sharded checkpoint folder missing (the checkpoint "
                                f"file points to it)")
    try:
        md = FileSystemReader(str(folder)).read_metadata()
    except Exception as e:  # noqa: BLE001 - any unreadable folder
        raise _checkpoint_error(f"{folder}: unreadable sharded checkpoint ({type(e).__name__}: "
                                f"{e})") from e
    return {k: v for k, v in md.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def _check_model_matches(folder: Path, expected: Dict[str, torch.Size]) -> None:
    stored = {k[len("model."):]: tuple(v.size) for k, v in _stored_tensors(folder).items()
              if k.startswith("model.")}
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    wrong = sorted(k for k in set(expected) & set(stored) if tuple(expected[k]) != stored[k])
    if missing or extra or wrong:
        what = (f"{wrong[0]} is {stored[wrong[0]]} there, {tuple(expected[wrong[0]])} here"
                if wrong else f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}")
        raise _checkpoint_error(f"{folder}: holds a different model than the one its checkpoint "
                                f"file describes ({what})")


def load_sharded(folder: Path, model, optimizer) -> None:
    """Load a DCP folder into `model` and `optimizer`, whatever their wrapping (one process,
    DDP, FSDP2 on any number of processes): DCP reads each process's part of every tensor."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    _check_model_matches(folder, {k: v.shape for k, v in msd.items()
                                  if isinstance(v, torch.Tensor)})
    state = {"model": msd, "optimizer": osd}
    try:
        with _one_process_quiet():
            dcp.load(state, checkpoint_id=str(folder))
    except Exception as e:  # noqa: BLE001
        raise _checkpoint_error(f"{folder}: cannot load the sharded checkpoint "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


def _param_names(model) -> Dict[int, str]:
    """id(parameter) -> its canonical name (no DDP `module.` or torch.compile `_orig_mod.`)."""
    names = {}
    for n, p in model.named_parameters():
        for prefix in ("module.", "_orig_mod."):
            n = n.replace(prefix, "")
        names[id(p)] = n
    return names


def load_full_into_sharded(ckpt: Dict[str, Any], model, optimizer) -> None:
    """A single-file checkpoint (one process or DDP) into an FSDP2 model and its optimizer:
    every process holds the full tensors once, keeps its shards."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, ckpt["model"], options=opts)
    # optimizer.state_dict() numbers parameters in the order of its groups; name them.
    names = _param_names(model)
    flat = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    saved = ckpt["optimizer"]
    state = {flat[i]: s for i, s in saved["state"].items()}
    groups = [dict(g, params=[flat[i] for i in g["params"]]) for g in saved["param_groups"]]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=opts)


def full_model_state(folder: Path) -> Dict[str, torch.Tensor]:
    """The whole model's weights of a DCP folder, on the CPU of this process (no process
    group needed): what `gptfast generate` and `gptfast.load` read from an FSDP run."""
    import torch.distributed.checkpoint as dcp
    state = {k[len("model."):]: torch.empty(tuple(v.size), dtype=v.properties.dtype)
             for k, v in _stored_tensors(folder).items() if k.startswith("model.")}
    if not state:
        raise _checkpoint_error(f"{folder}: the sharded checkpoint holds no model weights")
    box = {"model": state}
    try:
        with _one_process_quiet(force=True):
            dcp.load(box, checkpoint_id=str(folder), no_dist=True)
    except Exception as e:  # noqa: BLE001
        raise _checkpoint_error(f"{folder}: cannot read the sharded checkpoint "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    return box["model"]
