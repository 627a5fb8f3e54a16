"""The ONNX Runtime side of the report: single-token decode graphs with a KV cache, and int8
with static (calibrated) activation scales. One tiny narrow model, exported once."""
import numpy as np
import pytest
import torch

from orchestrator.compression import export, measure
from orchestrator.compression.prune import prunable_names
from orchestrator.training.model import GPT, GPTConfig

NARROW = GPTConfig(block_size=16, n_layer=2, n_head=4, n_embd=32, mlp_hidden=(50, 70),
                   n_heads_per_layer=(4, 2))


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(NARROW).eval()
    directory = tmp_path_factory.mktemp("int8")
    export.save_int8(directory, model, prunable_names(model))
    return directory


def test_the_int8_decode_graph_decodes_as_the_torch_int8_model_does(int8_dir, tmp_path):
    import onnxruntime as ort

    graph = export.int8_decode_onnx(int8_dir, tmp_path / "decode.onnx")
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    model = export.load_int8_model(int8_dir)
    prompt = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache()
    with torch.no_grad():
        model(prompt[:, :-1], cache=cache)
        expected, _ = model(prompt[:, -1:], cache=cache)
    # The prefix's keys and values in, as serving's cache holds them: one step, same logits.
    past = {f"past_{i}": t.numpy() for i, t in
            enumerate(t for layer in cache.layers for t in (layer.keys[:, :, :-1],
                                                             layer.values[:, :, :-1]))}
    logits, *present = session.run(None, {"idx": prompt[:, -1:].numpy(),
                                          "position": np.array([8]), **past})
    assert np.abs(logits - expected.numpy()).max() < 2e-3
    assert [p.shape for p in present] == [(3, 4, 9, 8)] * 2 + [(3, 2, 9, 8)] * 2
    # The measuring helper feeds the graph the shapes its inputs declare.
    step = measure.onnx_decode_step(session, export.past_shapes(model, 2, 5), 256, 6, seed=0)
    assert step()[0].shape == (2, 1, 256)
    # Any seed the settings take (numpy's generator refuses negative ones: the report died
    # after every stage, and the rerun could not change it).
    for seed in (-2 ** 63, 2 ** 64 - 1):
        assert measure.onnx_decode_step(session, export.past_shapes(model, 2, 5), 256, 6,
                                        seed=seed)()[0].shape == (2, 1, 256)


def test_static_activation_scales_cover_the_calibration_range_and_match_dynamic(int8_dir,
                                                                              tmp_path):
    from orchestrator.compression.export import OnnxInt8Model

    batches = [torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(s))
               for s in range(2)]
    state = export.load_tensors(int8_dir / export.TORCH_FILE)
    twin = export.twin_from_int8_state(state)
    constants = export.calibrate_activations(twin, list(state["int8"]), batches)
    for scale, zero_point in constants.values():
        assert scale > 0 and 0 <= zero_point <= 255
    forward, decode = export.static_int8_onnx(int8_dir, tmp_path, batches)
    static = OnnxInt8Model(forward, threads=1)(batches[0])[0]
    dynamic = export.load_onnx_model(int8_dir, threads=1)(batches[0])[0]
    reference = twin(batches[0])[0].detach()
    # Both schemes quantize the activations of the same integers: close to each other and to
    # the float twin, on a batch inside the calibrated range.
    assert (static - reference).abs().max() < 0.05
    assert (static - dynamic).abs().max() < 0.05
    assert decode.is_file()


def test_latency_rounds_rotate_which_model_goes_first():
    # Every round ran the models in the same order (the original first, its ONNX fp32 baseline
    # last), so a drift of the shared machine within a round fell on the same models each time.
    calls = []
    medians = measure.timed_ms({name: (lambda n=name: calls.append(n)) for name in "abc"},
                               repeats=4, warmup=0)
    assert calls == [*"abc", *"bca", *"cab", *"abc"]
    assert set(medians) == {"a", "b", "c"}


def test_onnx_decode_latency_is_timed_on_the_cache_a_model_with_learnt_spans_keeps(
        tmp_path, monkeypatch):
    """Torch models decode with their own cache, which with learnt spans keeps only the keys
    the spans can see (15 here); the ONNX decode graphs beside them were fed every one of the
    latency_seq - 1 positions (63), timing more work than the torch rows. Fed the window, the
    graph computes what the torch model's cached step does."""
    from orchestrator.compression import report
    from orchestrator.compression.config import CompressConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32, attention_span=True,
                          span_init=0.05, span_ramp=8)).eval()
    forward = export.export_fp32_onnx(model, tmp_path / "forward.onnx")
    decode = export.export_decode_onnx(model, tmp_path / "decode.onnx")
    prompt = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache()
    with torch.no_grad():
        model(prompt[:, :-1], cache=cache)
        past = [t.clone() for layer in cache.layers for t in (layer.keys, layer.values)]
        expected, _ = model(prompt[:, -1:], cache=cache)
    kept = {t.size(2) for t in past}
    assert kept == {15}  # the torch cache: the window, not 63 positions

    fed = []
    real_step = measure.onnx_decode_step

    def recording_step(session, past_shapes, *args, **kwargs):
        fed.append(past_shapes)
        return real_step(session, past_shapes, *args, **kwargs)

    monkeypatch.setattr(measure, "onnx_decode_step", recording_step)
    config = CompressConfig(latency_seq=64, latency_batch=2, latency_batched=1,
                            latency_repeats=1)
    report._measure_latency({"torch": model}, {"onnx": (forward, decode)}, config, 128, 256,
                            lambda line: None, {"onnx": model})
    assert [shape[2] for shape in fed[0]] == [15] * 4

    import onnxruntime as ort

    session = ort.InferenceSession(str(decode), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"idx": prompt[:, -1:].numpy(), "position": np.array([63]),
                                      **{f"past_{i}": t.numpy() for i, t in enumerate(past)}})[0]
    assert np.abs(logits - expected.numpy()).max() < 1e-4
