"""Compression: pruning, fake quantization, distillation, the fine-tune loop, INT8 export.

Models here are a few tens of thousands of parameters and fine-tunes a handful of steps; one
INT8 export (about 8 s, the ONNX exporter's fixed cost) is shared by the export tests."""
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.compression import export, prune, qat
from orchestrator.compression.artifacts import CheckpointError
from orchestrator.compression.config import CompressConfig, resume_conflicts
from orchestrator.compression.distill import distillation_loss
from orchestrator.compression.finetune import Plan, PruneSchedule, finetune
from orchestrator.config import ConfigError
from orchestrator.training.data import load_corpus, split_corpus
from orchestrator.training.memory import parameters_label
from orchestrator.training.model import GPT, GPTConfig

TINY = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32)


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(TINY).eval()


@pytest.fixture(scope="module")
def train_tokens():
    return split_corpus(load_corpus())[0]


def plan(stage="prune", steps=6, **kw):
    base = dict(stage=stage, steps=steps, stream=102, lr=1e-3, warmup_steps=1,
                weight_decay=0.0, grad_clip=1.0, batch_size=4, seq_len=16, seed=7, alpha=0.5,
                temperature=2.0, log_every=100, checkpoint_every=100)
    base.update(kw)
    return Plan(**base)


# ---- pruning -------------------------------------------------------------------------------

def test_prunable_layers_are_the_block_linears_not_the_tied_embedding():
    names = prune.prunable_names(tiny_gpt())
    assert names == [f"blocks.{i}.{m}" for i in range(2)
                     for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]


@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_masks_reach_the_target_sparsity(scope):
    weights = prune.prunable_weights(tiny_gpt())
    masks = prune.compute_masks(weights, 0.3, scope)
    prune.apply_masks(weights, masks)
    assert 0.30 <= prune.sparsity(weights) < 0.301
    if scope == "per_layer":
        assert all(prune.sparsity({n: w}) >= 0.30 for n, w in weights.items())
    # Magnitude pruning: every pruned weight was no larger than every kept one.
    original = prune.prunable_weights(tiny_gpt())
    kept = torch.cat([original[n][m].abs() for n, m in masks.items()])
    dropped = torch.cat([original[n][~m].abs() for n, m in masks.items()])
    if scope == "global":
        assert dropped.max() <= kept.min()


def test_schedule_rises_to_the_target_and_stays():
    values = [prune.scheduled_sparsity(s, 20, 0.3) for s in range(0, 30)]
    assert values[0] == 0 and values[20] == pytest.approx(0.3) and values[29] == pytest.approx(0.3)
    assert all(a <= b for a, b in zip(values, values[1:]))
    schedule = PruneSchedule(final=0.3, scope="global", ramp_steps=8, every=3)
    assert [s for s in range(12) if schedule.target_at(s) is not None] == [3, 6, 8]


def test_sparsity_after_stage_1_and_masks_fixed_through_qat(train_tokens):
    teacher, student = tiny_gpt(), tiny_gpt()
    schedule = PruneSchedule(final=0.3, scope="global", ramp_steps=4, every=2)
    masks, metrics = finetune(student, teacher, train_tokens, plan(steps=6), torch.device("cpu"),
                              schedule=schedule, log=lambda line: None)
    weights = prune.prunable_weights(student)
    assert prune.sparsity(weights) >= 0.30 and metrics["linear_weight_sparsity"] >= 0.30
    zeros_after_prune = {n: (w == 0).clone() for n, w in weights.items()}

    qat.prepare_qat(student, prune.prunable_names(student))
    masks, _ = finetune(student, teacher, train_tokens, plan("qat", steps=4, stream=103),
                        torch.device("cpu"), masks=masks, log=lambda line: None)
    weights = prune.prunable_weights(student)
    assert prune.sparsity(weights) >= 0.30
    for name, w in weights.items():  # the pruned set did not move
        assert torch.equal(w == 0, zeros_after_prune[name]), name
    # ...and it survives into the exported int8 weights (zeros quantize to exactly 0).
    q = {n: qat.quantize_weight(w)[0] for n, w in weights.items()}
    assert prune.sparsity(q) >= 0.30


def test_fine_tune_lr_warms_up_then_decays_to_a_tenth_of_the_peak():
    p = plan(steps=10, warmup_steps=2, lr=1.0)
    assert [p.lr_at(s) for s in range(3)] == [0.5, 1.0, 1.0]
    assert p.lr_at(10) == pytest.approx(0.1) and p.lr_at(20) == pytest.approx(0.1)
    lrs = [p.lr_at(s) for s in range(2, 11)]
    assert lrs == sorted(lrs, reverse=True)


def test_interrupted_fine_tune_resumes_exactly(train_tokens, tmp_path):
    teacher = tiny_gpt(1)
    reference = tiny_gpt()
    finetune(reference, teacher, train_tokens, plan(steps=6), torch.device("cpu"),
             log=lambda line: None)

    class Crash(Exception):
        pass

    def crash_at_step_5(line):
        if "step     5/6" in line:
            raise Crash

    partial = tmp_path / "p.pt"
    crashed = tiny_gpt()
    with pytest.raises(Crash):
        finetune(crashed, teacher, train_tokens, plan(steps=6, log_every=1, checkpoint_every=3),
                 torch.device("cpu"), partial=partial, log=crash_at_step_5)
    lines = []
    resumed = tiny_gpt()
    finetune(resumed, teacher, train_tokens, plan(steps=6, checkpoint_every=3),
             torch.device("cpu"), partial=partial, log=lines.append)
    assert any("resumed at step 3/6" in line for line in lines)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def nan_from_step(monkeypatch, first_bad):
    """Make the fine-tune's loss NaN from its `first_bad`-th step (1-based) on."""
    from orchestrator.compression import finetune as finetune_module
    from orchestrator.compression.distill import DistillLoss

    calls = []

    def loss(*args, **kwargs):
        real = distillation_loss(*args, **kwargs)
        calls.append(1)
        if len(calls) < first_bad:
            return real
        return DistillLoss(*(part * float("nan") for part in real))

    monkeypatch.setattr(finetune_module, "distillation_loss", loss)


def test_a_fine_tune_whose_loss_goes_non_finite_stops_keeping_the_progress_before_it(
        train_tokens, tmp_path, monkeypatch):
    """`--temperature 1e-40` (or any lr that blows up) made every loss NaN, and the stage was
    published anyway (perplexity nan, exit 0). Now the fine-tune stops at the next check (a
    progress line or checkpoint), as pretraining does (training.loop.divergence), naming the
    stage, the steps and the flags to change, before saving progress there: the progress
    checkpoint before the divergence stays."""
    from orchestrator.compression.finetune import progress_checkpoints
    from orchestrator.training.loop import TrainingDiverged

    nan_from_step(monkeypatch, 3)
    partial = tmp_path / ".prune.partial.pt"
    with pytest.raises(TrainingDiverged) as caught:
        finetune(tiny_gpt(), tiny_gpt(1), train_tokens,
                 plan(steps=8, log_every=4, checkpoint_every=2), torch.device("cpu"),
                 partial=partial, log=lambda line: None)
    message = str(caught.value)
    assert message.startswith("prune diverged at step 4: the loss over steps 3-4 was nan; "
                              "stopped before saving progress there"), message
    for flag in ("--lr 0.001", "(--warmup-steps: 1 step(s) in this stage)", "--temperature 2",
                 "rerun with other values: the stages already finished are kept and prune "
                 "starts over from step 0 with them"):
        assert flag in message, message
    assert [p.name for p in progress_checkpoints(partial)] == [".prune.partial.step00000002.pt"]


def test_a_weight_decay_that_blows_the_weights_up_is_named_as_the_cause(train_tokens):
    """`--weight-decay 1e308` diverged at once and was blamed on --lr, --warmup-steps and
    --temperature: lr x weight_decay >= 1 makes AdamW's decay flip or grow the weights."""
    from orchestrator.training.loop import TrainingDiverged

    with pytest.raises(TrainingDiverged, match=r"--weight-decay 1e\+308 x --lr 0.001 is >= 1"):
        finetune(tiny_gpt(), tiny_gpt(1), train_tokens, plan(steps=2, weight_decay=1e308),
                 torch.device("cpu"), log=lambda line: None)


def test_fine_tunes_keep_learnt_spans_in_range_as_training_does(train_tokens):
    """A span pushed past 0 (spans start there) is clamped back after each step, as the
    training loop does: left outside, the clamp in `spans` cuts its gradient and the head's
    span is frozen at 0 for good (it was: raw -0.045 after 20 steps, never to regrow)."""
    import dataclasses

    config = dataclasses.replace(TINY, attention_span=True, span_init=0.0, span_ramp=4)
    torch.manual_seed(0)
    teacher = GPT(config).eval()
    student = GPT(config)
    student.load_state_dict(teacher.state_dict())
    finetune(student, teacher, train_tokens, plan(stage="qat", steps=20, lr=1e-2),
             torch.device("cpu"), log=lambda line: None)
    for block in student.blocks:
        raw = block.attn.span.span_fraction.detach()
        assert ((raw >= 0) & (raw <= 1)).all(), raw


def test_a_stop_while_progress_is_checkpointed_resumes_from_the_previous_one(
        train_tokens, tmp_path, monkeypatch):
    """Stopped (Ctrl-C, ray job stop) after a progress checkpoint's data file is in place but
    before its sha256 is: the rerun resumes from the checkpoint before it, not from step 0."""
    from orchestrator.training import checkpoint

    teacher = tiny_gpt(1)
    reference = tiny_gpt()
    finetune(reference, teacher, train_tokens, plan(steps=6), torch.device("cpu"),
             log=lambda line: None)
    real_sha256, hashed = checkpoint.sha256_file, []

    def stopped_hashing_the_second(path):
        hashed.append(path)
        if len(hashed) == 2:  # the step-4 checkpoint, written, not yet checksummed
            raise KeyboardInterrupt
        return real_sha256(path)

    partial = tmp_path / ".prune.partial.pt"
    monkeypatch.setattr(checkpoint, "sha256_file", stopped_hashing_the_second)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_gpt(), teacher, train_tokens, plan(steps=6, checkpoint_every=2),
                 torch.device("cpu"), partial=partial, log=lambda line: None)
    monkeypatch.setattr(checkpoint, "sha256_file", real_sha256)
    lines = []
    resumed = tiny_gpt()
    finetune(resumed, teacher, train_tokens, plan(steps=6, checkpoint_every=2),
             torch.device("cpu"), partial=partial, log=lines.append)
    assert any("trying the previous progress checkpoint" in line for line in lines), lines
    assert any("resumed at step 2/6" in line for line in lines), lines
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # Progress is saved under a new name and the older one deleted only once the new one is
    # complete: after the rerun's own step-4 save, one checkpoint (and its sidecar) is left.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".prune.partial.step00000004.pt", ".prune.partial.step00000004.pt.sha256"]
    # The single progress file earlier versions wrote is still resumed from.
    for name in (".prune.partial.step00000004.pt", ".prune.partial.step00000004.pt.sha256"):
        (tmp_path / name).rename(tmp_path / name.replace(".step00000004", ""))
    lines.clear()
    finetune(tiny_gpt(), teacher, train_tokens, plan(steps=6, checkpoint_every=2),
             torch.device("cpu"), partial=partial, log=lines.append)
    assert any(f"resumed at step 4/6 from {partial}" in line for line in lines), lines


# ---- distillation --------------------------------------------------------------------------

def test_distillation_loss_is_zero_when_student_equals_teacher():
    logits = torch.randn(2, 5, 256)
    targets = torch.randint(0, 256, (2, 5))
    loss = distillation_loss(logits, logits.clone(), targets, alpha=0.0, temperature=2.0)
    assert loss.kd.abs().item() < 1e-6 and loss.total.abs().item() < 1e-6
    mixed = distillation_loss(logits, logits.clone(), targets, alpha=0.3, temperature=4.0)
    assert mixed.total.item() == pytest.approx(0.3 * mixed.ce.item(), abs=1e-6)
    other = distillation_loss(logits, torch.randn(2, 5, 256), targets, 0.0, 2.0)
    assert other.kd.item() > 0.01


def test_distillation_matches_the_formula():
    s, t = torch.randn(3, 4, 256), torch.randn(3, 4, 256)
    y = torch.randint(0, 256, (3, 4))
    alpha, temp = 0.25, 3.0
    loss = distillation_loss(s, t, y, alpha, temp)
    p_t = torch.softmax(t / temp, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s / temp, -1))).sum(-1).mean()
    ce = torch.nn.functional.cross_entropy(s.view(-1, 256), y.view(-1))
    assert loss.total.item() == pytest.approx((alpha * ce + (1 - alpha) * temp ** 2 * kl).item(),
                                              rel=1e-5)


# ---- fake quantization ---------------------------------------------------------------------

def test_fake_quant_passes_gradients_straight_through():
    w = torch.randn(8, 16, requires_grad=True)
    qat.fake_quant_weight(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    x = torch.randn(4, 16, requires_grad=True)
    qat.fake_quant_activation(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_weight_quantization_is_per_channel_symmetric():
    w = torch.randn(8, 16) * torch.arange(1, 9)[:, None]  # rows of very different scale
    q, s = qat.quantize_weight(w)
    assert q.dtype == torch.int8 and s.shape == (8,)
    assert q.abs().max() == qat.WEIGHT_QMAX and (q.abs().amax(1) == qat.WEIGHT_QMAX).all()
    assert torch.allclose(q.float() * s[:, None], w, atol=(s / 2).max().item() + 1e-6)
    q8, _ = qat.quantize_weight(w, qmax=127)
    assert q8.abs().max() == 127


def test_a_row_whose_scale_underflows_quantizes_to_zeros_not_nan():
    # max|w| / qmax underflows to 0 for a nonzero row of subnormal fp32 weights (or of fp16
    # weights under ~4e-6): w / 0 was inf or NaN, so QAT's forward went NaN and the int8 row
    # held whatever NaN casts to. Such a row is below int8's resolution: it quantizes to 0.
    w = torch.randn(3, 8)
    w[1] = torch.tensor([1e-44, -3e-45] + [0.0] * 6)
    q, s = qat.quantize_weight(w)
    assert (s > 0).all() and torch.equal(q[1], torch.zeros(8, dtype=torch.int8))
    assert torch.isfinite(qat.fake_quant_weight(w)).all()
    half = torch.full((2, 4), 1e-6, dtype=torch.float16)
    assert torch.equal(qat.fake_quant_weight(half), torch.zeros_like(half))


def test_activation_fake_quant_is_onnx_dynamic_quantize_linear():
    import onnxruntime as ort
    from onnx import TensorProto, helper

    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "scale", "zp"])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 32])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [64, 32]),
         helper.make_tensor_value_info("scale", TensorProto.FLOAT, []),
         helper.make_tensor_value_info("zp", TensorProto.UINT8, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(64, 32) * 3 + 1
    y, scale, zp = session.run(None, {"x": x.numpy()})
    ours_scale, ours_zp = qat.activation_qparams(x)
    assert ours_scale.item() == pytest.approx(float(scale), rel=1e-6) and ours_zp.item() == zp
    ours = torch.clamp(torch.round(x / ours_scale) + ours_zp, 0, 255)
    assert (ours.numpy() != y).sum() == 0


# ---- export --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_gpt(3)
    names = prune.prunable_names(model)
    weights = prune.prunable_weights(model)
    prune.apply_masks(weights, prune.compute_masks(weights, 0.4, "global"))
    qat.prepare_qat(model, names)
    directory = tmp_path_factory.mktemp("int8")
    info = export.save_int8(directory, model, names)
    return model, names, directory, info


def test_a_diverged_models_perplexity_is_inf_not_an_overflow():
    from orchestrator.compression.measure import perplexity

    def diverged(x):  # all its probability on token 0; the targets are token 1
        logits = torch.zeros(*x.shape, 4)
        logits[..., 0] = 1e5
        return logits, None

    inputs = torch.zeros(2, 8, dtype=torch.long)
    assert perplexity(diverged, inputs, torch.ones_like(inputs), 1) == math.inf


def test_a_short_eval_tokens_is_blamed_not_the_held_out_text_cut_to_it():
    # A teacher trained on --data hands over its held-out tokens cut to eval_tokens + 1: the
    # message blamed "the teacher's held-out text (11 tokens)" of a split of 23,805.
    from orchestrator.compression.pipeline import check_eval_window

    cut = torch.zeros(11, dtype=torch.long)
    with pytest.raises(ConfigError, match=r"^eval_tokens \(--eval-tokens\) 10 is shorter"):
        check_eval_window(CompressConfig(eval_tokens=10), cut, 32)
    with pytest.raises(ConfigError, match=r"^the teacher's held-out text \(11 tokens\)"):
        check_eval_window(CompressConfig(eval_tokens=4096), cut, 32)


def test_the_int8_export_carries_a_bpe_teachers_tokenizer(tmp_path):
    # It was served with the byte tokenizer: a BPE-trained model's ids read as bytes.
    import dataclasses

    from orchestrator.compression.config import CompressConfig
    from orchestrator.compression.pipeline import Run, stage_export
    from orchestrator.serving.loading import load_model
    from orchestrator.tokenizer import TOKENIZER_FILE, ByteTokenizer, train_bpe

    bpe = train_bpe(["hello world, the quick brown fox jumps over the lazy dog"] * 50, 300)
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(TINY, vocab_size=bpe.vocab_size)).eval()
    logged = []
    run = Run(tmp_path, CompressConfig(), model, torch.zeros(64, dtype=torch.long),
              torch.device("cpu"), 16, logged.append, bpe)
    int8_dir = stage_export(run, model)
    served = load_model(int8_dir)
    assert served.tokenizer.vocab_size == bpe.vocab_size
    # Its int8 matrices and biases (buffers) counted too, as the fp32 model's parameters.
    assert served.params == model.num_params(non_embedding=False)
    assert served.tokenizer.encode("hello world") == bpe.encode("hello world")
    # Without its tokenizer.json the export is refused, not served with bytes.
    (int8_dir / TOKENIZER_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"no {TOKENIZER_FILE} is beside it"):
        load_model(int8_dir)
    # A rerun over an export that lacks it exports again; a bytes teacher's export needs none.
    assert stage_export(run, model) == int8_dir and (int8_dir / TOKENIZER_FILE).is_file()
    assert any("does not carry the teacher's tokenizer" in line for line in logged)
    bytes_run = dataclasses.replace(run, tokenizer=ByteTokenizer(), out=tmp_path / "b")
    small = GPT(TINY).eval()
    assert isinstance(load_model(stage_export(bytes_run, small)).tokenizer, ByteTokenizer)


def test_weights_torch_writes_beside_a_large_onnx_export_are_removed_and_counted(
        tmp_path, monkeypatch):
    """torch.onnx saves the weights to `<file>.data` once they pass 1.5 GiB, whatever
    external_data=False says (forced here for a tiny model): the int8 export's temporary fp32
    graph left its .data in int8/ for good, and the fp32 baseline's size left it out."""
    import torch.onnx._internal.exporter._onnx_program as onnx_program

    from orchestrator.compression import measure

    monkeypatch.setattr(onnx_program, "_LARGE_MODEL_THRESHOLD", 0)
    model = tiny_gpt()
    (tmp_path / "int8").mkdir()
    export.save_int8(tmp_path / "int8", model, prune.prunable_names(model))
    assert sorted(p.name for p in (tmp_path / "int8").iterdir()) == [
        export.CONFIG_FILE, export.ONNX_FILE, export.TORCH_FILE, export.TORCH_FILE + ".sha256"]
    fp32 = export.export_fp32_onnx(model, tmp_path / "original.fp32.onnx")
    data = tmp_path / "original.fp32.onnx.data"
    assert data.stat().st_size > 4 * model.num_params() * 0.9  # the weights are there
    assert measure.size_bytes(fp32) == fp32.stat().st_size + data.stat().st_size


def test_the_onnx_export_carries_no_stack_traces_with_local_paths(exported):
    """torch.onnx records every node's Python stack trace (~1 KB a node) with this machine's
    absolute paths: not for a model file handed to others."""
    import onnx

    _, _, directory, _ = exported
    path = directory / export.ONNX_FILE
    nodes = onnx.load(str(path)).graph.node
    assert not [n.name for n in nodes
                if any(p.key == export.STACK_TRACE_KEY for p in n.metadata_props)]
    repo = str(Path(export.__file__).resolve().parents[2]).encode()
    assert repo not in path.read_bytes()
    # What ONNX Runtime needs is all there (the graph still checks and runs: the tests below).
    assert any(n.op_type == "MatMulInteger" for n in nodes)


def test_exported_linear_weights_are_int8(exported):
    import onnx
    from onnx import TensorProto, numpy_helper

    model, names, directory, info = exported
    assert info["matmuls_rewritten"] == len(names)
    graph = onnx.load(str(directory / export.ONNX_FILE)).graph
    inits = {i.name: i for i in graph.initializer}
    for name in names:
        q, s = qat.quantize_weight(model.get_submodule(name).weight)
        stored = inits[f"{name}.weight_int8"]
        assert stored.data_type == TensorProto.INT8
        assert np.array_equal(numpy_helper.to_array(stored), q.t().numpy())
        assert np.array_equal(numpy_helper.to_array(inits[f"{name}.weight_scale"]), s.numpy())
    # No fp32 copy of a block Linear's matrix is left in the graph: the only 2-D float
    # initializers are the embeddings.
    float_matrices = [i for i in graph.initializer
                      if i.data_type == TensorProto.FLOAT and len(i.dims) == 2]
    assert all(TINY.n_embd in i.dims and (256 in i.dims or TINY.block_size in i.dims)
               for i in float_matrices)
    assert sum(n.op_type == "MatMulInteger" for n in graph.node) == len(names)

    state = torch.load(directory / export.TORCH_FILE, weights_only=True)
    assert {q.dtype for q in state["int8"].values()} == {torch.int8}
    assert prune.sparsity(state["int8"]) >= 0.4
    assert not any(k.endswith(".weight") and k.rsplit(".", 1)[0] in names
                   for k in state["fp32"])


def test_int8_models_stay_close_to_their_fake_quant_twin(exported):
    model, _, directory, _ = exported
    x = torch.randint(0, 256, (4, TINY.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        twin = model(x)[0]
        torch_int8 = export.load_int8_model(directory)(x)[0]
    onnx_int8, _ = export.load_onnx_model(directory, threads=1)(x)
    span = (twin.max() - twin.min()).item()
    # torch: the same arithmetic. ONNX Runtime: integer matmuls are exact (7-bit weights),
    # float ops (LayerNorm, GELU, softmax) differ in the last bits, which can move an
    # activation across a rounding boundary now and then.
    assert (torch_int8 - twin).abs().max().item() < 1e-4
    assert (onnx_int8 - twin).abs().max().item() < 0.02 * span
    assert (onnx_int8 - twin).abs().mean().item() < 0.002 * span
    assert (onnx_int8.argmax(-1) == twin.argmax(-1)).float().mean() > 0.95


def test_linears_with_equal_weights_export_each_with_its_own_int8_matmul(tmp_path):
    """Unstructured pruning at a high --prune-sparsity zeroes whole small matrices (both
    attn.proj here, global scope at 0.98): torch.onnx then stores the two equal weights as one
    initializer that two MatMuls read. The export failed after every fine-tune: "the exported
    graph has no MatMul with the weight of blocks.1.attn.proj"."""
    import onnx

    model = tiny_gpt(5)
    names = prune.prunable_names(model)
    with torch.no_grad():
        model.blocks[0].attn.proj.weight.zero_()
        model.blocks[1].attn.proj.weight.zero_()
    info = export.save_int8(tmp_path, model, names)
    assert info["matmuls_rewritten"] == len(names)
    quantized = {n.name for n in onnx.load(str(tmp_path / export.ONNX_FILE)).graph.node
                 if n.op_type == "MatMulInteger"}
    assert {f"{name}/0/matmul_int8" for name in names} <= quantized
    x = torch.randint(0, 256, (2, TINY.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch_int8 = export.load_int8_model(tmp_path)(x)[0]
    onnx_int8, _ = export.load_onnx_model(tmp_path, threads=1)(x)
    assert (torch.as_tensor(onnx_int8) - torch_int8).abs().max().item() < 0.02


def test_int8_artifacts_refuse_tampering(exported, tmp_path):
    import shutil

    _, _, directory, _ = exported
    copy = tmp_path / "int8"
    shutil.copytree(directory, copy)
    data = bytearray((copy / export.TORCH_FILE).read_bytes())
    data[-20] ^= 0xFF
    (copy / export.TORCH_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="weights.int8.pt is corrupt"):
        export.load_int8_model(copy)
    onnx_bytes = bytearray((copy / export.ONNX_FILE).read_bytes())
    onnx_bytes[-100] ^= 0xFF
    (copy / export.ONNX_FILE).write_bytes(bytes(onnx_bytes))
    with pytest.raises(CheckpointError, match="model.int8.onnx is corrupt"):
        export.load_onnx_model(copy)
    info = json.loads((directory / export.CONFIG_FILE).read_text())
    assert info["load"]["torch"].endswith("load_int8_model(dir)")


@pytest.mark.parametrize("checksum", [5, None, ["ab"], {"sha256": "ab"}, "abc", "A" * 64])
def test_an_int8_description_whose_checksum_is_not_text_is_named(tmp_path, checksum):
    # A hand-edited config.json: `"files": {"model.int8.onnx": 5}` raised TypeError: 'int'
    # object is not subscriptable, naming neither the file nor the field.
    import dataclasses

    config = GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8)
    (tmp_path / export.ONNX_FILE).write_bytes(b"x")
    (tmp_path / export.CONFIG_FILE).write_text(json.dumps(
        {"files": {export.ONNX_FILE: checksum}, "gpt_config": dataclasses.asdict(config)}))
    with pytest.raises(CheckpointError, match=re.escape(
            f"{tmp_path / export.CONFIG_FILE}: files.{export.ONNX_FILE} must be the sha256 of "
            f"{export.ONNX_FILE} (64 hex digits), got {checksum!r}")):
        export.load_onnx_model(tmp_path)


# ---- config --------------------------------------------------------------------------------

def test_invalid_config_names_every_bad_field():
    with pytest.raises(ConfigError) as error:
        CompressConfig(prune_sparsity=1.5, alpha=-0.1, temperature=0, prune_scope="rows",
                       weight_bits=4, qat_steps=-1)
    message = str(error.value)
    for field in ("prune_sparsity (--prune-sparsity)", "alpha (--alpha)", "temperature",
                  "prune_scope", "weight_bits", "qat_steps"):
        assert field in message
    with pytest.raises(ConfigError, match="weight_bits"):
        CompressConfig(weight_bits=7.0)  # 7.0 in (7, 8): a float qmax of 63.0 before
    with pytest.raises(ConfigError, match="student_size"):
        CompressConfig(student_size="huge")
    for unhashable in (["tiny"], {"tiny": 1}):  # (a TypeError before: unhashable type)
        with pytest.raises(ConfigError, match="student_size"):
            CompressConfig.from_dict({"student_size": unhashable})
    with pytest.raises(ConfigError, match="unknown field.*'alpah' \\(did you mean 'alpha'"):
        CompressConfig.from_dict({"alpah": 0.5})


def test_resume_conflicts_ignore_bookkeeping_fields():
    saved = CompressConfig().to_dict()
    assert resume_conflicts(saved, CompressConfig(log_every=1, latency_repeats=3)) == []
    assert resume_conflicts(saved, CompressConfig(prune_sparsity=0.5)) == [
        "prune_sparsity: 0.3 -> 0.5"]


def test_resume_conflicts_ignore_settings_that_run_the_same():
    # Refused before: `seq_len: None -> 32` for the teacher's own context, and settings the
    # run does not use.
    saved = CompressConfig(prune_structure="unstructured").to_dict()
    same = CompressConfig(prune_structure="unstructured", seq_len=32,
                          prune_importance="magnitude", distill_steps=5)
    assert resume_conflicts(saved, same, block_size=32) == []
    assert resume_conflicts(saved, same, block_size=64) == ["seq_len: 64 -> 32"]
    structured = CompressConfig().to_dict()  # there the importance ranks the units
    assert resume_conflicts(structured, CompressConfig(prune_importance="magnitude"),
                            block_size=32) == ["prune_importance: 'taylor' -> 'magnitude'"]
    student = CompressConfig(student_size="tiny").to_dict()
    assert resume_conflicts(student, CompressConfig(student_size="tiny", distill_steps=5),
                            block_size=32) == ["distill_steps: 300 -> 5"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from a second thread, and on a machine shared with other test
    runs OpenMP's spinning second thread made these tests ~5x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- a smaller student ---------------------------------------------------------------------

def every_weight(model):
    return sum(p.numel() for p in model.parameters())


def test_smaller_student_is_distilled_first_and_reused_on_rerun(train_tokens, tmp_path):
    from orchestrator.compression.pipeline import Run, stage_student

    torch.manual_seed(0)
    teacher = GPT(GPTConfig(block_size=16, n_layer=3, n_head=2, n_embd=96)).eval()
    config = CompressConfig(student_size="tiny", distill_steps=4, batch_size=4, log_every=2,
                            alpha=0.0)
    lines = []
    run = Run(tmp_path, config, teacher, train_tokens, torch.device("cpu"), 16, lines.append)
    student, metrics = stage_student(run)
    # Counted as the training banner and the dry run count: every weight (the position table
    # too; the log gave GPT.num_params(), FLOPs' count, which leaves it out).
    assert lines[0] == (f"distill: tiny student ({parameters_label(every_weight(student))}) "
                        f"from a teacher of {parameters_label(every_weight(teacher))}")
    assert (student.config.n_layer, student.config.n_embd) == (2, 64)
    assert student.config.block_size == 16 and student.config.dropout == 0.0
    assert metrics["steps"] == 4 and metrics["final_kd"] > 0 and metrics["final_ce"] > 0
    assert any(line.startswith("distill step     4/4") for line in lines)
    assert (tmp_path / "distilled" / "weights.pt").is_file()
    assert not list(tmp_path.glob(".distill.partial*"))  # progress file gone once published

    again, _ = stage_student(Run(tmp_path, config, teacher, train_tokens, torch.device("cpu"),
                                 16, lines.append))
    assert any("distilled: already done" in line for line in lines)
    for a, b in zip(student.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)

    same = stage_student(Run(tmp_path / "b", CompressConfig(), teacher, train_tokens,
                             torch.device("cpu"), 16, lines.append))[0]
    assert same.config.n_embd == 96 and torch.equal(same.blocks[0].mlp.fc.weight,
                                                     teacher.blocks[0].mlp.fc.weight)


def test_onnx_export_is_tried_again_after_cpythons_spurious_ast_error(monkeypatch):
    """python/cpython#106905: Python 3.11's AST constructor can raise a SystemError that has
    nothing to do with the code (seen once inside torch.onnx.export in a full test run)."""
    import torch.onnx

    from orchestrator.compression import export

    calls = []

    def flaky(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise SystemError("AST constructor recursion depth mismatch (before=141, after=74)")
        return "program"

    monkeypatch.setattr(torch.onnx, "export", flaky)
    assert export._onnx_program(torch.nn.Identity(), (torch.zeros(1),)) == "program"
    assert len(calls) == 2

    def always(*args, **kwargs):  # twice in a row, or another SystemError: raised as is
        raise SystemError("AST constructor recursion depth mismatch")

    monkeypatch.setattr(torch.onnx, "export", always)
    with pytest.raises(SystemError):
        export._onnx_program(torch.nn.Identity(), (torch.zeros(1),))

    def other(*args, **kwargs):
        calls.append(args)
        raise SystemError("something else")

    calls.clear()
    monkeypatch.setattr(torch.onnx, "export", other)
    with pytest.raises(SystemError, match="something else"):
        export._onnx_program(torch.nn.Identity(), (torch.zeros(1),))
    assert len(calls) == 1


# ---- what the files hold -------------------------------------------------------------------

@pytest.fixture
def cpu_copies_like_cuda(monkeypatch):
    """`.cpu()` returning a fresh copy, as it does for a CUDA tensor: two entries that are one
    tensor in the model then come out as two unless the copy keeps them one."""
    real = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: real(self, *a, **k).clone())


def saved_once(path, first, second):
    state = torch.load(path, weights_only=True)
    return state, lambda group: (group[first].untyped_storage().data_ptr()
                                 == group[second].untyped_storage().data_ptr())


def test_weight_files_hold_the_tied_embedding_once(tmp_path, cpu_copies_like_cuda):
    from orchestrator.compression.artifacts import save_tensors
    from orchestrator.compression.pipeline import Run, stage_original

    model = tiny_gpt()
    embedding = model.tok_emb.weight.numel() * 4
    unique = sum(p.numel() * 4 for p in model.parameters())  # parameters() counts a tie once
    run = Run(tmp_path, CompressConfig(), model, None, torch.device("cpu"), 16, lambda _: None)
    stage_original(run, {"sha256": "x"})  # what the original and the pruned stage write
    path = tmp_path / "original" / "weights.pt"
    state, shared = saved_once(path, "tok_emb.weight", "lm_head.weight")
    # A second copy would add a whole embedding; serialization adds a few KB.
    assert shared(state["model"]) and path.stat().st_size < unique + embedding / 2

    int8 = export.int8_state(model, prune.prunable_names(model))
    save_tensors(tmp_path / export.TORCH_FILE, int8)
    state, shared = saved_once(tmp_path / export.TORCH_FILE, "tok_emb.weight", "lm_head.weight")
    assert shared(state["fp32"])
    fp32_bytes = sum(t.numel() * 4 for t in int8["fp32"].values()) - embedding  # counted once
    int8_bytes = sum(q.numel() + s.numel() * 4 for q, s in zip(int8["int8"].values(),
                                                               int8["scales"].values()))
    assert (tmp_path / export.TORCH_FILE).stat().st_size < fp32_bytes + int8_bytes + embedding / 2
    loaded = export.load_int8_model(tmp_path)  # re-tied as the GPT ties them
    assert loaded.lm_head.weight is loaded.tok_emb.weight


def test_a_stage_of_no_steps_has_null_losses_and_json_files_hold_no_nan(train_tokens, tmp_path):
    from orchestrator.compression.artifacts import write_json

    _, metrics = finetune(tiny_gpt(), tiny_gpt(), train_tokens, plan("qat", steps=0),
                          torch.device("cpu"), log=lambda line: None)
    assert metrics["final_loss"] is None and metrics["final_ce"] is None
    assert metrics["final_kd"] is None
    write_json(tmp_path / "stage.json", metrics)
    assert json.loads((tmp_path / "stage.json").read_text())["final_loss"] is None
    # A diverged loss: null, never the bare NaN other JSON parsers reject; still written.
    write_json(tmp_path / "diverged.json", {"final_loss": float("nan"),
                                            "rows": [{"ppl": float("inf")}, {"ppl": 3.5}]})
    text = (tmp_path / "diverged.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON")) == \
        {"final_loss": None, "rows": [{"ppl": None}, {"ppl": 3.5}]}


def test_the_pruning_stage_reports_sparsity_as_the_report_does(train_tokens, tmp_path):
    """One meaning per name: "sparsity" is the fraction of the block parameters removed, in
    the stage's metrics as in the report's rows and summary (structured.block_sparsity)."""
    from orchestrator.compression.pipeline import Run, stage_prune
    from orchestrator.compression.structured import block_sparsity

    config = CompressConfig(prune_steps=4, prune_every=1, batch_size=4, log_every=100)
    run = Run(tmp_path, config, tiny_gpt(), train_tokens, torch.device("cpu"), 16,
              lambda _: None)
    pruned, _, metrics = stage_prune(run, tiny_gpt())
    assert pruned.config.mlp_hidden or pruned.config.n_heads_per_layer  # shrunk
    assert metrics["sparsity"] == pytest.approx(block_sparsity(pruned, TINY))
    # The zeros among the Linear weights before the shrink: another figure, another name.
    assert metrics["linear_weight_sparsity"] != pytest.approx(metrics["sparsity"])
    saved = json.loads((tmp_path / "pruned" / "stage.json").read_text())
    assert saved["sparsity"] == metrics["sparsity"]


def test_the_report_table_keeps_its_columns_for_long_model_and_runtime_names():
    # "original-onnx" and "onnxruntime int8 static" overran fixed widths: their rows shifted
    from orchestrator.compression.report import format_table

    rows = [{"model": model, "runtime": runtime, "size_bytes": 4e6, "perplexity": 9.5,
             "latency_ms_by_shape": {"b1": 1.0}, "sparsity": 0.3}
            for model, runtime in (("original", "torch fp32"),
                                   ("original-onnx", "onnxruntime fp32"),
                                   ("int8", "onnxruntime int8 static"))]
    report = {"rows": rows, "latency_setup": {"shapes": {"b1": None}, "primary": "b1",
                                              "threads": 2, "cpu": {"isa": "avx2"}},
              "summary": {"size_ratio": 4.0, "latency_ratio": 2.0, "ppl_original": 9.0,
                          "ppl_int8": 9.5, "ppl_increase_pct": 5.0, "sparsity": 0.3}}
    table = format_table(report).splitlines()[:4]
    ends = {line.index("SIZE MB") + len("SIZE MB") if i == 0 else line.index("4.00") + 4
            for i, line in enumerate(table)}
    assert len(ends) == 1, table  # the size column ends at one place in every row
    assert "onnxruntime int8 static" in table[3]


def test_the_report_warns_in_one_line_of_a_perplexity_far_above_the_originals():
    """`--lr 0.99 --grad-clip 0` kept the loss finite and ended with exit 0 and an int8
    perplexity of 1.1e28 (the original's 230) in the table, said nowhere. The run still
    succeeds; the report says so in one line naming the models, their perplexities and the
    flags to look at."""
    from orchestrator.compression.report import format_table

    def report(ppl):
        rows = [{"model": model, "runtime": "torch fp32", "size_bytes": 4e6, "perplexity": value,
                 "latency_ms_by_shape": {"b1": 1.0}, "sparsity": 0.3}
                for model, value in ppl.items()]
        return {"rows": rows, "latency_setup": {"shapes": {"b1": None}, "primary": "b1",
                                                "threads": 2, "cpu": {"isa": "avx2"}},
                "summary": {"size_ratio": 4.0, "latency_ratio": 2.0, "ppl_original": 230.0,
                            "ppl_int8": ppl["int8"], "ppl_increase_pct": 5.0, "sparsity": 0.3}}

    fine = format_table(report({"original": 230.0, "pruned": 2000.0, "int8": 2299.0,
                                "original-onnx": None}))
    assert "warning" not in fine, fine
    bad = format_table(report({"original": 230.0, "pruned": 1.4e16, "int8": 1.1e28,
                               "int8-torch": math.inf, "original-onnx": None}))
    warnings = [line for line in bad.splitlines() if "warning" in line]
    assert warnings == [
        "warning: perplexity over 10x the original's (230): pruned 1.4e+16, int8 1.1e+28, "
        "int8-torch inf; likely a fine-tune gone wrong (look at --lr, --grad-clip, "
        "--warmup-steps, --weight-decay, --temperature): check before using the model"], bad
    assert bad.splitlines()[-1] == warnings[0]


def test_a_finished_stage_that_cannot_be_read_now_is_set_aside_not_deleted(tmp_path,
                                                                          monkeypatch):
    # An I/O error reading stage.json deleted the finished stage (rmtree): a passing fault
    # cost the work for good.
    import errno
    from pathlib import Path

    from orchestrator.compression import pipeline

    stage = tmp_path / "pruned"
    pipeline._save_stage(stage, tiny_gpt(), None, {"loss": 1.0})
    (tmp_path / "pruned.unusable").mkdir()  # an earlier one: replaced (one copy is kept)
    read_text = Path.read_text

    def flaky(path, *args, **kwargs):
        if path.name == pipeline.STAGE_FILE:
            raise OSError(errno.EIO, "Input/output error", str(path))
        return read_text(path, *args, **kwargs)
    monkeypatch.setattr(Path, "read_text", flaky)
    said = []
    assert pipeline._load_stage(stage, said.append) is None
    kept = tmp_path / "pruned.unusable"
    assert not stage.exists() and (kept / pipeline.WEIGHTS_FILE).is_file()
    assert f"kept as {kept}, redoing that stage" in said[0]
    monkeypatch.setattr(Path, "read_text", read_text)
    kept.rename(stage)  # the fault passed: the stage is whole
    assert pipeline._load_stage(stage, said.append)[2] == {"loss": 1.0}


def test_threads_past_the_shared_limit_are_refused_before_any_thread_is_made():
    # (--threads 100000 was accepted: libgomp could not make the threads and the job died
    # of SIGSEGV, exit 139, when the report started, after every fine-tune)
    from orchestrator.validation import MAX_TORCH_THREADS

    rule = f"threads (--threads) must be an integer in [1, {MAX_TORCH_THREADS}]"
    for threads in (100_000, MAX_TORCH_THREADS + 1, 0):
        with pytest.raises(ConfigError, match=re.escape(rule)):
            CompressConfig(threads=threads)
    assert CompressConfig(threads=MAX_TORCH_THREADS).threads == MAX_TORCH_THREADS


def test_the_report_keeps_huge_perplexities_narrow_in_the_table_and_the_summary():
    # A perplexity of 3.5e31 printed as 35319836836120260459671307943936.0000 in the
    # PERPLEXITY column (shifting the SPARSITY column of its row) and in the summary line.
    from orchestrator.compression.report import format_table

    rows = [{"model": model, "runtime": "torch fp32", "size_bytes": 4e6, "perplexity": value,
             "latency_ms_by_shape": {"b1": 1.0}, "sparsity": 0.3}
            for model, value in (("original", 230.1234), ("int8", 3.5319836836120260e31),
                                 ("int8-torch", math.inf), ("original-onnx", None))]
    report = {"rows": rows, "latency_setup": {"shapes": {"b1": None}, "primary": "b1",
                                              "threads": 2, "cpu": {"isa": "avx2"}},
              "summary": {"size_ratio": 4.0, "latency_ratio": 2.0, "ppl_original": 230.1234,
                          "ppl_int8": 3.5319836836120260e31,
                          "ppl_increase_pct": 1.5348e31, "sparsity": 0.3}}
    lines = format_table(report).splitlines()
    table = lines[:5]
    assert len({len(line) for line in table}) == 1, table  # every row as wide as the header
    assert "230.1234" in table[1] and "3.532e+31" in table[2] and " inf " in table[3], table
    summary = lines[5]
    assert "perplexity 230.1234 -> 3.532e+31 (+1.535e+31%)" in summary, summary


def test_a_stage_whose_config_lacks_n_layer_is_refused_naming_it(tmp_path):
    # Filled with the default 4 layers, the stage's weights were refused as not fitting its
    # config ("2 missing ..."), the field it lacks never named.
    from orchestrator.compression import pipeline
    from orchestrator.compression.artifacts import load_tensors, save_tensors

    stage = tmp_path / "pruned"
    pipeline._save_stage(stage, tiny_gpt(), None, {"loss": 1.0})
    weights = load_tensors(stage / pipeline.WEIGHTS_FILE)
    del weights["config"]["n_layer"]
    save_tensors(stage / pipeline.WEIGHTS_FILE, weights)
    with pytest.raises(CheckpointError) as e:
        pipeline.load_stage_model(stage)
    assert str(e.value) == (f"{stage / pipeline.WEIGHTS_FILE}: its config does not describe a "
                            "GPT: ValueError: its model config lacks 'n_layer', which every "
                            "config this project saves records: the file is damaged or not "
                            "this project's")
