"""Run by torchrun from tests/test_distributed.py (2 processes, gloo, loopback): checks that
need a live process group but not a `gptfast train` command each. Every process writes
its findings to $DIST_OUT/rank<r>.json; the test reads and judges them.

    grads        one step of DDP and of FSDP2 on this process's rows: every parameter's
                 gradient (the tied token embedding's included: used by the embedding and by
                 the fused loss) against the one-process gradient on the whole batch, with
                 keyed dropout on
    accumulation two micro-steps: nothing communicated after the first, the whole batch's
                 gradient after the last
    divergence   one process's loss turns NaN: every process stops at the same step with
                 TrainingDiverged, and the checkpoint keeps the last good step
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

torch.set_num_threads(1)


def grads(out: dict) -> None:
    from gptfast.distributed import setup
    from gptfast.model import GPT, get_config
    from gptfast.randomness import sample_keys

    ctx = setup("ddp", "cpu")
    W, r = ctx.world_size, ctx.rank
    cfg = get_config("tiny", block_size=16, n_layer=2, n_embd=32, n_head=2, dropout=0.1)
    g = torch.Generator().manual_seed(0)
    B = 2 * W
    x = torch.randint(0, cfg.vocab_size, (B, 16), generator=g)
    y = torch.randint(0, cfg.vocab_size, (B, 16), generator=g)
    keys = sample_keys(7, 0, B)
    rows = slice(r * 2, r * 2 + 2)

    def fresh():
        torch.manual_seed(0)
        return GPT(cfg).train()

    ref = fresh()
    ref(x, y, sample_keys=keys)[1].backward()
    want = {n: p.grad for n, p in ref.named_parameters()}
    # the tied weight's gradient has both parts: the loss's alone is not it
    loss_only = fresh()
    h = loss_only.forward_hidden(x, sample_keys=keys).detach()
    import gptfast
    gptfast.linear_cross_entropy(h.view(-1, cfg.n_embd), loss_only.wte.weight,
                                 y.reshape(-1)).backward()
    out["tied_has_both_parts"] = float((want["wte.weight"] - loss_only.wte.weight.grad).abs().max())

    for mode in ("ddp", "fsdp"):
        ctx.mode = mode
        model = fresh()
        wrapped = ctx.wrap(model)
        wrapped(x[rows], y[rows], sample_keys=keys[rows])[1].backward()
        errs = {}
        for n, p in model.named_parameters():
            got = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            errs[n] = float((got - want[n]).abs().max() / want[n].abs().max().clamp_min(1e-12))
        out[f"{mode}_grad_rel_err"] = errs
        out[f"{mode}_param_types"] = sorted({type(p).__name__ for p in model.parameters()})
    dist.barrier()


def accumulation(out: dict) -> None:
    """Two micro-steps under `sync_gradients`: after the first, nothing was communicated
    (DDP: each process still holds its own rows' gradient; FSDP2: no sharded gradient exists
    yet); after the last, the gradients are the one-process gradient of both micro-batches."""
    from gptfast.distributed import setup
    from gptfast.model import GPT, get_config
    from gptfast.randomness import sample_keys

    ctx = setup("ddp", "cpu")
    W, r = ctx.world_size, ctx.rank
    cfg = get_config("tiny", block_size=16, n_layer=1, n_embd=32, n_head=2, dropout=0.1)
    g = torch.Generator().manual_seed(1)
    B = 2 * W                      # global micro-batch
    xs = [torch.randint(0, cfg.vocab_size, (B, 16), generator=g) for _ in range(2)]
    ys = [torch.randint(0, cfg.vocab_size, (B, 16), generator=g) for _ in range(2)]
    keys = [sample_keys(5, m * B, B) for m in range(2)]
    rows = slice(r * 2, r * 2 + 2)

    def fresh():
        torch.manual_seed(0)
        return GPT(cfg).train()

    ref = fresh()
    for m in range(2):
        (ref(xs[m], ys[m], sample_keys=keys[m])[1] / 2).backward()
    for mode in ("ddp", "fsdp"):
        ctx.mode = mode
        model = fresh()
        wrapped = ctx.wrap(model)
        facts = {}
        for m in range(2):
            with ctx.sync_gradients(wrapped, m == 1):
                (wrapped(xs[m][rows], ys[m][rows], sample_keys=keys[m][rows])[1] / 2).backward()
            if m == 0:
                if mode == "ddp":   # differs across processes unless it was all-reduced
                    w = model.wte.weight.grad.clone()
                    other = [torch.zeros_like(w) for _ in range(W)]
                    dist.all_gather(other, w)
                    facts["first_grads_differ_across_processes"] = not torch.equal(other[0], other[1])
                else:
                    facts["first_sharded_grads"] = sum(p.grad is not None for p in model.parameters())
        errs = []
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            got = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            errs.append(float((got - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-12)))
        facts["final_grad_rel_err"] = max(errs)
        out[f"{mode}_accumulation"] = facts
    dist.barrier()


def divergence(out: dict, folder: Path) -> None:
    from gptfast import model as model_mod
    from gptfast.train import TrainConfig, TrainingDiverged, train
    from gptfast.checkpoint import load_checkpoint

    rank = dist.get_rank()
    real = model_mod.GPT.forward
    for mode in ("ddp", "fsdp"):
        calls = {"n": 0}

        def forward(self, idx, targets=None, **kw):
            logits, loss = real(self, idx, targets, **kw)
            if targets is not None and self.training:
                calls["n"] += 1
                if rank == 1 and calls["n"] == 4:      # step 4 (grad_accum 1), one process
                    loss = loss * float("nan")
            return logits, loss

        model_mod.GPT.forward = forward
        run = folder / mode
        cfg = TrainConfig(preset="tiny", block_size=16, model_overrides={"n_layer": 1, "n_embd": 32,
                          "n_head": 2}, data=os.environ["DIST_DATA"], steps=8, batch_size=4,
                          eval_every=0, eval_batches=1, log_every=1, save_every=2,
                          out_dir=str(run), device="cpu", progress=False, verbose=False,
                          plot=False, seed=0, parallel=mode)
        try:
            train(cfg)
            out[f"{mode}_diverged_at"] = None
        except TrainingDiverged as e:
            out[f"{mode}_diverged_at"] = str(e)
        finally:
            model_mod.GPT.forward = real
        dist.barrier()
        out[f"{mode}_checkpoint_step"] = load_checkpoint(run / "ckpt.pt")["step"]


def main() -> int:
    folder = Path(os.environ["DIST_OUT"])
    dist.init_process_group("gloo")
    out = {"rank": dist.get_rank(), "world_size": dist.get_world_size()}
    try:
        for name in sys.argv[1:]:
            if name == "grads":
                grads(out)
            elif name == "accumulation":
                accumulation(out)
            elif name == "divergence":
                divergence(out, folder)
    finally:
        (folder / f"rank{out['rank']}.json").write_text(json.dumps(out, indent=1))
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
