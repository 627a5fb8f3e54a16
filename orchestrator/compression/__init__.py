"""Compression: pruning, INT8 quantization-aware training, distillation, INT8 export.

    prune.py      magnitude masks (global or per layer), the gradual sparsity schedule
    structured.py whole attention heads and MLP channels removed, the matrices shrunk
    qat.py        fake quantization with a straight-through estimator; Int8Linear
    distill.py    cross-entropy + temperature-softened KL to a teacher
    finetune.py   the one fine-tune loop every stage uses (resumable, progress lines),
                  on the training loop's optimizer, schedule and step
    export.py     INT8 artifacts: an ONNX graph for ONNX Runtime, a tensors-only torch file
    measure.py    size on disk, CPU latency, held-out perplexity, sparsity
    source.py     finding and loading the teacher checkpoint
    config.py     CompressConfig: the settings, checked, and which a rerun may change
    artifacts.py  checksummed tensor files and staged (renamed-when-complete) folders
    report.py     the report's table and JSON
    pipeline.py   the stages, their resumable outputs under --out, the report

Heavy imports (torch, onnx, onnxruntime) stay inside these modules so `orchestrator` still
imports without them.
"""
