"""How much accelerator memory one training worker needs, before anything is placed.

An estimate from the model's shape and the run's settings, per worker, under DDP (every
worker holds everything) and FSDP (parameters, gradients and optimizer state sharded over the
workers; one block's parameters gathered at a time, the next one prefetched):

- parameters: fp32 master weights, 4 bytes each (autocast computes in bf16/fp16 from them);
- gradients: fp32, 4 bytes each; DDP adds its gradient buckets (another 4 bytes each, as
  `gradient_as_bucket_view` is off) with more than one worker: one worker trains unwrapped,
  without DDP. FSDP adds the root's unsharded gradients (token and position embeddings,
  final LayerNorm), in the compute dtype, held through the whole backward (the head, tied to
  the token embedding, starts them; the embeddings end them), and the fp32 copy of the
  unsharded gradients being reduce-scattered: a block's, or last the root's, the larger
  counted, with one worker too (torch copies them into its reduce-scatter buffer at any
  world size).
  Hierarchical accumulation adds none: a group's pending gradients are set aside by
  reference while others step (accumulation.py), not copied;
- optimizer: AdamW's two fp32 moments, 8 bytes per parameter;
- autocast's low-precision copies of the weights in use (2 bytes each under bf16/fp16);
- activations kept for the backward pass, per layer s·b·h·34 bytes at 16 bits (Korthikanti
  et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", with the
  attention matrix not stored, as SDPA's fused kernels do; twice that in fp32), plus the
  logits (b·s·V) in the compute dtype, which the loss keeps for its backward
  (training/loss.py): one copy at the peak under torch.compile, two in eager mode (the
  logits and their gradient; measured on an H200 with GPT-2's vocabulary at ff3fa63: ~2
  bytes per logit compiled, ~4.5 eager, in bf16, the eager figure before 3d191d5 changed the
  eager backward; docs/training.md).
- with the learnable attention span, the attention weights its own attention keeps
  (b·heads·s² per layer, at the widest window the spans can learn; span_attention_bytes).

It leaves out the CUDA context and allocator slack (typically 0.5-2 GB): `dry_run` says so,
and `gpu_memory_needed_gb` (the free memory a run's placement asks of each worker's GPU) adds
the low end of it, so that a run is kept off GPUs only where it clearly cannot fit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from orchestrator.config import TrainConfig

GIB = 1024 ** 3
ADAM_BYTES = 8  # two fp32 moments
FP32 = 4
ACTIVATION_BYTES_PER_LAYER_16BIT = 34  # × seq · batch · width (Korthikanti et al. 2022)
# Of those, the MLP's 4 x width hidden units keep 4 bytes each (c_fc's output and the GELU's):
# a model whose MLP is narrower or wider (TrainConfig.mlp_hidden) keeps that many fewer or more.
MLP_ACTIVATION_BYTES_PER_UNIT_16BIT = 4
# The span's ramp, its clamp and log, and the keep mask that autograd saves per (head, query,
# key) and layer: 13 bytes measured (saved_tensors_hooks, small preset, fp32), rounded up.
SPAN_BIAS_BYTES = 16
# CUDA context, library workspaces and allocator slack on top of the tensors: the low end of
# the usual 0.5-2 GB, so the estimate refuses only GPUs the run clearly cannot fit.
RUNTIME_OVERHEAD_BYTES = GIB


@dataclass(frozen=True)
class Shape:
    """What memory depends on: the model's shape and one worker's micro-batch."""

    n_layer: int
    n_embd: int
    vocab_size: int
    block_size: int  # position embeddings (the context)
    batch_size: int  # per worker, per micro-batch
    seq_len: int
    compute_bytes: int  # 2 under bf16/fp16 autocast, 4 in fp32
    compiled: bool = False  # torch.compile'd: fewer copies of the logits live at once
    n_head: int = 1
    attention_span: bool = False  # the learnable span's attention stores its weights
    dropout: bool = False
    mlp_hidden: int | None = None  # the MLP's hidden units per block; None: 4 x n_embd

    @property
    def mlp_units(self) -> int:
        return 4 * self.n_embd if self.mlp_hidden is None else self.mlp_hidden

    @property
    def block_params(self) -> int:
        """One transformer block: qkv (3h² + 3h), projection (h² + h), MLP (2hm + m + h; m =
        4h: 8h² + 5h), two LayerNorms (4h)."""
        h, m = self.n_embd, self.mlp_units
        return 4 * h * h + 8 * h + (2 * h * m + m + h)

    @property
    def params(self) -> int:
        """All parameters: blocks, token and position embeddings (the head is tied to the
        token embedding), final LayerNorm."""
        h = self.n_embd
        return (self.n_layer * self.block_params + self.vocab_size * h + self.block_size * h
                + 2 * h)


@dataclass(frozen=True)
class WorkerMemory:
    """Bytes one worker needs, by kind. `strategy` None: one worker, trained unwrapped."""

    strategy: str | None
    workers: int
    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        setting = (f"{self.strategy} over {self.workers} worker(s)" if self.strategy
                   else f"{self.workers} worker (no DDP)")
        return (f"{setting}: {self.total / GIB:.2f} GiB per worker (weights "
                f"{self.weights / GIB:.2f}, gradients {self.gradients / GIB:.2f}, "
                f"optimizer {self.optimizer / GIB:.2f}, activations {self.activations / GIB:.2f})")


def activation_bytes(shape: Shape) -> int:
    tokens = shape.batch_size * shape.seq_len
    per_layer = (tokens * (ACTIVATION_BYTES_PER_LAYER_16BIT * shape.n_embd
                           + MLP_ACTIVATION_BYTES_PER_UNIT_16BIT
                           * (shape.mlp_units - 4 * shape.n_embd))
                 * shape.compute_bytes // 2)
    # The logits in the compute dtype, and in eager mode their gradient beside them.
    copies = 1 if shape.compiled else 2
    logits = tokens * shape.vocab_size * shape.compute_bytes * copies
    return shape.n_layer * per_layer + logits + span_attention_bytes(shape)


def span_attention_bytes(shape: Shape) -> int:
    """What the learnable span's attention (training/attention.py) adds: it computes the
    attention weights itself and keeps them for the backward pass. Per layer: the fp32 softmax
    (with dropout also its mask and output; in 16 bits the cast copy the matmul keeps) for
    every (sample, head, query, key), and the span's ramp and log-bias, SPAN_BIAS_BYTES per
    (head, query, key); plus, while one layer runs, its scores and their fp32 biased copy.
    Sized at the widest window the spans can learn (every query sees every earlier key): a
    run placed on a narrower one would run out of memory as its spans grow."""
    if not shape.attention_span:
        return 0
    per_sample = shape.n_head * shape.seq_len * shape.seq_len
    scores = shape.batch_size * per_sample
    kept = FP32 + (2 * FP32 if shape.dropout else 0) \
        + (shape.compute_bytes if shape.compute_bytes < FP32 else 0)
    running = shape.compute_bytes + FP32
    return shape.n_layer * (scores * kept + per_sample * SPAN_BIAS_BYTES) + scores * running


def ddp_worker_memory(shape: Shape, workers: int) -> WorkerMemory:
    n = shape.params
    low_precision_copies = n * shape.compute_bytes if shape.compute_bytes < FP32 else 0
    # At world size 1 the sessions (and Ray Train's prepare_model) leave the model unwrapped:
    # no DDP, so none of its buckets, and the dry run says so rather than "DDP over 1".
    ddp = workers > 1
    gradients = n * FP32 * (2 if ddp else 1)  # .grad, and DDP's buckets
    return WorkerMemory("DDP" if ddp else None, workers, n * FP32 + low_precision_copies,
                        gradients, n * ADAM_BYTES, activation_bytes(shape))


def fsdp_worker_memory(shape: Shape, workers: int) -> WorkerMemory:
    n, block = shape.params, shape.block_params
    embeddings = n - shape.n_layer * block  # the root's parameters, gathered for the whole step
    # Gathered for compute: the root plus two blocks (the one running and the prefetched next).
    gathered = (embeddings + 2 * block) * shape.compute_bytes
    # Sharded fp32 gradients; the root's unsharded gradients (in the compute dtype), held
    # through the whole backward (the head, tied to the token embedding, starts them and the
    # embeddings end them); and the fp32 reduce-scatter copy of a block's unsharded
    # gradients, or at the end of the backward the root's, the larger of the two.
    gradients = (-(-n * FP32 // workers) + embeddings * shape.compute_bytes
                 + max(block, embeddings) * FP32)
    return WorkerMemory("FSDP", workers, -(-n * FP32 // workers) + gathered, gradients,
                        -(-n * ADAM_BYTES // workers), activation_bytes(shape))


def shape_of(config: TrainConfig, on_gpu: bool) -> Shape:
    """The memory-relevant shape of a run. Precision `auto` computes in 16 bits on a GPU (bf16
    or fp16 with loss scaling) and in fp32 on a CPU; the model is compiled where
    `TrainConfig.compiles_on` says (by default on a GPU)."""
    low = config.precision in ("bf16", "fp16") or (config.precision == "auto" and on_gpu)
    preset = config.model_preset
    return Shape(n_layer=preset["n_layer"], n_embd=preset["n_embd"],
                 vocab_size=config.vocab_size, block_size=config.seq_len,
                 batch_size=config.batch_size, seq_len=config.seq_len,
                 compute_bytes=2 if low else FP32,
                 compiled=config.compiles_on("cuda" if on_gpu else "cpu"),
                 n_head=preset["n_head"], attention_span=config.attention_span,
                 dropout=config.dropout > 0, mlp_hidden=config.mlp_hidden)


def worker_memory(config: TrainConfig, workers: int, on_gpu: bool) -> WorkerMemory:
    """The estimate under the run's own strategy."""
    estimate = fsdp_worker_memory if config.strategy == "fsdp" else ddp_worker_memory
    return estimate(shape_of(config, on_gpu), workers)


def gpu_memory_needed_gb(config: TrainConfig, workers: int) -> float:
    """Free memory (GiB, rounded up to 0.1) each worker's GPU needs for this run: the
    estimate under its strategy plus the runtime's overhead."""
    needed = worker_memory(config, workers, on_gpu=True).total + RUNTIME_OVERHEAD_BYTES
    return _gib_rounded_up(needed)


def cpu_memory_needed_gb(config: TrainConfig, workers: int) -> float:
    """Host RAM (GiB, rounded up to 0.1) each worker of a CPU run needs: `--dry-run`'s
    estimate on a CPU (fp32 unless --precision says otherwise), without the GPU runtime's
    overhead. jobs/pretrain.py asks placement for it (JobSpec.min_host_memory_gb), and the
    embedded Ray's refusal (cpu_memory_refusal) counts it per worker."""
    return _gib_rounded_up(worker_memory(config, workers, on_gpu=False).total)


def _gib_rounded_up(size: int) -> float:
    return math.ceil(size / GIB * 10) / 10


def sizing_flags(config: TrainConfig) -> str:
    """The flags that size a worker's memory, as the messages about too little name them
    (jobs/pretrain.py's need past any GPU, the training loop's out-of-memory stop)."""
    return (f"--model-size {config.model_size}, --batch-size {config.batch_size} x --seq-len "
            f"{config.seq_len} per worker, --strategy {config.strategy}")


# What lowers that need, in those messages.
LOWER_MEMORY = ("lower --batch-size or --seq-len (--accumulation keeps the tokens per optimizer "
                "step) or --model-size")


def cpu_memory_refusal(config: TrainConfig, per_worker: float, workers: int,
                       available_bytes: int, where: str) -> str | None:
    """Why a CPU run whose `workers` workers all run on one node (`where`: an embedded Ray's
    machine) cannot fit its available RAM by the estimate, or None. `per_worker` (GiB) is
    the estimate the caller already has, the figure a cluster's placement is asked for
    (cpu_memory_needed_gb: JobSpec.min_host_memory_gb): `--dry-run`'s on a CPU (fp32 unless
    --precision says otherwise), without the GPU runtime's overhead. Refused only where the
    run clearly cannot fit, instead of the kernel's OOM killer ending a worker mid-run."""
    need = per_worker * workers
    if need * GIB <= available_bytes:
        return None
    compute = "fp32" if shape_of(config, on_gpu=False).compute_bytes == FP32 else "16-bit"
    return (f"this run needs about {need:,.1f} GiB of RAM on {where} by the estimate: "
            f"{per_worker:,.1f} GiB per worker ({sizing_flags(config)}, {compute} "
            f"on CPU) x {workers} worker(s) (--num-workers {workers}, each on {where}), and it "
            f"has {available_bytes / GIB:,.1f} GiB available: {LOWER_MEMORY}"
            f"{' or --num-workers' if workers > 1 else ''}, or give --address of a cluster")


def parameters_label(count: int) -> str:
    """A model's size wherever one is shown (the dry run, the training banner, compression's
    distill line and --student-size refusal, the benchmarks): every parameter, the position
    table included (Shape.params, GPT.num_params(non_embedding=False); GPT-2 small is
    124.44M so). Only MFU's FLOPs per token count the table out (GPT.num_params' default),
    as PaLM's formula does."""
    return f"{count / 1e6:,.2f}M parameters"


def memory_lines(config: TrainConfig, workers: int, on_gpu: bool) -> list[str]:
    """What `jobs/pretrain.py --dry-run` prints about memory: per worker under DDP (one
    worker: unwrapped, no DDP) and FSDP."""
    shape = shape_of(config, on_gpu)
    lines = [f"model: {config.model_size}, {parameters_label(shape.params)} (vocabulary "
             f"{shape.vocab_size:,}); micro-batch {shape.batch_size} x {shape.seq_len} tokens "
             f"per worker, {'16-bit' if shape.compute_bytes == 2 else 'fp32'} compute",
             "memory per worker (estimate; plus the CUDA context and allocator slack, "
             "typically 0.5-2 GB):"]
    for estimate in (ddp_worker_memory(shape, workers), fsdp_worker_memory(shape, workers)):
        lines.append(f"  {estimate.describe()}")
    return lines
