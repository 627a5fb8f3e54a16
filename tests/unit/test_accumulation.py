"""Hierarchical gradient accumulation: per-group factors, DDP no_sync, exact resume, fp16."""
import dataclasses
import re

import pytest
import torch
import torch.distributed as dist

from orchestrator.config import ConfigError, TrainConfig, parse_accumulation
from orchestrator.training import attention, loop
from orchestrator.training.accumulation import HierarchicalAccumulation
from orchestrator.training.checkpoint import load_checkpoint
from orchestrator.training.data import get_batch, load_corpus, split_corpus
from orchestrator.training.loop import build_optimizer, lr_at, train
from orchestrator.training.model import GPT, GPTConfig, parameter_groups
from orchestrator.training.session import LocalSession
from tests.support import CrashingSession  # dies right after a given checkpoint
from tests.support import host_reads_from
from test_training_loop import tiny as tiny_loop_config

CPU = torch.device("cpu")


def tiny(**overrides):
    """The training-loop tests' tiny config, shorter: 12 steps, a checkpoint every 6."""
    return tiny_loop_config(**{"max_steps": 12, "checkpoint_every": 6, "log_every": 6,
                               "eval_batches": 1, **overrides})


def final_weights(run_dir):
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    return load_checkpoint(checkpoints[-1])["model"]


def ordinary_accumulation(config: TrainConfig, k: int) -> dict[str, torch.Tensor]:
    """Textbook accumulation, written independently of the loop: loss/k per micro-batch,
    one clipped optimizer step every k micro-batches."""
    train_tokens, _ = split_corpus(load_corpus())
    torch.manual_seed(config.seed)
    model = GPT(GPTConfig.from_train_config(config))
    optimizer = build_optimizer(model, config)
    for step in range(config.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        x, y = get_batch(train_tokens, config.batch_size, config.seq_len, seed=config.seed,
                         rank=0, step=step)
        _, loss = model(x, y)
        (loss / k).backward()
        if (step + 1) % k == 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return model.state_dict()


def test_equal_factors_are_exactly_ordinary_accumulation(tmp_path):
    # k a power of two: dividing each micro-batch's loss by k (textbook) and the summed
    # gradient by k (the loop) then round identically, so "equal" can mean bit-equal.
    config = tiny(accumulation="4")
    metrics = train(config, LocalSession(tmp_path, device=CPU))
    assert metrics["optimizer_steps"] == dict.fromkeys(("embeddings", "lower", "upper",
                                                        "head"), 3)
    expected = ordinary_accumulation(config, 4)
    got = final_weights(tmp_path)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_the_reported_lr_is_the_one_the_last_optimizer_step_used(tmp_path):
    """k=4 steps on micro-batches 3, 7 and 11: the report at step 6 said micro-batch 5's LR,
    which no step used. Before the first step there is none to report (the progress line
    says `lr -`)."""
    config = tiny(accumulation="4", log_every=3)
    session = LocalSession(tmp_path, device=CPU)
    train(config, session)
    assert [r["lr"] for r in session.reports] == [None, lr_at(3, config), lr_at(7, config),
                                                  lr_at(11, config)]
    assert lr_at(5, config) != lr_at(3, config)
    # Unequal factors: the latest micro-batch on which any group stepped.
    accumulation = HierarchicalAccumulation({"embeddings": [torch.nn.Parameter(torch.ones(1))],
                                             "upper": [torch.nn.Parameter(torch.ones(1))]},
                                            {"embeddings": 2, "upper": 4})
    assert [accumulation.last_step_before(step) for step in (1, 2, 3, 4, 6, 7)] == \
        [None, 1, 1, 3, 5, 5]


def test_each_group_steps_every_k_micro_batches():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=16))
    groups = parameter_groups(model)
    accumulation = HierarchicalAccumulation(groups, {"embeddings": 1, "lower": 2,
                                                     "upper": 4, "head": 1})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    snapshot = {name: [p.detach().clone() for p in params] for name, params in groups.items()}
    changed_at = {name: [] for name in groups}
    for step in range(8):
        idx = torch.randint(0, 256, (2, 16))
        model(idx, idx)[1].backward()
        accumulation.step(step, optimizer, scaler, grad_clip=1.0)
        for name, params in groups.items():
            now = [p.detach().clone() for p in params]
            if any(not torch.equal(a, b) for a, b in zip(now, snapshot[name])):
                changed_at[name].append(step)
            snapshot[name] = now
    assert changed_at == {"embeddings": list(range(8)), "lower": [1, 3, 5, 7],
                          "upper": [3, 7], "head": list(range(8))}
    assert accumulation.optimizer_steps == {"embeddings": 8, "lower": 4, "upper": 2, "head": 8}


def test_a_group_steps_with_the_mean_of_its_micro_batch_gradients():
    weight = torch.nn.Parameter(torch.zeros(3))
    other = torch.nn.Parameter(torch.zeros(1))
    accumulation = HierarchicalAccumulation({"lower": [weight], "head": [other]},
                                            {"lower": 4, "head": 1})
    optimizer = torch.optim.SGD([weight, other], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    targets = [torch.tensor([1.0, 2.0, 3.0]) * i for i in range(1, 5)]
    for step, target in enumerate(targets):
        (-(weight * target).sum() + other.sum()).backward()  # d/dweight = -target
        accumulation.step(step, optimizer, scaler, grad_clip=0.0)
    # One SGD step of lr 1 with the mean gradient -mean(targets) = -(2.5 * [1, 2, 3]).
    assert torch.allclose(weight.detach(), torch.tensor([2.5, 5.0, 7.5]))
    assert other.item() == -4.0  # stepped every micro-batch


def test_clipping_covers_only_the_groups_stepping_on_that_micro_batch(monkeypatch):
    """What docs/training.md says of clipping under unequal factors (kept as it is: existing
    runs resume bit-equal): the norm is the stepping groups' alone, so the fast groups' clip
    coefficient changes on the micro-batch a slow group steps with them."""
    from orchestrator.training import accumulation as acc

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=16))
    groups = parameter_groups(model)
    accumulation = HierarchicalAccumulation(groups, {"embeddings": 4, "lower": 1, "upper": 1,
                                                     "head": 1})
    clipped = []  # per stepping micro-batch, the groups whose gradients the norm covers

    def clip_gradients(params, max_norm):
        clipping = {id(p) for p in params}
        clipped.append({name for name, group in groups.items()
                        if {id(p) for p in group} <= clipping})

    monkeypatch.setattr(acc, "clip_gradients", clip_gradients)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step in range(4):
        idx = torch.randint(0, 256, (2, 16))
        model(idx, idx)[1].backward()
        accumulation.step(step, optimizer, scaler, grad_clip=1.0)
    assert clipped == [{"lower", "upper", "head"}] * 3 + [set(groups)]


def test_a_loss_scale_change_rescales_the_pending_gradients():
    """fp16: the scale doubles after a good step (growth_interval=1); gradients a waiting group
    accumulated at the old scale must follow, or its step would be off by that factor."""
    weight = torch.nn.Parameter(torch.zeros(2))
    other = torch.nn.Parameter(torch.zeros(1))
    accumulation = HierarchicalAccumulation({"lower": [weight], "head": [other]},
                                            {"lower": 2, "head": 1})
    optimizer = torch.optim.SGD([weight, other], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=1)
    for step in range(2):
        scaler.scale(-(weight * torch.tensor([1.0, 3.0])).sum() + other.sum()).backward()
        accumulation.step(step, optimizer, scaler, grad_clip=0.0)
    assert scaler.get_scale() == 32.0  # grew twice
    assert torch.allclose(weight.detach(), torch.tensor([1.0, 3.0]))  # true mean gradient


def _lower_waits_while_head_steps():
    """fp16 on two groups: 'lower' (k=2, one weight of 2) waits while 'head' (k=1, one of 1)
    steps; SGD at lr 1 and a loss scale of 8."""
    weight = torch.nn.Parameter(torch.zeros(2))
    other = torch.nn.Parameter(torch.zeros(1))
    accumulation = HierarchicalAccumulation({"lower": [weight], "head": [other]},
                                            {"lower": 2, "head": 1})
    optimizer = torch.optim.SGD([weight, other], lr=1.0)
    return weight, other, accumulation, optimizer, torch.amp.GradScaler("cpu", init_scale=8.0)


def test_an_overflow_skips_a_waiting_groups_step_without_skipping_the_others_again():
    """fp16: micro-batch 0 overflows while 'lower' (k=2) waits. 'head' skips that step and the
    scale halves once; 'lower' drops its window (its pending gradient is inf) on micro-batch 1,
    where 'head' steps with its own finite gradient. That window's inf went to the scaler, which
    skipped every group stepping with it and halved the scale again: one overflow, two skips."""
    weight, other, accumulation, optimizer, scaler = _lower_waits_while_head_steps()
    skipped = 0
    for step in range(4):
        loss = (weight.sum() + other.sum()) * (float("inf") if step == 0 else 1.0)
        scaler.scale(loss).backward()
        skipped += accumulation.step(step, optimizer, scaler, grad_clip=0.0)
        if step == 1:
            assert torch.equal(weight.detach(), torch.zeros(2))  # its window dropped
            assert torch.equal(other.detach(), torch.tensor([-1.0]))  # stepped once
    assert int(skipped) == 1 and scaler.get_scale() == 4.0
    assert torch.equal(weight.detach(), torch.tensor([-1.0, -1.0]))  # the next window's step
    assert torch.equal(other.detach(), torch.tensor([-3.0]))
    assert accumulation.optimizer_steps == {"lower": 2, "head": 4}


def test_an_overflow_reaching_only_a_waiting_group_is_skipped_on_its_own_micro_batch():
    """fp16: micro-batch 0 overflows in 'lower' (k=2, waiting) alone; 'head' (k=1) is finite.
    The scaler never saw the waiting gradient, so the overflow went unnoticed until 'lower'
    stepped on micro-batch 1, where it skipped 'head''s good step instead (and a run resumed
    in between dropped the window without a skip: not the same weights). Now it is the
    overflow of micro-batch 0, as where it reaches the stepping groups too."""
    weight, other, accumulation, optimizer, scaler = _lower_waits_while_head_steps()
    skipped = []
    for step in range(2):
        loss = weight.sum() * (float("inf") if step == 0 else 1.0) + other.sum()
        scaler.scale(loss).backward()
        skipped.append(bool(accumulation.step(step, optimizer, scaler, grad_clip=0.0)))
        if step == 0:
            assert scaler.get_scale() == 4.0 and torch.equal(other.detach(), torch.zeros(1))
    assert skipped == [True, False] and scaler.get_scale() == 4.0
    assert torch.equal(weight.detach(), torch.zeros(2))  # its poisoned window dropped
    assert torch.equal(other.detach(), torch.tensor([-1.0]))  # micro-batch 1's step taken


def _embedding_gradient_overflows_on_call(call: int):
    """A GPT class whose token embedding's gradient (alone) turns inf in the backward of the
    `call`-th training forward: an fp16 overflow that reaches a waiting group only."""
    from orchestrator.training import loop

    class Overflows(loop.GPT):
        calls = 0

        def forward(self, idx, targets=None, **kwargs):
            if targets is not None and self.training:
                Overflows.calls += 1
                if Overflows.calls == call:
                    fired = []
                    self.tok_emb.weight.register_hook(
                        lambda g: None if fired else fired.append(1) or g * float("inf"))
            return super().forward(idx, targets, **kwargs)
    return Overflows


def test_a_resume_after_an_overflow_of_a_waiting_group_alone_is_exact(tmp_path, monkeypatch):
    """fp16, 'embeddings' (k=4) waiting: micro-batch 1's overflow reaches its gradient only,
    and the run stops at step 2, the poisoned window in its checkpoint. Resumed, it ends on
    the weights of the run never stopped."""
    from orchestrator.training import loop

    config = tiny(accumulation="embeddings=4", max_steps=8, checkpoint_every=2, log_every=2,
                  seq_len=16, precision="fp16")
    monkeypatch.setattr(loop, "GPT", _embedding_gradient_overflows_on_call(2))
    straight = train(config, LocalSession(tmp_path / "straight", device=CPU))
    monkeypatch.setattr(loop, "GPT", _embedding_gradient_overflows_on_call(2))
    with pytest.raises(RuntimeError, match="worker killed"):
        train(config, CrashingSession(tmp_path / "resumed", crash_at=2))
    resumed = train(config, LocalSession(tmp_path / "resumed", device=CPU))
    assert straight["skipped_steps"] == 1 and straight["loss_scale"] == resumed["loss_scale"]
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_a_window_poisoned_by_an_fp16_overflow_resumed_in_fp32_is_dropped(tmp_path,
                                                                          monkeypatch):
    """An fp16 run's micro-batch 1 overflows while 'embeddings' (k=4) waits, and the
    checkpoint of step 2 holds its inf pending gradient. Resumed in fp32 (precision may change
    on resume) that gradient was applied: NaN weights, the run stopped as diverged."""
    from orchestrator.training import loop
    from test_training_loop import _breaks_from_call

    monkeypatch.setattr(loop, "GPT", _breaks_from_call(2, float("inf"), last_broken=2))
    config = tiny(accumulation="embeddings=4", max_steps=8, checkpoint_every=2, log_every=2,
                  seq_len=16, precision="fp16")
    with pytest.raises(RuntimeError, match="worker killed"):
        train(config, CrashingSession(tmp_path, crash_at=2))
    pending = load_checkpoint(tmp_path / "checkpoint_00000002")["pending_gradients"]
    assert not all(torch.isfinite(g).all() for g in pending.values())
    metrics = train(dataclasses.replace(config, precision="fp32"),
                    LocalSession(tmp_path, device=CPU))
    assert metrics["step"] == 8 and metrics["optimizer_steps"]["embeddings"] == 2
    assert all(torch.isfinite(w).all() for w in final_weights(tmp_path).values())


def test_no_all_reduce_on_micro_batches_where_no_group_steps(process_group):
    """Under DDP the gradient all-reduce runs only when some group steps (or a checkpoint is
    due): a world of one process still goes through DDP's reducer and comm hook."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=16))
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    calls = []

    def counting_hook(state, bucket):
        calls.append(bucket.index())
        return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(
            lambda fut: fut.value()[0])

    wrapped.register_comm_hook(None, counting_hook)
    accumulation = HierarchicalAccumulation(parameter_groups(model), dict.fromkeys(
        ("embeddings", "lower", "upper", "head"), 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    synced_steps = []
    for step in range(4):
        before = len(calls)
        idx = torch.randint(0, 256, (2, 16))
        with accumulation.sync_context(wrapped, bool(accumulation.due(step))):
            wrapped(idx, idx)[1].backward()
        accumulation.step(step, optimizer, scaler, grad_clip=0.0)
        if len(calls) > before:
            synced_steps.append(step)
    assert synced_steps == [1, 3]


def test_resume_mid_accumulation_is_exact(tmp_path):
    """Stopped at step 6 while 'upper' (k=4) holds two micro-batches of gradient: the pending
    gradients travel in the checkpoint and the resumed run ends bit-equal."""
    config = tiny(accumulation="lower=2,upper=4", max_steps=12, checkpoint_every=6)
    straight_metrics = train(config, LocalSession(tmp_path / "straight", device=CPU))
    with pytest.raises(RuntimeError, match="worker killed"):
        train(config, CrashingSession(tmp_path / "resumed", crash_at=6))
    state = load_checkpoint(sorted((tmp_path / "resumed").glob("checkpoint_*"))[-1])
    assert any(name.startswith("blocks.1.") for name in state["pending_gradients"])
    resumed_metrics = train(config, LocalSession(tmp_path / "resumed", device=CPU))
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    # The step counts go on over the resume (they restarted at 0: half of these).
    assert resumed_metrics["optimizer_steps"] == straight_metrics["optimizer_steps"] == {
        "embeddings": 12, "lower": 6, "upper": 3, "head": 12}


@pytest.mark.parametrize("spec, message", [
    ("0", "must be an integer in \\[1, 1024\\]"),
    ("lower=two", "factor of 'lower'"),
    ("middle=2", "unknown group 'middle'"),
    ("lower=2,lower=3", "given twice"),
])
def test_invalid_factors_are_refused_naming_the_field(spec, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(accumulation=spec)


def test_a_group_that_would_never_step_is_refused_by_training_but_its_config_still_loads(
        tmp_path):
    # embeddings=8 over 5 micro-batches: the embeddings never stepped (their weights stayed
    # the initial ones), and the run ended with a held-out loss as if they had trained. The
    # config itself stays valid: a saved run's checkpoint must still load to be served.
    config = TrainConfig.from_dict({"model_size": "tiny", "max_steps": 5,
                                    "accumulation": "embeddings=8"})
    said = (r"accumulation 'embeddings=8': embeddings \(factor 8\) would never take an "
            r"optimizer step in max_steps 5 micro-batches; raise max_steps to >= 8 or lower "
            r"its factor")
    assert re.fullmatch(said, config.never_stepping_groups())
    with pytest.raises(ConfigError, match=said):
        train(config, LocalSession(tmp_path / "run", device=torch.device("cpu")))
    assert not (tmp_path / "run").exists()  # refused before anything was written
    assert TrainConfig(max_steps=8, accumulation="embeddings=8").never_stepping_groups() is None
    assert TrainConfig(max_steps=8, accumulation="embeddings=8").left_pending_at_end() is None


def test_a_run_ending_mid_accumulation_says_what_stays_pending_and_where_nothing_would():
    said = TrainConfig(max_steps=10, accumulation="4").left_pending_at_end()
    assert said.startswith("max_steps 10 ends mid-accumulation (accumulation '4'): the "
                           "gradients of the last 2 micro-batches (embeddings, lower, upper, "
                           "head) are never applied in this run")
    assert said.endswith("max_steps 8 or 12 ends on a step of every group")
    # Groups left with different counts; the nearest end is a multiple of every factor.
    said = TrainConfig(max_steps=10, accumulation="embeddings=3,upper=4").left_pending_at_end()
    assert "the last micro-batch (embeddings) and the last 2 micro-batches (upper)" in said
    assert said.endswith("max_steps 12 ends on a step of every group")


def test_a_resume_is_told_only_of_ends_past_its_step():
    # Resumed at step 10 with max_steps 14: 12 or 16 (both train); at 13, 12 would train
    # nothing, so 16 alone. (Was "8 or 12" for a run at 10: a max_steps below its step.)
    config = TrainConfig(max_steps=14, accumulation="4")
    assert config.left_pending_at_end(after=10).endswith(
        "max_steps 12 or 16 ends on a step of every group")
    assert config.left_pending_at_end(after=13).endswith(
        "; max_steps 16 ends on a step of every group")
    assert TrainConfig(max_steps=10, accumulation="4").left_pending_at_end(after=8).endswith(
        "; max_steps 12 ends on a step of every group")


def test_a_finished_run_with_a_group_that_never_steps_resumes_to_nothing_to_do(tmp_path):
    # A run checkpointed at step 4 whose factor (8) is above the max_steps it is resumed
    # with: at 4 it trains nothing, so it is already complete, not refused (as a config
    # saved before the rule must); at 6 it would train, and is refused.
    config = tiny(accumulation="embeddings=8", max_steps=8, checkpoint_every=4, log_every=4)
    with pytest.raises(RuntimeError, match="worker killed"):
        train(config, CrashingSession(tmp_path, crash_at=4))
    metrics = train(dataclasses.replace(config, max_steps=4),
                    LocalSession(tmp_path, device=CPU))
    assert metrics["already_complete"] and metrics["step"] == 4
    with pytest.raises(ConfigError, match=r"embeddings \(factor 8\) would never take an "
                                          r"optimizer step in max_steps 6 "):
        train(dataclasses.replace(config, max_steps=6), LocalSession(tmp_path, device=CPU))


def test_what_a_run_ending_mid_accumulation_leaves_pending_a_longer_resume_applies(tmp_path):
    """The warning's promise: the gradients of micro-batches 8 and 9 (k=4, 10 steps) are in
    the final checkpoint, and resumed to 12 the run ends as one of 12 from the start.
    (A constant LR: the cosine's legs of a resumed run differ from one run of 12.)"""
    config = tiny(accumulation="4", max_steps=10, checkpoint_every=5, log_every=5,
                  lr_schedule="constant")
    ended = train(config, LocalSession(tmp_path / "resumed", device=CPU))
    assert ended["optimizer_steps"] == dict.fromkeys(("embeddings", "lower", "upper", "head"),
                                                     2)
    last = sorted((tmp_path / "resumed").glob("checkpoint_*"))[-1]
    assert load_checkpoint(last)["pending_gradients"]
    longer = dataclasses.replace(config, max_steps=12)
    train(longer, LocalSession(tmp_path / "resumed", device=CPU))
    train(longer, LocalSession(tmp_path / "straight", device=CPU))
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)


def test_under_the_cosine_a_longer_resume_applies_the_pending_gradients_on_its_own_legs(
        tmp_path):
    """docs/training.md: under the cosine, the resume to 12 applies what micro-batches 8 and 9
    left pending, but continues the cosine from the learning rate reached (the checkpoint's
    lr_legs), so it does not end as a run of 12 from the start would (it did say so)."""
    config = tiny(accumulation="embeddings=4", warmup_steps=2, max_steps=10, checkpoint_every=5,
                  log_every=2)
    train(config, LocalSession(tmp_path / "resumed", device=CPU))
    longer = dataclasses.replace(config, max_steps=12)
    resumed = train(longer, LocalSession(tmp_path / "resumed", device=CPU))
    straight = train(longer, LocalSession(tmp_path / "straight", device=CPU))
    assert resumed["optimizer_steps"] == straight["optimizer_steps"]
    assert resumed["lr"] != pytest.approx(straight["lr"])
    legs = load_checkpoint(sorted((tmp_path / "resumed").glob("checkpoint_*"))[-1])["lr_legs"]
    assert len(legs) == 2  # the run's own cosine, then the extension's from step 10


def test_factor_spec_forms():
    assert parse_accumulation("2") == {"embeddings": 2, "lower": 2, "upper": 2, "head": 2}
    assert parse_accumulation("upper=8") == {"embeddings": 1, "lower": 1, "upper": 8,
                                             "head": 1}


@pytest.mark.parametrize("spec, why", [
    ("1_0", "'1_0' ('_' is not read as a digit separator: write 10)"),  # int(): 10
    ("upper=\u0664", "'\u0664' ('\u0664' (U+0664) is not a digit 0-9)"),  # int(): 4
])
def test_a_lax_factor_is_refused_saying_why(spec, why):
    with pytest.raises(ConfigError) as e:
        parse_accumulation(spec)
    assert str(e.value).endswith(f"must be an integer in [1, 1024], got {why}"), str(e.value)


def test_pending_gradients_follow_a_precision_change_on_resume(tmp_path, monkeypatch):
    """An fp16 run stopped while 'upper' holds gradients at the loss scale (65536), resumed in
    fp32 (precision may change on resume): they are unscaled, so the step that applies them
    clips and averages the same gradient it would have in fp16 (it was 65536x too large)."""
    from orchestrator.training import accumulation as acc

    config = tiny(accumulation="upper=4", max_steps=4, checkpoint_every=2, log_every=2,
                  precision="fp16")
    with pytest.raises(RuntimeError, match="worker killed"):
        train(config, CrashingSession(tmp_path / "fp16", crash_at=2))
    assert load_checkpoint(tmp_path / "fp16" / "checkpoint_00000002")["scaler"]["scale"] > 1
    norms = {}
    clip = acc.clip_gradients
    for precision in ("fp16", "fp32"):
        seen = norms[precision] = []
        monkeypatch.setattr(acc, "clip_gradients", lambda params, max_norm, seen=seen: (
            seen.append(float(torch.linalg.vector_norm(torch.stack(
                [p.grad.norm() for p in params if p.grad is not None])))),
            clip(params, max_norm))[1])
        run_dir = tmp_path / precision
        if precision != "fp16":
            import shutil
            shutil.copytree(tmp_path / "fp16" / "checkpoint_00000002",
                            run_dir / "checkpoint_00000002")
        train(dataclasses.replace(config, precision=precision),
              LocalSession(run_dir, device=CPU))
    # The last step (step 3) is the one where 'upper' applies the pending gradients.
    assert norms["fp32"][-1] == pytest.approx(norms["fp16"][-1], rel=1e-2)


def test_an_fp16_step_does_not_read_the_loss_scale_on_the_host(monkeypatch):
    # get_scale() is a host-GPU sync: read twice a step, it stalled the GPU's queue on every
    # fp16 run (T4, V100: what `auto` picks there). Skips are counted on the device.
    calls = []
    real = torch.amp.GradScaler.get_scale
    monkeypatch.setattr(torch.amp.GradScaler, "get_scale",
                        lambda self: calls.append(1) or real(self))
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16))
    accumulation = HierarchicalAccumulation(parameter_groups(model), {
        "embeddings": 1, "lower": 1, "upper": 1, "head": 1})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    skipped = 0
    for step in range(4):
        idx = torch.randint(0, 256, (2, 16))
        loss = model(idx, idx)[1] * (float("inf") if step == 2 else 1.0)
        scaler.scale(loss).backward()
        skipped += accumulation.step(step, optimizer, scaler, grad_clip=0.0)
    assert calls == [] and int(skipped) == 1


def _span_run(tmp_path, name, accumulation, monkeypatch):
    """A 12-micro-batch learnt-span run: (the span windows' host reads, the final weights,
    the reports)."""
    reads = host_reads_from(monkeypatch, attention.__file__)
    session = LocalSession(tmp_path / name, device=CPU)
    train(tiny(accumulation=accumulation, attention_span=True, span_ramp=4), session)
    monkeypatch.undo()
    return len(reads), final_weights(tmp_path / name), session.reports


@pytest.mark.parametrize("accumulation, span_steps", [
    ("4", 3),  # micro-batches 3, 7, 11
    # The spans are in the blocks' groups: the embeddings' and the head's steps leave them.
    ("embeddings=1,lower=4,upper=6,head=1", 4),  # lower on 3, 7, 11; upper on 5, 11
], ids=["equal", "hierarchical"])
def test_span_windows_are_read_once_per_step_that_moves_the_spans(
        tmp_path, monkeypatch, accumulation, span_steps):
    """Each window read is a host sync on a GPU. The spans move only when an optimizer step of
    a group holding them is taken, so their windows are read then (and once at the start, for
    every layer in one read), not after every micro-batch: 12 + 1 reads at --accumulation 4,
    where 3 + 1 do. Every micro-batch still sees the windows of the spans it trains with: the
    run is bit-identical to one reading them after every micro-batch (the old path)."""
    reads, weights, reports = _span_run(tmp_path, "once", accumulation, monkeypatch)
    monkeypatch.setattr(loop, "_spans_moved", lambda *_: True)
    reads_every, weights_every, reports_every = _span_run(tmp_path, "every", accumulation,
                                                          monkeypatch)
    assert (reads, reads_every) == (1 + span_steps, 1 + 12)
    assert weights.keys() == weights_every.keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, weights_every[name]), name
    assert [r["loss"] for r in reports] == [r["loss"] for r in reports_every]
    windows = [r["attention_window"] for r in reports]
    assert windows == [r["attention_window"] for r in reports_every]
    # (The spans grew from 0, so the windows moved past the ramp's 4 tokens: a stale one
    # would have cut keys off and changed the weights.)
    assert min(windows) > 4
