"""The training loop on the user's data: memory-mapped shards (exact resume still holds) and
--init-from a Hugging Face GPT-2 directory."""
import math

import torch

from orchestrator.config import TrainConfig
from orchestrator.hf_export import export_gpt2
from orchestrator.tokenizer import ByteTokenizer
from orchestrator.training.checkpoint import load_checkpoint
from orchestrator.training.data_plan import plan_data, tokenize_in_process
from orchestrator.training.loop import train
from orchestrator.training.model import GPT, GPTConfig
from orchestrator.training.session import LocalSession

CPU = torch.device("cpu")


def shards_config(tmp_path, **overrides) -> TrainConfig:
    (tmp_path / "data").mkdir()
    for i in range(3):
        (tmp_path / "data" / f"{i}.txt").write_text("\n\n".join(
            f"file {i} paragraph {j}: a short line of text." for j in range(80)))
    plan = plan_data([str(tmp_path / "data")], cache_root=str(tmp_path / "cache"))
    tokenize_in_process(plan, shard_tokens=2000, say=lambda _: None)
    return TrainConfig(model_size="tiny", seq_len=32, batch_size=4, warmup_steps=0,
                       log_every=2, checkpoint_every=2, data_cache=plan.cache_uri,
                       data_key=plan.key, vocab_size=plan.tokenizer.vocab_size,
                       tokenizer_sha256=plan.tokenizer.sha256, **overrides)


def test_training_on_shards_resumes_to_the_same_weights(tmp_path):
    # A constant schedule: a cosine one depends on max_steps, which the first leg changes.
    config = shards_config(tmp_path, max_steps=6, dropout=0.1, lr_schedule="constant")
    full = train(config, LocalSession(tmp_path / "a", device=CPU))
    assert full["loss"] < full["first_loss"] and full["held_out_loss"] > 0
    train(TrainConfig(**{**config.to_dict(), "max_steps": 4}),
          LocalSession(tmp_path / "b", device=CPU))
    resumed = train(config, LocalSession(tmp_path / "b", device=CPU))
    assert resumed["start_step"] == 4
    a = load_checkpoint(LocalSession(tmp_path / "a").checkpoints()[-1])["model"]
    b = load_checkpoint(LocalSession(tmp_path / "b").checkpoints()[-1])["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["tok_emb.weight"].shape[0] == 257  # the byte tokenizer's vocabulary, with EOT


def test_init_from_starts_from_the_hugging_face_weights(tmp_path):
    config = TrainConfig(model_size="tiny", seq_len=32, batch_size=2, max_steps=1, lr=0.0,
                         min_lr=0.0, warmup_steps=0, vocab_size=257,
                         tokenizer_sha256=ByteTokenizer().sha256)
    torch.manual_seed(99)  # other weights than the run's own initialisation (seed 1337)
    source = GPT(GPTConfig.from_train_config(config, vocab_size=257))
    export_gpt2(source, ByteTokenizer(), tmp_path / "hf")
    init = TrainConfig(**{**config.to_dict(), "init_from": str(tmp_path / "hf")})
    train(init, LocalSession(tmp_path / "run", device=CPU))  # lr 0: the weights stay put
    trained = load_checkpoint(LocalSession(tmp_path / "run").checkpoints()[-1])["model"]
    assert all(torch.equal(trained[k], v) for k, v in source.state_dict().items())
    train(config, LocalSession(tmp_path / "plain", device=CPU))
    plain = load_checkpoint(LocalSession(tmp_path / "plain").checkpoints()[-1])["model"]
    assert not torch.equal(plain["tok_emb.weight"], source.state_dict()["tok_emb.weight"])


def test_a_resume_goes_on_from_its_checkpoint_whatever_init_from_says(tmp_path):
    """--init-from's weights are loaded at step 0 only: a resumed run keeps its checkpoint's
    weights, optimizer state and step, even when its config names another model (what
    train() is given; jobs/pretrain.py refuses `--resume --init-from OTHER` before that)."""
    config = TrainConfig(model_size="tiny", seq_len=32, batch_size=2, max_steps=4,
                         warmup_steps=0, lr_schedule="constant", checkpoint_every=2,
                         log_every=2, vocab_size=257, tokenizer_sha256=ByteTokenizer().sha256)
    models = {}
    for seed in (5, 6):
        torch.manual_seed(seed)
        models[seed] = tmp_path / f"hf{seed}"
        export_gpt2(GPT(GPTConfig.from_train_config(config, vocab_size=257)), ByteTokenizer(),
                    models[seed])
    first = TrainConfig(**{**config.to_dict(), "init_from": str(models[5])})
    train(first, LocalSession(tmp_path / "whole", device=CPU))
    train(TrainConfig(**{**first.to_dict(), "max_steps": 2}),
          LocalSession(tmp_path / "resumed", device=CPU))
    other = TrainConfig(**{**first.to_dict(), "init_from": str(models[6])})
    assert train(other, LocalSession(tmp_path / "resumed", device=CPU))["start_step"] == 2
    whole = load_checkpoint(LocalSession(tmp_path / "whole").checkpoints()[-1])["model"]
    resumed = load_checkpoint(LocalSession(tmp_path / "resumed").checkpoints()[-1])["model"]
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_compression_fine_tunes_on_the_teachers_own_data(tmp_path):
    """A teacher trained on the user's shards is compressed on those shards (its tokens, its
    held-out split), not on the bundled corpus; a teacher without a run gets the bundled one."""
    from orchestrator.compression.source import load_teacher, teacher_data
    from orchestrator.training.data import load_corpus, split_corpus
    from orchestrator.training.shards import open_shards

    config = shards_config(tmp_path, max_steps=2)
    train(config, LocalSession(tmp_path / "run", device=CPU))
    _, source = load_teacher(tmp_path / "run", log=lambda _: None)
    train_tokens, held_out = teacher_data(source, eval_tokens=100)
    shard_train, shard_held_out, _ = open_shards(config.data_cache)
    assert len(train_tokens) == len(shard_train) != len(split_corpus(load_corpus())[0])
    assert held_out.tolist() == shard_held_out.window(0, 101).tolist()
    assert " paragraph " in ByteTokenizer().decode(held_out.tolist())  # the user's text
    bundled = teacher_data({"checkpoint": "in-process"}, eval_tokens=100)
    assert torch.equal(bundled[1], split_corpus(load_corpus())[1])


def test_a_model_pruned_to_one_mlp_width_comes_back_through_init_from(tmp_path):
    # prune -> export -> fine-tune from it (pretrain.py --init-from, then --resume): the
    # export's n_inner (an MLP narrower than 4 x n_embd in every layer) was refused
    # ("n_inner 159 is not 4 x n_embd").
    from jobs import pretrain
    from orchestrator.compression.structured import Importance, compute_masks, shrink

    torch.manual_seed(99)
    dense = GPT(GPTConfig(vocab_size=257, block_size=64, n_layer=2, n_head=2, n_embd=64))
    pruned = shrink(dense, compute_masks(dense, Importance(dense, "magnitude", "channels"),
                                         0.25, scope="per_layer"))
    width = pruned.config.mlp_hidden[0]
    assert pruned.config.mlp_hidden == (width, width) and width < 4 * 64
    export_gpt2(pruned, ByteTokenizer(), tmp_path / "hf")
    run_dir = tmp_path / "run"
    args = pretrain.parse_args(["--init-from", str(tmp_path / "hf"), "--run-dir", str(run_dir),
                                "--max-steps", "1", "--seq-len", "32", "--batch-size", "2",
                                "--lr", "0", "--min-lr", "0", "--warmup-steps", "0"])
    setup = pretrain.resolve_data(args, run_dir)
    config, spec = pretrain.build_configs(args, run_dir, setup.fields)
    assert (config.model_size, config.mlp_hidden) == ("tiny", width)
    tokenize_in_process(setup.plan, say=lambda _: None)
    pretrain._write_resolved_config(run_dir, config, spec, setup.tokenizer)
    result = train(config, LocalSession(run_dir, device=CPU))  # lr 0: the weights stay put
    assert math.isfinite(result["loss"])
    saved = load_checkpoint(LocalSession(run_dir).checkpoints()[-1])
    expected = {**pruned.state_dict(), "pos_emb.weight": pruned.pos_emb.weight[:32]}
    assert all(torch.equal(saved["model"][k], v) for k, v in expected.items())
    # --resume goes on with the run's MLP width (its checkpoint holds that shape).
    args = pretrain.parse_args(["--resume", "--run-dir", str(run_dir), "--max-steps", "2"])
    setup = pretrain.resolve_data(args, run_dir)
    assert pretrain.build_configs(args, run_dir, setup.fields)[0].mlp_hidden == width
    # A config from before the field loads as the unpruned shape.
    old = {k: v for k, v in config.to_dict().items() if k != "mlp_hidden"}
    assert GPTConfig.from_train_config(TrainConfig.from_dict(old)).mlp_hidden is None
