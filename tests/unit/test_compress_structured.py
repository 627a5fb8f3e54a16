"""Structured pruning: whole heads and MLP channels, ranked by importance, removed by masks
during the fine-tune and then cut out of the matrices. Tiny models, seconds."""
import re

import pytest
import torch

from orchestrator.compression import prune, structured
from orchestrator.compression.finetune import Plan, PruneSchedule, finetune
from orchestrator.config import ConfigError
from orchestrator.training.data import load_corpus, split_corpus
from orchestrator.training.model import GPT, GPTConfig

TINY = GPTConfig(block_size=16, n_layer=2, n_head=4, n_embd=32)


def tiny_gpt(config=TINY, seed=0):
    torch.manual_seed(seed)
    return GPT(config).eval()


@pytest.fixture(scope="module")
def train_tokens():
    return split_corpus(load_corpus())[0]


def plan(steps=8, **kw):
    base = dict(stage="prune", steps=steps, stream=102, lr=1e-3, warmup_steps=1,
                weight_decay=0.0, grad_clip=1.0, batch_size=4, seq_len=16, seed=7, alpha=0.5,
                temperature=2.0, log_every=100, checkpoint_every=100)
    base.update(kw)
    return Plan(**base)


def removed_fraction(before: GPTConfig, after: GPTConfig) -> float:
    return 1 - structured.block_params(after) / structured.block_params(before)


@pytest.mark.parametrize("structure", ["both", "heads", "channels"])
def test_the_shrunk_model_computes_what_the_masked_one_did(structure):
    model = tiny_gpt()
    sparsity = 0.2 if structure == "heads" else 0.3
    importance = structured.Importance(model, "magnitude", structure)
    masks = structured.compute_masks(model, importance, sparsity, "global")
    prune.apply_masks(prune.prunable_weights(model), masks)
    small = structured.shrink(model, masks)
    idx = torch.randint(0, 256, (2, 16))
    assert torch.allclose(small(idx)[0], model(idx)[0], atol=1e-5)
    # The matrices themselves are smaller, by at least the amount asked.
    assert removed_fraction(TINY, small.config) >= sparsity
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    if structure == "heads":
        assert sum(small.config.n_heads_per_layer) < 2 * TINY.n_head
        assert small.config.mlp_hidden is None
    if structure == "channels":
        assert sum(small.config.mlp_hidden) < 2 * 4 * TINY.n_embd
        assert small.config.n_heads_per_layer is None
    assert small.lm_head.weight is small.tok_emb.weight  # still tied


def test_the_least_important_head_goes_first():
    model = tiny_gpt()
    with torch.no_grad():  # head 2 of layer 1 barely does anything
        attn, d = model.blocks[1].attn, TINY.head_dim
        for rows in structured._head_rows(TINY.n_head, d, 2):
            attn.qkv.weight[rows] *= 1e-3
        attn.proj.weight[:, 2 * d:3 * d] *= 1e-3
    chosen = structured.choose_units(model, structured.Importance(model, "magnitude", "heads"),
                                     0.01, "global")
    assert chosen == {(1, "head"): [2]}


def test_taylor_importance_follows_the_gradient_not_the_magnitude():
    model = tiny_gpt()
    importance = structured.Importance(model, "taylor", "channels")
    # Channel 5 of layer 0 is large but its output is multiplied by nothing: Taylor sees a zero
    # gradient contribution through proj, magnitude would keep it.
    with torch.no_grad():
        model.blocks[0].mlp.fc.weight[5] *= 50
        model.blocks[0].mlp.proj.weight[:, 5] = 1e-8
    x = torch.randint(0, 256, (4, 16))
    _, loss = model(x, x)
    loss.backward()
    importance.observe(model)
    chosen = structured.choose_units(model, importance, 0.001, "global")
    assert 5 in chosen[(0, "channel")]
    by_magnitude = structured.choose_units(
        model, structured.Importance(model, "magnitude", "channels"), 0.001, "global")
    assert 5 not in by_magnitude.get((0, "channel"), [])


@pytest.mark.parametrize("structure,scope,layer", [
    ("heads", "global", "every attention head of layer 0 (blocks.0.attn) and every other"),
    ("channels", "per_layer", "every MLP channel of layer 0 (blocks.0.mlp)"),
    # Both kinds are taken (was: named only the heads, blocks.0.attn).
    ("both", "per_layer", "would need more than every removable attention head and MLP "
                          "channel of layer 0 (blocks.0):"),
    ("both", "global", "would need more than every removable attention head and MLP channel "
                       "of layer 0 (blocks.0) and every other layer:")])
def test_an_amount_that_empties_a_layer_is_refused_naming_it(structure, scope, layer):
    with pytest.raises(ConfigError, match=re.escape(layer)):
        structured.check_amount(TINY, 0.95 if structure != "heads" else 0.4, structure, scope)
    structured.check_amount(TINY, 0.3 if structure != "heads" else 0.2, structure, scope)


def test_gradual_structured_pruning_in_the_fine_tune_recovers_and_resumes_exactly(
        train_tokens, tmp_path):
    teacher = tiny_gpt(seed=1)
    schedule = PruneSchedule(final=0.3, scope="global", ramp_steps=4, every=2,
                             structure="both", importance="taylor")
    student = tiny_gpt()
    masks, metrics = finetune(student, teacher, train_tokens, plan(steps=8), torch.device("cpu"),
                              schedule=schedule, log=lambda _: None)
    small = structured.shrink(student, masks)
    assert removed_fraction(TINY, small.config) >= 0.30
    # Crashed after step 5 (its checkpoint at step 3) and resumed: the same units, the same
    # weights (the Taylor scores are part of the checkpoint).

    class Crash(Exception):
        pass

    def crash_at_step_5(line):
        if "step     5/8" in line:
            raise Crash

    with pytest.raises(Crash):
        finetune(tiny_gpt(), teacher, train_tokens, plan(steps=8, log_every=1, checkpoint_every=3),
                 torch.device("cpu"), schedule=schedule, partial=tmp_path / "p.pt",
                 log=crash_at_step_5)
    lines = []
    again = tiny_gpt()
    masks_again, _ = finetune(again, teacher, train_tokens, plan(steps=8, checkpoint_every=3),
                              torch.device("cpu"), schedule=schedule,
                              partial=tmp_path / "p.pt", log=lines.append)
    assert any("resumed at step 3/8" in line for line in lines)
    for name, mask in masks.items():
        assert torch.equal(mask, masks_again[name]), name
    for (name, a), b in zip(student.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("structure", ["both", "heads", "channels", "unstructured"])
def test_the_progress_line_sparsity_is_the_stage_sparsity(train_tokens, structure):
    """The pruning progress line's "sparsity" was the zeros among the block Linear weights
    (structured 0.5: progress 50.4%, stage and report 50.0%): now the report's sparsity, the
    block parameters removed (a masked unit as the shrink cuts it out), one function."""
    from orchestrator.compression.structured import block_sparsity

    sparsity = 0.2 if structure == "heads" else 0.5
    schedule = PruneSchedule(final=sparsity, scope="global", ramp_steps=4, every=2,
                             structure=structure, importance="magnitude")
    student, lines = tiny_gpt(), []
    masks, _ = finetune(student, tiny_gpt(seed=1), train_tokens, plan(steps=6, log_every=6),
                        torch.device("cpu"), schedule=schedule, log=lines.append)
    final = structured.shrink(student, masks) if structure != "unstructured" else student
    stage = block_sparsity(final, TINY)
    shown = re.search(r"sparsity (\d+\.\d)%", lines[-1]).group(1)
    assert shown == f"{stage:.1%}"[:-1], (lines[-1], stage)
