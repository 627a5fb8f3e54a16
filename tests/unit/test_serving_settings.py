"""Serving settings from `serve run` arguments and serve_config.yaml; runtime user_config."""
import re
from pathlib import Path

import pytest
import yaml

from orchestrator.config import ConfigError
from orchestrator.serving.settings import (RUNTIME_FIELDS, RuntimeConfig, ServeSettings,
                                           free_port, model_autoscaling, serve_app_config,
                                           serving_path_options)

REPO = Path(__file__).resolve().parents[2]


def test_command_line_strings_are_coerced():
    settings = ServeSettings.from_args({"max_batch_size": "16", "max_batch_wait_ms": "2.5",
                                        "adaptive_batching": "false", "checkpoint": "/x",
                                        "cpus_per_replica": "1"})
    assert (settings.max_batch_size, settings.max_batch_wait_ms) == (16, 2.5)
    assert settings.adaptive_batching is False and settings.cpus_per_replica == 1.0
    # 16 x 1 batch at a time, x 8 rounds: requests beyond the running batch queue at the
    # replica, not in Serve's router (whose retry backoff idles a replica under overload)
    assert settings.replica_max_ongoing_requests == 128


@pytest.mark.parametrize("field, text", [
    ("max_batch_size", "1_6"),  # int() read 16
    ("min_replicas", "\u0662"),  # int() read 2
    ("cpus_per_replica", "1_0"),  # float() read 10.0
])
def test_command_line_numbers_are_read_strictly(field, text):
    with pytest.raises(ConfigError) as e:
        ServeSettings.from_args({field: text})
    assert f"{field} must be " in str(e.value) and repr(text) in str(e.value), str(e.value)


def test_unknown_keys_get_a_hint():
    with pytest.raises(ConfigError, match="'max_batch' \\(did you mean 'max_batch_size'"):
        ServeSettings.from_args({"max_batch": 4})


def test_a_typo_and_a_bad_value_are_named_in_one_go():
    with pytest.raises(ConfigError) as e:
        ServeSettings.from_args({"max_batch": 4, "min_replicas": "-1"})
    assert "'max_batch' (did you mean 'max_batch_size'" in str(e.value)
    assert "min_replicas must be an integer >= 0, got -1" in str(e.value)


def test_every_bad_field_is_named_at_once():
    with pytest.raises(ConfigError) as e:
        ServeSettings.from_args({"max_batch_size": "lots", "min_replicas": -1,
                                 "cpus_per_replica": "nan", "adaptive_batching": "maybe"})
    message = str(e.value)
    for field in ("max_batch_size", "min_replicas", "cpus_per_replica", "adaptive_batching"):
        assert field in message


@pytest.mark.parametrize("args, words", [
    ({"max_ongoing_requests": 10, "max_concurrent_batches": 2},
     "max_ongoing_requests (10) must be >= max_batch_size x max_concurrent_batches "
     "(32 x 2 = 64)"),
    ({"min_batch_size": 8, "max_batch_size": 4}, "min_batch_size (8) must be <= max_batch_size"),
    ({"min_replicas": 3, "max_replicas": 2}, "min_replicas (3) must be <= max_replicas"),
    ({"model_name": ""}, "model_name must not be empty"),
    # a replica full at 8 ongoing requests: Serve's router would hold the rest until it
    # scaled up at twice saturation
    ({"max_batch_size": "1", "min_batch_size": "1"},
     "target_ongoing_requests (16) must be <= the replica's max_ongoing_requests "
     "(8 = max_batch_size x max_concurrent_batches x 8)"),
    ({"max_ongoing_requests": 32, "target_ongoing_requests": 40},
     "target_ongoing_requests (40) must be <= the replica's max_ongoing_requests (32)"),
])
def test_inconsistent_settings_are_refused(args, words):
    with pytest.raises(ConfigError, match=words.replace("(", "\\(").replace(")", "\\)")):
        ServeSettings.from_args(args)


def test_user_config_keeps_unset_fields_from_the_settings_and_respects_the_cap():
    settings = ServeSettings(checkpoint="/a", max_batch_size=16, max_ongoing_requests=16)
    runtime = RuntimeConfig.from_user_config({"checkpoint": "/b", "max_batch_wait_ms": 5},
                                             settings)
    assert (runtime.checkpoint, runtime.max_batch_size, runtime.max_batch_wait_ms) == \
        ("/b", 16, 5.0)
    assert runtime.bounds.max_wait_s == 0.005
    assert RuntimeConfig.from_user_config(None, settings).checkpoint == "/a"
    with pytest.raises(ConfigError, match="at most 16"):
        RuntimeConfig.from_user_config({"max_batch_size": 64}, settings)
    with pytest.raises(ConfigError, match="'checkpiont' \\(did you mean 'checkpoint'"):
        RuntimeConfig.from_user_config({"checkpiont": "/c"}, settings)
    with pytest.raises(ConfigError, match="min_batch_size"):
        RuntimeConfig.from_user_config({"min_batch_size": 0}, settings)


def test_serve_config_yaml_is_a_valid_serve_config_for_this_app():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)  # Serve's own validation
    # The layout the tests deploy (serve_app_config): it was EveryNode, a proxy per node that
    # could not reach the head's loopback-bound Ingress replicas.
    assert schema.proxy_location == serve_app_config("app", 8000, {}, user_config={})[
        "proxy_location"]
    (application,) = schema.applications
    assert application.import_path == "ray_layer.serve_app:app"
    settings = ServeSettings.from_args(application.args)
    (model,) = [d for d in application.deployments if d.name == "GPTModel"]
    RuntimeConfig.from_user_config(model.user_config, settings)
    # The file documents every runtime setting and continuous batching's fixed ones.
    assert set(RUNTIME_FIELDS) <= set(model.user_config)
    assert {"batching", "kv_block_tokens", "prefill_chunk_tokens"} <= set(application.args)
    # Where the model is named: the args (pinned at build) as well as the user_config.
    assert "checkpoint" in application.args
    autoscaling = model.autoscaling_config
    assert autoscaling["min_replicas"] < autoscaling["max_replicas"]
    assert {"target_ongoing_requests", "upscale_delay_s", "downscale_delay_s"} <= set(autoscaling)


def test_serve_app_config_is_a_valid_serve_config_for_this_app():
    from ray.serve.schema import ServeDeploySchema

    args = {"checkpoint": "/c", "accelerator": "cpu", "max_batch_size": 8}
    ingress = {"name": "Ingress", "ray_actor_options": {"num_cpus": 0}}
    config = serve_app_config("app", 8123, args, autoscaling={"min_replicas": 1,
                                                              "max_replicas": 2},
                              user_config={"checkpoint": "/d", "max_batch_size": 4},
                              model_options={"graceful_shutdown_timeout_s": 2},
                              deployments=[ingress])
    schema = ServeDeploySchema.model_validate(config)  # Serve's own validation
    assert schema.proxy_location == "HeadOnly"
    assert (schema.http_options.host, schema.http_options.port) == ("127.0.0.1", 8123)
    (application,) = schema.applications
    assert (application.name, application.route_prefix) == ("app", "/")
    assert application.import_path == "ray_layer.serve_app:app"
    assert application.args == args
    model, extra = application.deployments
    assert model.name == "GPTModel" and model.graceful_shutdown_timeout_s == 2
    assert model.autoscaling_config == {"min_replicas": 1, "max_replicas": 2,
                                        "target_ongoing_requests": 16.0,
                                        "upscale_delay_s": 5.0, "downscale_delay_s": 30.0}
    assert model.user_config == {"checkpoint": "/d", "max_batch_size": 4}
    assert extra.name == "Ingress" and extra.ray_actor_options.num_cpus == 0
    # What it returns is the caller's to change: the inputs stay as they were.
    config["applications"][0]["args"]["checkpoint"] = "/other"
    config["applications"][0]["deployments"][1]["ray_actor_options"]["num_cpus"] = 1
    assert args["checkpoint"] == "/c" and ingress["ray_actor_options"]["num_cpus"] == 0


def test_autoscaling_given_to_serve_app_config_is_merged_over_the_apps_settings():
    # Serve replaces a deployment's autoscaling_config whole: the app's own target and bounds
    # were dropped for Serve's defaults (target_ongoing_requests 2).
    args = {"target_ongoing_requests": 4, "min_replicas": 2, "max_replicas": 3,
            "upscale_delay_s": 1}

    def autoscaling(**options) -> dict:
        config = serve_app_config("app", 8000, args, user_config={}, **options)
        return config["applications"][0]["deployments"][0]["autoscaling_config"]

    assert autoscaling(autoscaling={"max_replicas": 5, "look_back_period_s": 1}) == {
        "min_replicas": 2, "max_replicas": 5, "target_ongoing_requests": 4.0,
        "upscale_delay_s": 1.0, "downscale_delay_s": 30.0, "look_back_period_s": 1}
    # (none given: the app's own)
    assert autoscaling() == ServeSettings.from_args(args).autoscaling_config()
    with pytest.raises(ConfigError, match="autoscaling: .*min_replicas \\(6\\) must be <= "
                                          "max_replicas \\(3\\)"):
        autoscaling(autoscaling={"min_replicas": 6})
    with pytest.raises(ConfigError, match="autoscaling: .*target_ongoing_requests must be a "
                                          "number"):
        autoscaling(autoscaling={"target_ongoing_requests": "many"})
    with pytest.raises(ConfigError, match="autoscaling must be a mapping"):
        autoscaling(autoscaling=[("min_replicas", 1)])


def test_autoscaling_fields_serve_would_ignore_are_refused_with_a_hint():
    # Serve 2.60's AutoscalingConfig drops keys it does not know: max_replica=5 was accepted
    # and the deployment kept max_replicas 2.
    from orchestrator.serving.settings import model_autoscaling

    with pytest.raises(ConfigError) as refused:
        model_autoscaling({}, {"max_replica": 5})
    # (one prefix: it read "autoscaling: unknown field(s) in autoscaling: ...")
    assert str(refused.value).startswith("unknown field(s) in autoscaling: 'max_replica' (did "
                                         "you mean 'max_replicas'?); known fields: ")
    assert model_autoscaling({}, {"look_back_period_s": 15})["look_back_period_s"] == 15


def test_the_autoscaling_fields_known_here_are_serves():
    from ray.serve.config import AutoscalingConfig

    from orchestrator.serving.settings import SERVE_AUTOSCALING_FIELDS

    assert sorted(SERVE_AUTOSCALING_FIELDS) == sorted(AutoscalingConfig.model_fields)


def test_serve_config_yamls_autoscaling_config_has_only_fields_serve_reads():
    from orchestrator.serving.settings import model_autoscaling

    shipped = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    (application,) = shipped["applications"]
    (model,) = [d for d in application["deployments"] if d["name"] == "GPTModel"]
    assert model_autoscaling(application["args"], model["autoscaling_config"]) == {
        **ServeSettings.from_args(application["args"]).autoscaling_config(),
        **model["autoscaling_config"]}


def test_the_serving_path_is_chosen_through_the_serve_controllers_environment():
    from ray.serve.schema import ServeDeploySchema

    def env(**kwargs) -> dict:
        config = serve_app_config("app", 8000, {}, autoscaling={}, user_config={}, **kwargs)
        schema = ServeDeploySchema.model_validate(config)  # Serve accepts the block
        return schema.controller_options.runtime_env["env_vars"]

    # The default is Ray Serve's throughput mode behind HAProxy ...
    assert env()["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert env()["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    # ... and "proxy" turns both off explicitly, so a cluster started with them on in its
    # environment still gets Serve's Python proxy when asked for it.
    assert env(serving_path="proxy") == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0",
                                         "RAY_SERVE_ENABLE_HA_PROXY": "0",
                                         "RAY_SERVE_FORCE_STOP_UNHEALTHY_REPLICAS": "1"}
    with pytest.raises(ConfigError, match="serving_path: 'nginx' is not one of haproxy, proxy"):
        serve_app_config("app", 8000, {}, autoscaling={}, user_config={},
                         serving_path="nginx")


def test_unhealthy_replicas_are_stopped_at_once_on_either_serving_path():
    # A stopping replica is drained for up to graceful_shutdown_timeout_s (sized for whole
    # generations); one that failed its health checks (a hung generation loop) would hold its
    # requests that long instead of letting the ingress resend them at once.
    for path in ("haproxy", "proxy"):
        env = serving_path_options(path)["runtime_env"]["env_vars"]
        assert env["RAY_SERVE_FORCE_STOP_UNHEALTHY_REPLICAS"] == "1", path


def test_a_replica_is_not_given_gpus_it_cannot_use():
    # A replica runs its model on one CUDA device: a second GPU sat reserved and idle.
    with pytest.raises(ConfigError, match=r"gpus_per_replica must be a number in \[0, 1\], "
                                          r"got 2.0: a replica runs its model on one device"):
        ServeSettings.from_args({"gpus_per_replica": "2"})
    assert ServeSettings.from_args({"gpus_per_replica": "0.5"}).gpus_per_replica == 0.5


def test_the_shutdown_grace_is_a_checked_setting():
    with pytest.raises(ConfigError, match="graceful_shutdown_timeout_s must be a number"):
        ServeSettings.from_args({"graceful_shutdown_timeout_s": "-1"})
    assert ServeSettings.from_args({"graceful_shutdown_timeout_s": "30"}
                                   ).graceful_shutdown_timeout_s == 30.0


def test_serve_config_yaml_serves_through_the_default_path():
    shipped = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    assert shipped["controller_options"] == serving_path_options("haproxy")


def test_serve_app_config_refuses_args_the_app_does_not_take():
    with pytest.raises(ConfigError, match="did you mean 'max_batch_size'"):
        serve_app_config("app", 8000, {"max_batch": 4}, autoscaling={}, user_config={})


def test_free_port_can_be_listened_on():
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()


def test_batching_mode_and_kv_cache_settings_are_checked():
    from orchestrator.serving.settings import RuntimeConfig

    settings = ServeSettings.from_args({"batching": "static", "kv_cache_tokens": "4096"})
    assert settings.batching == "static" and settings.kv_cache_tokens == 4096
    assert ServeSettings().batching == "continuous"  # the default
    with pytest.raises(ConfigError, match="batching must be one of continuous, static"):
        ServeSettings.from_args({"batching": "dynamic"})
    with pytest.raises(ConfigError, match="kv_block_tokens must be an integer >= 1"):
        ServeSettings.from_args({"kv_block_tokens": 0})
    runtime = RuntimeConfig.from_user_config({"batching": "static", "kv_cache_tokens": 64},
                                             ServeSettings())
    assert (runtime.batching, runtime.kv_cache_tokens) == ("static", 64)
    with pytest.raises(ConfigError, match="batching must be one of"):
        RuntimeConfig.from_user_config({"batching": "paged"}, ServeSettings())


def test_a_typo_does_not_get_a_correct_value_beside_it_refused():
    # The misspelt field was judged at its default: min_replicas 3 "must be <= max_replicas
    # (2)" although the user wrote 4, only under the wrong name.
    with pytest.raises(ConfigError) as e:
        ServeSettings.from_args({"min_replicas": 3, "max_replica": 4})
    assert "'max_replica' (did you mean 'max_replicas'" in str(e.value)
    assert "must be <=" not in str(e.value)
    # From `serve run ... max_replica=3` every value is a string: the typo's was judged as
    # the field it resembles before conversion ("max_replicas must be an integer, got '3'").
    with pytest.raises(ConfigError) as e:
        ServeSettings.from_args({"min_replicas": "3", "max_replica": "4"})
    assert "'max_replica' (did you mean 'max_replicas'" in str(e.value)
    assert "got '4'" not in str(e.value) and "must be <=" not in str(e.value), str(e.value)


@pytest.mark.parametrize("initial, words", [
    (9, "initial_replicas (9) must be between min_replicas (1) and max_replicas (2)"),
    (0, "initial_replicas (0) must be between min_replicas (1) and max_replicas (2)"),
    ("many", "initial_replicas must be an integer >= 0, got 'many'"),
    ("1_0", "initial_replicas must be an integer >= 0, got '1_0'"),  # int() read 10
    (1.5, "initial_replicas must be an integer >= 0, got 1.5"),
])
def test_initial_replicas_outside_the_bounds_is_refused_before_serve_sees_it(initial, words):
    # It passed through unchecked: the documented one-line check of serve_config.yaml printed
    # a config Serve refuses at deploy, and serve_app_config built one.
    from orchestrator.serving.settings import model_autoscaling

    with pytest.raises(ConfigError, match="autoscaling: " + re.escape(words)):
        model_autoscaling({}, {"initial_replicas": initial})
    # (checked against the bounds after the merge: the args' and the autoscaling's own)
    assert model_autoscaling({"max_replicas": 4}, {"initial_replicas": 3, "min_replicas": 2}
                             )["initial_replicas"] == 3
    assert model_autoscaling({}, {"initial_replicas": "2"})["initial_replicas"] == 2


@pytest.mark.parametrize("sign", [1, -1])
def test_an_integer_too_large_for_a_float_is_named_not_an_overflow(sign):
    # A YAML integer literal past float's range for a float field (max_batch_wait_ms: 1000...0)
    # raised OverflowError from the conversion: a reload's reconfigure raised it (Serve
    # replaced a serving replica, and its replacement failed to start), a deploy a traceback.
    huge = sign * 10 ** 400
    with pytest.raises(ConfigError, match="max_batch_wait_ms must be a number in"):
        RuntimeConfig.from_user_config({"max_batch_wait_ms": huge}, ServeSettings())
    with pytest.raises(ConfigError, match="hang_after_s must be a number in"):
        ServeSettings.from_args({"hang_after_s": huge})
    with pytest.raises(ConfigError, match="hang_after_s must be a number in"):
        ServeSettings(hang_after_s=huge)
    with pytest.raises(ConfigError, match="autoscaling: .*upscale_delay_s"):
        model_autoscaling({}, {"upscale_delay_s": huge})


def test_torch_threads_past_the_shared_limit_are_refused():
    # (torch_threads: 100000 was accepted: each replica died of SIGSEGV at its first forward,
    # libgomp unable to make the threads, and Serve restarted it over and over)
    from orchestrator.validation import MAX_TORCH_THREADS

    with pytest.raises(ConfigError, match=re.escape(
            f"torch_threads must be an integer in [1, {MAX_TORCH_THREADS}], got 100000")):
        ServeSettings.from_args({"torch_threads": "100000"})
    assert ServeSettings.from_args({"torch_threads": MAX_TORCH_THREADS}).torch_threads == \
        MAX_TORCH_THREADS
