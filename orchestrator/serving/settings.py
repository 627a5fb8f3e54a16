"""The serving app's settings: builder arguments (fixed for the app's life) and the runtime
config (`user_config`: checkpoint and batching, changed without restarting replicas).

Arguments arrive as strings from `serve run ray_layer.serve_app:app key=value ...` and as
YAML scalars from serve_config.yaml, so each field is coerced to its declared type first.
Unknown keys are refused with a did-you-mean hint and every bad field is named, all at once.

`serve_app_config` builds the Serve declarative config that deploys the app (the scripts'
and the tests' deployments all come from it); `free_port` finds a port for its HTTP proxy.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import socket
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from orchestrator.config import ConfigError, from_mapping, unknown_fields
from orchestrator.serving.batching import BatchBounds
from orchestrator.serving.protocol import MAX_PROMPTS
from orchestrator.validation import (TORCH_THREADS_RULE, is_number, is_torch_threads,
                                     parse_number)

# The app as Serve imports it (`serve run ray_layer.serve_app:app`), and its model deployment.
IMPORT_PATH = "ray_layer.serve_app:app"
MODEL_DEPLOYMENT = "GPTModel"

RUNTIME_FIELDS = ("checkpoint", "batching", "min_batch_size", "max_batch_size",
                  "max_batch_wait_ms", "adaptive_batching", "kv_cache_tokens")

# How a replica batches requests (the `batching` setting): "continuous" = iteration-level
# batching over a paged KV cache (engine.py), "static" = whole-request batches through
# @serve.batch (batching.py, generation.BatchGeneration), kept to compare against.
BATCHING_MODES = ("continuous", "static")
# The engine process's stepping thread as /proc shows it (comm; setting engine_process,
# engine_host.py): how tools find the engine process and its stepping thread
# (scripts/bench_serve.py).
ENGINE_THREAD = "engine-host"


# The HTTP serving path, chosen when Serve's controller starts (serve_config.yaml's
# `controller_options`; it applies to the controller, its proxies and every replica it starts).
# "haproxy" is Ray Serve's throughput-optimized mode: HAProxy (a C load balancer, shipped with
# ray[serve] on Linux) takes the HTTP connections and hands them to the Ingress replicas, which
# serve HTTP themselves (direct ingress); replicas call each other over gRPC, and user code runs
# on the replica's own event loop. "proxy" is Serve's default: every request also passes
# through Serve's Python HTTP proxy actor. Measured here (docs/benchmarks.md): the proxy path
# took ~38 ms of CPU per request between proxy and ingress, CPU a 2-core node's model replica
# then waited for. A stopping Ingress replica stays reachable for a draining window before it
# closes its listener, 30 s by default, meant for external load balancers. HAProxy retries a
# refused connection on another replica (`retry-on conn-failure`, `option redispatch` in the
# configuration Serve writes), so 2 s is enough; at 30 s `serve.shutdown()` timed out and
# killed Serve's controller, and the next deploy failed on it.
SERVING_PATHS: dict[str, dict[str, str]] = {
    "haproxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1",
                "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"},
    "proxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "RAY_SERVE_ENABLE_HA_PROXY": "0"},
}
# The controller's options on either path. A stopping replica is drained for up to its
# graceful_shutdown_timeout_s, sized for whole generations (the setting); Serve 2.60 drains
# one that failed its health checks the same way unless told not to, and a hung replica
# would hold its requests that long instead of letting the ingress resend them at once.
CONTROLLER_ENV = {"RAY_SERVE_FORCE_STOP_UNHEALTHY_REPLICAS": "1"}
# A stopping replica waits for its requests up to graceful_shutdown_timeout_s, then Serve
# kills it and their clients get an error (a retry from scratch, for a non-streamed one):
# the default lets a generation of a whole 2048-token context finish at this time per token
# (time per output token under load here: 20-60 ms on a 2-core CPU, docs/benchmarks.md).
SHUTDOWN_SECONDS_PER_TOKEN = 0.05

# Ray Serve 2.60's AutoscalingConfig fields (ray.serve.config; a unit test compares): Serve
# drops a key it does not know without a word, so a misspelt one (max_replica) left the
# deployment at its old bound.
SERVE_AUTOSCALING_FIELDS = (
    "min_replicas", "initial_replicas", "max_replicas", "target_ongoing_requests",
    "metrics_interval_s", "look_back_period_s", "smoothing_factor", "upscale_smoothing_factor",
    "downscale_smoothing_factor", "upscaling_factor", "downscaling_factor", "downscale_delay_s",
    "downscale_to_zero_delay_s", "upscale_delay_s", "aggregation_function", "policy")

# Full rounds of batches a model replica accepts by default: the running batches, and queued
# requests for the rounds after them (they wait at the replica's admission gate, app.py).
# Accepting only what the running batches hold collapses throughput once clients outnumber it:
# Serve's router keeps the surplus and retries it with a backoff growing to 0.5 s that no
# finishing batch cuts short, and the batch loop idles for seconds at a time - measured with
# 128 clients: 20 QPS from a replica accepting 64, 93-107 QPS once it accepts them all.
QUEUED_ROUNDS = 8


@dataclass(frozen=True)
class ServeSettings:
    """The serving application's settings (serve_config.yaml `args`, or key=value after
    `serve run ...:app`), validated at construction."""

    # Run, checkpoint or INT8 export dir, pinned when the app is built; "" = the user_config's,
    # else the newest pretrain-* run under the runs root (pinned by the first replica).
    checkpoint: str = ""
    model_name: str = "orchestrator-gpt"  # the id clients pass as `model`
    # Replica resources: "auto" (inference accelerator the cluster has, else CPU), "cpu", or
    # an accelerator family (T4, L4, A100, ...).
    accelerator: str = "auto"
    cpus_per_replica: float = 1.0
    # When an accelerator is used; fractions share one. At most 1: a replica runs its model
    # on one CUDA device, and a second GPU would sit reserved and idle.
    gpus_per_replica: float = 1.0
    torch_threads: int = 1  # per replica; more threads on a shared CPU mostly contend
    # Autoscaling of the model deployment (serve_config.yaml may override it whole).
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 16.0
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    # Batching (runtime: also in user_config): continuous or static; max_batch_size is the rows
    # decoded together in both; the others below up to adaptive_batching are static's.
    batching: str = "continuous"
    min_batch_size: int = 4  # batch cap when idle: about as cheap per step as 1 (measured)
    max_batch_size: int = 32
    max_batch_wait_ms: float = 10.0
    adaptive_batching: bool = True
    # Continuous batching's paged KV cache: positions it holds (0 = max_batch_size rows of the
    # model's whole context; runtime), positions per block, prompt tokens prefilled per step.
    kv_cache_tokens: int = 0
    kv_block_tokens: int = 16
    prefill_chunk_tokens: int = 256
    # Continuous batching's engines run in a process of their own, away from the replica's
    # event loop and its hold on Python's GIL (engine_host.py: measured there); false runs
    # them on a thread of the replica, without the process's second copy of the weights.
    engine_process: bool = True
    # One: decoding runs on one thread, so a second batch only interleaves its steps with the
    # first. Measured (2-core CPU, 1 vs 2 in alternating rounds, 64 clients): 97 vs 75 QPS,
    # p99 1.0 vs 1.5 s, mean batch 21 vs 13 - the next batch takes all that arrived meanwhile.
    max_concurrent_batches: int = 1
    # Per model replica; 0 = max_batch_size x max_concurrent_batches x QUEUED_ROUNDS.
    max_ongoing_requests: int = 0
    # Requests.
    max_prompts_per_request: int = MAX_PROMPTS
    max_body_bytes: int = 1 << 20
    request_retries: int = 3  # times the ingress resends a request whose replica died
    # How long a request waits for a model replica to take it (none running: all replaced or
    # failing to start; or every one full) before it is answered 503; 0 = as long as it takes.
    # Raise it when replicas scale from zero onto nodes that take longer to start.
    replica_wait_s: float = 60.0
    ingress_replicas: int = 1
    # How long a stopping replica (scale-down, a redeploy with other args) waits for its
    # requests, model and Ingress replicas alike (SHUTDOWN_SECONDS_PER_TOKEN says why 120).
    graceful_shutdown_timeout_s: float = 120.0
    # Health.
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 10.0
    hang_after_s: float = 30.0  # requests waiting and no decoding step for this long: unhealthy
    # Lets tests and chaos drills make a replica's batch loop hang (never on in production).
    fault_injection: bool = False

    def __post_init__(self) -> None:
        problems = _field_problems(self, _INT_MIN, _FLOAT_RANGE)
        if not problems:
            if self.min_replicas > self.max_replicas:
                problems.append(f"min_replicas ({self.min_replicas}) must be <= max_replicas "
                                f"({self.max_replicas})")
            needed = self.max_batch_size * self.max_concurrent_batches
            if self.max_ongoing_requests and self.max_ongoing_requests < needed:
                problems.append(
                    f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= "
                    f"max_batch_size x max_concurrent_batches ({self.max_batch_size} x "
                    f"{self.max_concurrent_batches} = {needed}), or batches never fill")
            problems += _batch_problems(self.min_batch_size, self.max_batch_size)
            problems += self._target_problems()
        problems += _mode_problems(self.batching)
        if problems:
            raise ConfigError("invalid serving settings: " + "; ".join(problems))

    def _target_problems(self) -> list[str]:
        """Serve adds replicas when the ongoing requests per replica pass the target; a
        replica accepting fewer is full first, and the surplus waits in Serve's router (503s
        after replica_wait_s) until the load reaches about twice what the replicas hold."""
        accepted = self.replica_max_ongoing_requests
        if self.target_ongoing_requests <= accepted:
            return []
        how = ("" if self.max_ongoing_requests else
               f" = max_batch_size x max_concurrent_batches x {QUEUED_ROUNDS}")
        return [f"target_ongoing_requests ({self.target_ongoing_requests:g}) must be <= the "
                f"replica's max_ongoing_requests ({accepted}{how}), or replicas are added only "
                f"after requests queue and time out"]

    @property
    def replica_max_ongoing_requests(self) -> int:
        return (self.max_ongoing_requests
                or self.max_batch_size * self.max_concurrent_batches * QUEUED_ROUNDS)

    @property
    def batch_size_cap(self) -> int:
        """The largest max_batch_size a runtime config may set without batches that can never
        fill (max_ongoing_requests is fixed for the deployment's life)."""
        return self.replica_max_ongoing_requests // self.max_concurrent_batches

    def user_config(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in RUNTIME_FIELDS}

    def autoscaling_config(self) -> dict[str, Any]:
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s}

    @classmethod
    def from_args(cls, args: Mapping[str, Any] | None) -> "ServeSettings":
        return from_mapping(cls, coerce(cls, args or {}, "serving settings"), "serving settings")


@dataclass(frozen=True)
class RuntimeConfig:
    """What `reconfigure(user_config)` applies: the model and the batching bounds."""

    checkpoint: str
    batching: str
    min_batch_size: int
    max_batch_size: int
    max_batch_wait_ms: float
    adaptive_batching: bool
    kv_cache_tokens: int

    @property
    def bounds(self) -> BatchBounds:
        return BatchBounds(self.min_batch_size, self.max_batch_size,
                           self.max_batch_wait_ms / 1000, self.adaptive_batching)

    @classmethod
    def from_user_config(cls, user_config: Mapping[str, Any] | None,
                         settings: ServeSettings) -> "RuntimeConfig":
        """Fields the user_config leaves out keep the app's settings; the batch size may not
        exceed what max_ongoing_requests lets fill (ConfigError naming the field)."""
        if user_config is not None and not isinstance(user_config, Mapping):
            raise ConfigError(f"user_config must be a mapping, got {type(user_config).__name__}")
        unknown = unknown_fields(user_config or {}, list(RUNTIME_FIELDS), "user_config")
        if unknown:
            raise ConfigError(unknown)
        merged = {**settings.user_config(), **(user_config or {})}
        config = cls(**coerce(cls, merged, "user_config"))
        problems = _field_problems(config, _INT_MIN, _FLOAT_RANGE)
        problems += _batch_problems(config.min_batch_size, config.max_batch_size)
        problems += _mode_problems(config.batching)
        if not problems and config.max_batch_size > settings.batch_size_cap:
            problems.append(f"max_batch_size ({config.max_batch_size}) exceeds what "
                            f"max_ongoing_requests ({settings.replica_max_ongoing_requests}) "
                            f"lets fill with {settings.max_concurrent_batches} concurrent "
                            f"batches: at most {settings.batch_size_cap}")
        if problems:
            raise ConfigError("invalid user_config: " + "; ".join(problems))
        return config


def serving_path_options(path: str) -> dict[str, Any]:
    """The Serve controller options (serve_config.yaml's top-level `controller_options`) that
    select the HTTP serving path; ConfigError naming `serving_path` for an unknown one."""
    if path not in SERVING_PATHS:
        raise ConfigError(f"serving_path: {path!r} is not one of {', '.join(SERVING_PATHS)}")
    return {"runtime_env": {"env_vars": {**SERVING_PATHS[path], **CONTROLLER_ENV}}}


# Serve 2.60 counts a health check as failed once it has not answered in
# health_check_timeout_s (3 in a row replace the replica), whatever it answers later: the
# model's probe is bounded by this share of it, the rest for the check's other work and its
# round trip.
PROBE_SHARE_OF_HEALTH_TIMEOUT = 0.8


def health_probe_timeout_s(hang_after_s: float, health_check_timeout_s: float) -> float:
    """How long a health check waits for the model's one-token probe: hang_after_s, within
    Serve's own timeout of the check."""
    return min(hang_after_s, PROBE_SHARE_OF_HEALTH_TIMEOUT * health_check_timeout_s)


def shutdown_grace_problem(context_tokens: int, grace_s: float) -> str | None:
    """Why a replica stopping may cut a request generating a whole context of
    `context_tokens` (at SHUTDOWN_SECONDS_PER_TOKEN), or None."""
    needed = context_tokens * SHUTDOWN_SECONDS_PER_TOKEN
    if needed <= grace_s:
        return None
    return (f"graceful_shutdown_timeout_s ({grace_s:g} s) is shorter than a generation of the "
            f"model's whole context ({context_tokens} tokens x "
            f"{SHUTDOWN_SECONDS_PER_TOKEN * 1000:g} ms = {needed:g} s): a replica stopping "
            f"(scale-down, a redeploy with other args) cuts requests longer than that; raise it")


def serve_app_config(name: str, port: int, args: Mapping[str, Any], *,
                     user_config: Mapping[str, Any],
                     autoscaling: Mapping[str, Any] | None = None,
                     model_options: Mapping[str, Any] | None = None,
                     deployments: Sequence[Mapping[str, Any]] = (),
                     host: str = "127.0.0.1", route_prefix: str = "/",
                     serving_path: str = "haproxy") -> dict[str, Any]:
    """A Serve declarative config (what `serve deploy` and `serve.deploy_config` take) that
    runs this app as the application `name`: HTTP on the head node only, at `host:port`,
    through `serving_path` (SERVING_PATHS); the app built from `args` (ServeSettings fields,
    checked here so a typo fails before anything is deployed); its model deployment with
    the settings' autoscaling_config with `autoscaling`'s fields over it (model_autoscaling),
    `user_config` (RuntimeConfig fields: changing only these reconfigures the running
    replicas in place) and any other deployment options in `model_options`; `deployments`:
    more deployment entries (e.g. the Ingress's) as Serve takes them.

    A deep copy throughout: the caller may change it without touching what it passed in."""
    model = {"name": MODEL_DEPLOYMENT, **(model_options or {}),
             "autoscaling_config": model_autoscaling(args, autoscaling),
             "user_config": user_config}
    return copy.deepcopy({
        "proxy_location": "HeadOnly",
        "http_options": {"host": host, "port": port},
        "controller_options": serving_path_options(serving_path),
        "applications": [{
            "name": name, "route_prefix": route_prefix, "import_path": IMPORT_PATH,
            "args": args, "deployments": [model, *deployments],
        }],
    })


def model_autoscaling(args: Mapping[str, Any],
                      autoscaling: Mapping[str, Any] | None) -> dict[str, Any]:
    """The model deployment's autoscaling_config: the one the app's settings (`args`) build,
    with `autoscaling`'s fields over it. Serve replaces a deployment's autoscaling_config
    whole, so passing `autoscaling` alone would drop the app's target and bounds for Serve's
    defaults. Fields that are also settings are checked as settings (ConfigError naming
    `autoscaling` and the field), and so is initial_replicas against the bounds; Serve checks
    its other fields' values (look_back_period_s, ...), and keys it does not know are refused
    here with a hint (Serve would drop them)."""
    settings = ServeSettings.from_args(args)
    autoscaling = {} if autoscaling is None else autoscaling
    if not isinstance(autoscaling, Mapping):
        raise ConfigError(f"autoscaling must be a mapping of autoscaling_config fields, got "
                          f"{type(autoscaling).__name__}")
    unknown = unknown_fields(autoscaling, list(SERVE_AUTOSCALING_FIELDS), "autoscaling")
    if unknown:
        raise ConfigError(unknown)  # (it names autoscaling)
    built = settings.autoscaling_config()
    as_settings = {key: value for key, value in autoscaling.items() if key in built}
    try:
        merged = dataclasses.replace(settings, **coerce(ServeSettings, as_settings,
                                                        "autoscaling"))
    except ConfigError as e:
        raise ConfigError(f"autoscaling: {e}") from None
    passed = {key: value for key, value in autoscaling.items() if key not in built}
    if passed.get("initial_replicas") is not None:
        passed["initial_replicas"] = _initial_replicas(passed["initial_replicas"], merged)
    return {**merged.autoscaling_config(), **passed}


def _initial_replicas(raw: Any, settings: ServeSettings) -> int:
    """autoscaling's initial_replicas, within the merged bounds as Serve requires (it refused
    one outside them only at deploy); ConfigError naming the field."""
    value = _from_text(raw.strip(), "int") if isinstance(raw, str) else raw
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        raise ConfigError(f"autoscaling: initial_replicas must be an integer >= 0, got {raw!r}")
    if not settings.min_replicas <= value <= settings.max_replicas:
        raise ConfigError(f"autoscaling: initial_replicas ({value}) must be between "
                          f"min_replicas ({settings.min_replicas}) and max_replicas "
                          f"({settings.max_replicas})")
    return value


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` at the time of the call ("" = every interface): for the HTTP
    proxy of a Serve app, or any other server a script or test starts."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# Lower bounds of integer fields, and [low, high] of float fields (torch_threads: the
# project's one rule, validation.TORCH_THREADS_RULE).
_INT_MIN = {"min_replicas": 0, "max_replicas": 1, "min_batch_size": 1,
            "max_batch_size": 1, "max_concurrent_batches": 1, "max_ongoing_requests": 0,
            "max_prompts_per_request": 1, "max_body_bytes": 64, "request_retries": 0,
            "ingress_replicas": 1, "kv_cache_tokens": 0, "kv_block_tokens": 1,
            "prefill_chunk_tokens": 1}
_FLOAT_RANGE = {"cpus_per_replica": (0.0, 1024.0), "gpus_per_replica": (0.0, 1.0),
                "target_ongoing_requests": (0.001, 1e6), "upscale_delay_s": (0.0, 86400.0),
                "downscale_delay_s": (0.0, 86400.0), "max_batch_wait_ms": (0.0, 10_000.0),
                "graceful_shutdown_timeout_s": (0.0, 3600.0),
                "health_check_period_s": (0.1, 3600.0),
                "health_check_timeout_s": (0.1, 3600.0), "hang_after_s": (0.1, 86400.0),
                "replica_wait_s": (0.0, 86400.0)}


# Why a range is what it is, where the bound alone would puzzle.
_RANGE_WHY = {"gpus_per_replica": ": a replica runs its model on one device; for more "
                                  "throughput raise max_replicas"}


def _field_problems(obj: Any, int_min: dict[str, int],
                    float_range: dict[str, tuple[float, float]]) -> list[str]:
    problems = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name == "torch_threads":
            if not is_torch_threads(value):
                problems.append(f"torch_threads {TORCH_THREADS_RULE}, got {value!r}")
        elif f.name in int_min:
            if not (isinstance(value, int) and not isinstance(value, bool)
                    and value >= int_min[f.name]):
                problems.append(f"{f.name} must be an integer >= {int_min[f.name]}, "
                                f"got {value!r}")
        elif f.name in float_range:
            low, high = float_range[f.name]
            if not (is_number(value) and low <= value <= high):
                problems.append(f"{f.name} must be a number in [{low:g}, {high:g}], "
                                f"got {value!r}{_RANGE_WHY.get(f.name, '')}")
        elif f.type in ("bool", bool) and not isinstance(value, bool):
            problems.append(f"{f.name} must be true or false, got {value!r}")
        elif f.type in ("str", str) and not isinstance(value, str):
            problems.append(f"{f.name} must be a string, got {value!r}")
    if getattr(obj, "model_name", "x") == "":
        problems.append("model_name must not be empty")
    return problems


def _batch_problems(min_batch: Any, max_batch: Any) -> list[str]:
    if isinstance(min_batch, int) and isinstance(max_batch, int) and min_batch > max_batch:
        return [f"min_batch_size ({min_batch}) must be <= max_batch_size ({max_batch})"]
    return []


def _mode_problems(batching: Any) -> list[str]:
    if isinstance(batching, str) and batching not in BATCHING_MODES:
        return [f"batching must be one of {', '.join(BATCHING_MODES)}, got {batching!r}"]
    return []


def coerce(cls, data: Mapping[str, Any], what: str) -> dict[str, Any]:
    """Strings from the command line to each field's type ("32" -> 32, "true" -> True);
    values that do not convert are left for validation to name."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{what} must be a mapping of names to values, got "
                          f"{type(data).__name__}")
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    out = {}
    for key, value in data.items():
        # A misspelt key's value as the field it is closest to (known_fields_problems judges
        # it as that field: `max_replica=3` was also "max_replicas must be an integer, got '3'")
        close = difflib.get_close_matches(str(key), list(types), n=1) if key not in types \
            else [key]
        kind = types.get(close[0]) if close else None
        if isinstance(value, str) and kind in ("int", "float", "bool"):
            value = _from_text(value.strip(), kind)
        elif kind == "float" and isinstance(value, int) and is_number(value):
            # (one past float's range, a YAML literal of 309+ digits, is left for validation
            # to name its field: float() raised OverflowError, a traceback)
            value = float(value)
        elif kind == "str" and value is None:
            value = ""
        out[key] = value
    return out


def _from_text(text: str, kind: str) -> Any:
    """`text` as the field's kind; left as text, for validation to name, where it is not one
    (validation.parse_number: int()/float() took `1_6` as 16 and other scripts' digits)."""
    try:
        if kind in ("int", "float"):
            return parse_number(text, whole=kind == "int")
    except ValueError:
        return text
    lowered = text.lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    return text
