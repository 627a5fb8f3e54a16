"""The LM loss (orchestrator/training/loss.py) against the one a user would write,
`F.cross_entropy(logits.float(), targets)`: forward + backward time on the same logits,
each side first in turn, the median of the rounds' own ratios and its spread.

    PYTHONPATH=. python scripts/bench_loss.py [--tokens 4096] [--vocab 8192] [--rounds 9]

On a CPU: fp32 logits, then the padded head's shape (7 columns past the vocabulary, sliced
eager backward) in fp32 and bf16. With CUDA it also times bf16 logits of GPT-2's vocabulary
padded to 50,304 columns, eager and under torch.compile. The last
line is one JSON object: `speedup` per case (the median over the rounds of reference time /
ours, scripts.rounds.median_ratio), `spread` (min-max of the per-round ratios) and the medians
in ms.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from orchestrator.training.loop import is_out_of_memory
from orchestrator.training.loss import token_cross_entropy
from orchestrator.validation import strict_int
from scripts.flags import require, require_at_least
from scripts.rounds import median_ratio, rotated

Loss = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
PADDING = 7  # columns past the vocabulary in the padded cases


def reference(logits: torch.Tensor, targets: torch.Tensor, vocab: int) -> torch.Tensor:
    return F.cross_entropy(logits[:, :vocab].float(), targets)


def time_once(loss: Loss, logits: torch.Tensor, targets: torch.Tensor, vocab: int) -> float:
    leaf = logits.detach().requires_grad_()
    if logits.is_cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    loss(leaf, targets, vocab).backward()
    if logits.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started


def compare(name: str, ours: Loss, theirs: Loss, logits: torch.Tensor, targets: torch.Tensor,
            vocab: int, rounds: int) -> dict:
    """Rounds after one warm-up of each (which compiles a compiled pair), each side first in
    turn; the speedup is the median of the rounds' own reference / ours ratios."""
    time_once(ours, logits, targets, vocab), time_once(theirs, logits, targets, vocab)
    times: dict[str, list[float]] = {"ours": [], "reference": []}
    for i in range(rounds):
        for side, loss in rotated([("ours", ours), ("reference", theirs)], i):
            times[side].append(time_once(loss, logits, targets, vocab))
    speedup = median_ratio(times["reference"], times["ours"])
    row = {"case": name, "ours_ms": round(statistics.median(times["ours"]) * 1e3, 2),
           "reference_ms": round(statistics.median(times["reference"]) * 1e3, 2),
           "speedup": round(speedup["ratio"], 3),
           "spread": [round(r, 3) for r in speedup["spread"]]}
    print(json.dumps(row))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=strict_int, default=4096)
    parser.add_argument("--vocab", type=strict_int, default=8192)
    parser.add_argument("--rounds", type=strict_int, default=9)
    args = parser.parse_args(argv)
    require_at_least(parser, args, 1, "tokens", "rounds")
    require(parser, args, ("vocab",), lambda vocab: vocab > PADDING,
            f"must be > {PADDING} (the padded cases leave {PADDING} columns out)")
    torch.manual_seed(0)
    rows = []
    try:  # (the allocator's RuntimeError was a traceback naming neither flag)
        targets = torch.randint(0, args.vocab - PADDING, (args.tokens,))
        fp32 = torch.randn(args.tokens, args.vocab)
        # Unpadded fp32 (the CPU's own runs); then the padded head's shape (GPT-2's 50,257 in
        # 50,304 columns), whose eager backward goes a slice of rows at a time, fp32 and bf16.
        for name, logits, vocab in (
                (f"cpu-fp32-{args.tokens}x{args.vocab}", fp32, args.vocab),
                (f"cpu-fp32-{args.tokens}x{args.vocab - PADDING}-padded", fp32,
                 args.vocab - PADDING),
                (f"cpu-bf16-{args.tokens}x{args.vocab - PADDING}-padded", fp32.bfloat16(),
                 args.vocab - PADDING)):
            rows.append(compare(name, token_cross_entropy, reference, logits, targets, vocab,
                                args.rounds))
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        parser.error(f"--tokens {args.tokens} x --vocab {args.vocab}: out of memory "
                     f"({args.tokens * args.vocab * 4 / 2 ** 30:,.1f} GiB of fp32 logits, and "
                     "their gradients): lower them")
    if torch.cuda.is_available():
        vocab, width, tokens = 50257, 50304, 16384
        logits = torch.randn(tokens, width, device="cuda").bfloat16()
        targets = torch.randint(0, vocab, (tokens,), device="cuda")
        rows.append(compare(f"cuda-bf16-{tokens}x{vocab}-padded", token_cross_entropy,
                            reference, logits, targets, vocab, args.rounds))
        rows.append(compare(f"cuda-bf16-{tokens}x{vocab}-padded-compiled",
                            torch.compile(token_cross_entropy), torch.compile(reference),
                            logits, targets, vocab, args.rounds))
    print(json.dumps({"speedup": {r["case"]: r["speedup"] for r in rows},
                      "spread": {r["case"]: r["spread"] for r in rows},
                      "ours_ms": {r["case"]: r["ours_ms"] for r in rows},
                      "reference_ms": {r["case"]: r["reference_ms"] for r in rows}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
