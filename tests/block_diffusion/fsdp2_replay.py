"""Trajectory replay and the CFT loss under FSDP2 (``torch.distributed.fsdp.fully_shard``), two CPU processes (gloo).

Launched by ``tests/block_diffusion/test_fsdp2.py`` with ``torchrun --nproc_per_node 2``. Each rank builds the same
tiny converted model twice: a plain reference, and a copy sharded with ``fully_shard`` (each decoder layer, then the
root, which holds the embeddings, the final norm and the output layer). On the same rollout (decoded by the
reference) it computes replay log-probs and the block-diffusion loss with both, backpropagates, and decodes
rank-specific prompts that need different numbers of forwards per rank. It writes ``OUT/rank<r>.json``: whether the
parameters really were shards, the largest differences in values and in the gradients (the sharded ones gathered
with ``full_tensor``), whether the sharded rollout equals the unsharded one, and every rank's forward counts.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from tests.helpers import leave_without_finalizing


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args()
    # A hang (a collective one rank never reaches) prints every thread's stack and exits instead of waiting forever.
    faulthandler.dump_traceback_later(240, exit=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.fsdp import fully_shard

    from diffgr2_trl.block_diffusion import (
        BlockDiffusionSampler,
        align_completions,
        block_diffusion_loss,
        get_spec,
        left_pad,
    )
    from diffgr2_trl.block_diffusion.likelihood import replay_logprobs
    from diffgr2_trl.modeling import build_word_tokenizer
    from tests.helpers import WORDS, converted

    tok = build_word_tokenizer(WORDS)
    ref, _ = converted(tok, block_size=4)
    sharded, _ = converted(tok, block_size=4)
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    spec = get_spec(ref)
    ids, am = left_pad([[5, 6, 7, 8, 9], [10, 11, 12], [13]], tok.pad_token_id)
    out = BlockDiffusionSampler(ref).generate(ids, am, max_completion_length=8, tau=0.5,
                                              generator=torch.Generator().manual_seed(0))
    record = {"rank": rank, "world_size": world, "backend": dist.get_backend(),
              "sharded": all(hasattr(p, "full_tensor") for p in sharded.parameters()),
              "steps": int(out.step_map.max()) + 1}
    ok = out.completion_mask
    values, grads = {}, {}
    for name, model in (("ref", ref), ("sharded", sharded)):
        lp = replay_logprobs(model, ids, am, out.canvas_ids, out.step_map, spec, max_streams_per_forward=2).logps
        lp[ok].sum().backward()
        values[name] = lp[ok].detach()
        grads[name] = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                       for n, p in model.named_parameters()}
        model.zero_grad()
    record["replay_max_diff"] = float((values["ref"] - values["sharded"]).abs().max())
    record["replay_grad_max_diff"] = max(float((grads["ref"][n] - grads["sharded"][n]).abs().max()) for n in grads["ref"])
    record["replay_grad_norm"] = float(sum(g.norm() ** 2 for g in grads["ref"].values()) ** 0.5)

    # CFT's loss on the rollout's sequences, one fixed noise mask (the full forward path, logits inside the model).
    seq = out.sequences
    comp = torch.zeros_like(seq, dtype=torch.bool)
    comp[:, ids.shape[1]:] = ok
    batch = align_completions(seq, (seq != tok.pad_token_id) | comp, comp, block_size=4,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    masked = torch.zeros_like(batch.completion)
    masked[:, ::2] = True
    losses = {}
    for name, model in (("ref", ref), ("sharded", sharded)):
        loss, _ = block_diffusion_loss(model, batch, spec, masked=masked)
        loss.backward()
        losses[name] = float(loss)
        grads[name] = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                       for n, p in model.named_parameters()}
    record["cft_loss_diff"] = abs(losses["ref"] - losses["sharded"])

    # Rollouts where the ranks need different numbers of forwards (different prompts and lengths per rank): the
    # sharded model's forwards are collectives, so the sampler must keep the ranks in step (it does by default for
    # a sharded model) and still decode exactly what the unsharded model decodes on each rank.
    prompts = [[5, 6, 7]] if rank == 0 else [[9, 10, 11, 12, 13, 14], [20, 21]]
    pids, pam = left_pad(prompts, tok.pad_token_id)
    kw = dict(max_completion_length=12, tau=0.6)
    want = BlockDiffusionSampler(ref).generate(pids, pam, **kw)
    got = BlockDiffusionSampler(sharded).generate(pids, pam, **kw)
    record["rollout_equal"] = bool(torch.equal(want.canvas_ids, got.canvas_ids)
                                   and torch.equal(want.step_map, got.step_map))
    counts = [None] * world
    dist.all_gather_object(counts, [want.forward_passes, got.forward_passes])
    record["unsynced_forwards"] = [c[0] for c in counts]  # what each rank needs alone
    record["synced_forwards"] = [c[1] for c in counts]
    record["cft_grad_max_diff"] = max(float((grads["ref"][n] - grads["sharded"][n]).abs().max()) for n in grads["ref"])
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(record))
    leave_without_finalizing()  # a rank aborted at exit once, after writing its record (tests/helpers.py)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
