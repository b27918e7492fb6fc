"""Train a SeerAttention gate by self-distillation on synthetic structured q/k (CPU, well under a minute).

Every sequence is cut into blocks; each key block carries one of a few random "topic" directions and
each query block asks for the topic of some earlier key block, so the true attention map is
block-structured. The gate sees only block-pooled q and k. Each step draws a fresh batch, computes
the distillation target (the row-normalised block max-pooled attention map) and takes one Adam step
on the KL loss. Every 50 steps it reports, on a fixed held-out batch, the loss and the oracle recall:
the share of the blocks the oracle picks (top 25% of each row by the target) that the gate also picks.

    python examples/train_seer_gate.py
"""

from __future__ import annotations

import time

import torch

from attnzoo.methods.seerattention import AttnGate, block_attention_target, gate_loss, select_blocks

BATCH, HEADS, KV_HEADS, SEQ, HEAD_DIM, BLOCK, TOPICS = 2, 2, 1, 512, 32, 32, 6
TOPK_RATIO, STEPS, REPORT_EVERY = 0.25, 300, 50


def structured_qk(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """q (BATCH, HEADS, SEQ, HEAD_DIM), k (BATCH, KV_HEADS, SEQ, HEAD_DIM): key block j holds topic
    t_j plus noise; query block i holds the topic of a random key block j <= i plus noise."""
    n_blocks = SEQ // BLOCK
    topics = torch.nn.functional.normalize(torch.randn(BATCH, TOPICS, HEAD_DIM, generator=generator), dim=-1)
    key_topic = torch.randint(TOPICS, (BATCH, n_blocks), generator=generator)
    source = (torch.rand(BATCH, HEADS, n_blocks, generator=generator) * (torch.arange(n_blocks) + 1)).long()
    query_topic = torch.gather(key_topic[:, None].expand(-1, HEADS, -1), 2, source)  # (BATCH, HEADS, n_blocks)
    strength = 3.0 * HEAD_DIM ** 0.25  # matching topics score strength^2 / sqrt(HEAD_DIM) = 9
    k = strength * topics[torch.arange(BATCH)[:, None], key_topic][:, None]  # (BATCH, 1, n_blocks, HEAD_DIM)
    q = strength * topics[torch.arange(BATCH)[:, None, None], query_topic]  # (BATCH, HEADS, n_blocks, HEAD_DIM)
    k = k.repeat_interleave(BLOCK, dim=2) + torch.randn(BATCH, KV_HEADS, SEQ, HEAD_DIM, generator=generator)
    q = q.repeat_interleave(BLOCK, dim=2) + torch.randn(BATCH, HEADS, SEQ, HEAD_DIM, generator=generator)
    return q, k


def oracle_recall(gate_probs: torch.Tensor, target: torch.Tensor) -> float:
    """Share of the oracle's top-k blocks (by the target) that the gate's top-k also holds."""
    pick = dict(n=SEQ, m=SEQ, block_size=BLOCK, causal=True, topk_ratio=TOPK_RATIO, last_blocks_dense=0)
    oracle, chosen = select_blocks(target, **pick), select_blocks(gate_probs, **pick)
    return ((oracle & chosen).sum() / oracle.sum()).item()


def main() -> None:
    torch.set_num_threads(1)  # tensors this small run faster on one thread than on a contended pool
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    held_out_q, held_out_k = structured_qk(generator)
    held_out_target = block_attention_target(held_out_q, held_out_k, BLOCK, causal=True)
    gate = AttnGate(HEAD_DIM, HEADS, KV_HEADS, hidden=64, block_size=BLOCK)
    optimizer = torch.optim.Adam(gate.parameters(), lr=3e-3)
    start = time.perf_counter()
    for step in range(STEPS + 1):
        if step % REPORT_EVERY == 0:
            with torch.no_grad():
                loss = gate_loss(gate.logits(held_out_q, held_out_k), held_out_target).item()
                recall = oracle_recall(gate(held_out_q, held_out_k), held_out_target)
            print(f"step {step:4d}  held-out KL {loss:.4f}  oracle recall {recall:.3f}  "
                  f"({time.perf_counter() - start:.1f} s)")
        if step == STEPS:
            break
        q, k = structured_qk(generator)
        target = block_attention_target(q, k, BLOCK, causal=True)
        loss = gate_loss(gate.logits(q, k), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


if __name__ == "__main__":
    main()
