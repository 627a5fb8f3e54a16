"""Bring the control plane up: a named scheduler and an agent on every alive node.

Idempotent: actors that already exist are reused, so every job can call this and only the
first one on a cluster creates anything. What is missing is created outside the calling job's
runtime_env (_create_without_runtime_env).

    python -m ray_layer.cluster GCS_ADDRESS [SETTINGS_JSON]   # that creation, in a driver of
                                                              # its own
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import ray

from orchestrator.job_exit import on_one_line
from ray_layer.node_agent import ensure_agent
from ray_layer.scheduler_actor import SchedulerActor
from ray_layer.scheduler_client import (NAMESPACE, SCHEDULER_NAME, SchedulerNotRunning,
                                        get_agent, get_scheduler)

HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray gives the head node this resource
# How long ensure_control_plane waits for a fresh report: from an agent that was already up
# (a report takes well under a second; one that does not come is a hung or lost agent, which
# the scheduler treats as suspect and its maintenance restarts), and from an agent this call
# had to start (a worker process to start first; on a fresh cluster the first placements
# depend on those reports). Looked up at each call, so a test can shorten them.
AGENT_REPORT_WAIT_S = 10.0
AGENT_START_WAIT_S = 60.0
# The driver of its own that creates missing control plane actors: how long it may take (Ray
# connecting, the scheduler restoring its state, every agent's first report), and the
# variable marking it (it never starts another).
CLEAN_BRING_UP_TIMEOUT_S = 180.0
CLEAN_BRING_UP_ENV = "ORCHESTRATOR_CONTROL_PLANE_BRING_UP"


class SchedulerNotUp(TimeoutError):
    """The scheduler actor did not come up (or answer) in time: nothing can be placed."""


def ensure_scheduler(*, timeout_s: float | None = None, **settings):
    """The cluster's scheduler, created with `settings` (SchedulerActor's keyword arguments:
    the fields of orchestrator.scheduler_types.SchedulerSettings, plus maintain_every_s) if it
    does not exist yet; an existing one keeps the settings it was created with. Created with
    none (after the scheduler was lost), it runs with those its predecessor saved. Created
    outside this process's runtime_env, where it has one (_create_without_runtime_env), in
    `timeout_s` at most (None: CLEAN_BRING_UP_TIMEOUT_S): a SchedulerLink's reconnect passes
    what its call's deadline leaves."""
    if _runtime_env_inherited() and _scheduler_missing():
        _create_without_runtime_env(settings, timeout_s)
    return SchedulerActor.options(name=SCHEDULER_NAME, namespace=NAMESPACE, lifetime="detached",
                                  get_if_exists=True,
                                  # On the head node, which outlives worker nodes: a scheduler
                                  # on a node that is lost restarts with no reports for a while.
                                  resources={HEAD_NODE_RESOURCE: 0.001}).remote(**settings)


def _scheduler_missing() -> bool:
    try:
        get_scheduler()
    except SchedulerNotRunning:
        return True
    return False


def _runtime_env_inherited() -> dict:
    """The runtime_env an actor created by this process gets: its job's (ray.init's, `ray job
    submit`'s), or in a task or actor its own; {} where none (or Ray cannot say), and in the
    driver that creates the control plane aside (CLEAN_BRING_UP_ENV): it never starts another."""
    if os.environ.get(CLEAN_BRING_UP_ENV):
        return {}
    try:
        return dict(ray.get_runtime_context().runtime_env or {})
    except Exception:  # not connected: nothing is created here either
        return {}


def _create_without_runtime_env(settings: dict, timeout_s: float | None = None) -> None:
    """Create what is missing of the control plane (the scheduler with `settings`, an agent on
    every alive node) from a driver process of its own, connected without a runtime_env. Ray
    gives an actor the runtime_env of the process creating it, field by field: a runtime_env
    option on the actor replaces only the fields it names (env_vars merge per variable), and
    none removes one. Created by a job's driver (or, the scheduler lost, by a job's Ray Train
    controller), the scheduler and the agents ran for the cluster's life in that job's pip
    venv, working_dir and env_vars, and waited for its venv to build before starting (past
    the driver's 60 s wait: "did not come up"). That process imports the package installed
    on this node, as the actors' workers will (docs/operations.md: installed on every node).
    If it fails (the package not installed, say), it is said, and the caller creates them
    itself, as before; it is not tried again by this process (it would fail again, each time
    up to CLEAN_BRING_UP_TIMEOUT_S: a lost scheduler's re-creation waited for it twice).
    `timeout_s` shorter than CLEAN_BRING_UP_TIMEOUT_S (a caller's deadline): SchedulerNotUp
    when the process has not ended by then (_cut_short)."""
    global _bring_up_failed
    if _bring_up_failed:
        return
    limit = CLEAN_BRING_UP_TIMEOUT_S if timeout_s is None else \
        min(timeout_s, CLEAN_BRING_UP_TIMEOUT_S)
    environ = {k: v for k, v in os.environ.items()
               # (Ray reads a `ray job submit` job's runtime_env, and the address, from these)
               if k not in ("RAY_JOB_CONFIG_JSON_ENV_VAR", "RAY_ADDRESS")}
    environ[CLEAN_BRING_UP_ENV] = "1"
    pythonpath = _without_runtime_env_folders(environ.pop("PYTHONPATH", ""))
    if pythonpath:
        environ["PYTHONPATH"] = pythonpath
    command = [sys.executable, "-m", "ray_layer.cluster", ray.get_runtime_context().gcs_address,
               json.dumps(settings)]
    try:
        # In an empty folder of its own: Ray adds a driver's working directory to the sys.path
        # of its job's workers (the scheduler's, the agents') when the job has no working_dir,
        # and the caller's is its job's (under `ray job submit --working-dir`, the extracted
        # copy, which Ray deletes once unused). Removed after: a path gone imports nothing.
        with tempfile.TemporaryDirectory(prefix="orchestrator-control-plane-") as folder:
            done = subprocess.run(command, env=environ, cwd=folder, capture_output=True,
                                  text=True, timeout=limit)
        why = None if done.returncode == 0 else \
            ([line for line in done.stderr.splitlines() if line.strip()] or
             [f"exit code {done.returncode}"])[-1].strip()
    except subprocess.TimeoutExpired as e:
        if limit < CLEAN_BRING_UP_TIMEOUT_S:
            raise _cut_short(limit) from None
        why = f"{type(e).__name__}: {e}"
    except OSError as e:
        why = f"{type(e).__name__}: {e}"
    if why:
        _bring_up_failed = True
        _warn(_created_here_because(why))


_bring_up_failed = False  # _create_without_runtime_env failed once in this process


def _cut_short(limit: float) -> "SchedulerNotUp":
    """The creation aside stopped at a caller's deadline. Not a failure of the process
    aside (a later call with the time tries it again), and nothing is created here instead:
    in this job's runtime_env for the cluster's life, for a caller that gives up anyway."""
    return SchedulerNotUp(
        f"the control plane (the scheduler {SCHEDULER_NAME!r}, node agents), created by a "
        f"process of its own, was not up within the {limit:g} s the call's deadline left")


def _without_runtime_env_folders(pythonpath: str) -> str:
    """PYTHONPATH without the folders a runtime_env put on it: Ray extracts a job's working_dir
    and py_modules under its session's runtime_resources folder and puts them first. The rest
    is what a worker of a job without runtime_env sees."""
    return os.pathsep.join(p for p in pythonpath.split(os.pathsep)
                           if p and "runtime_resources" not in Path(p).parts)


def _created_here_because(why: str) -> str:
    """The warning when the control plane could not be created aside (`why`: the last line
    the process said): a package not installed on this node says how to install it."""
    here = ("creating it here, where the scheduler and node agents inherit this job's "
            "runtime_env for the cluster's life")
    if why.startswith("ModuleNotFoundError: No module named") and \
            any(f"'{package}" in why for package in ("ray_layer", "orchestrator")):
        return ("this package (ray_layer, orchestrator) is not installed on this node, only "
                f"shipped with the job ({why}): {here}. Install it on every node, in the "
                "Python that runs Ray (`pip install .` in a checkout; cluster.yaml does: see "
                "docs/operations.md)")
    return f"could not create the control plane outside this job's runtime_env ({why}): {here}"


def alive_node_ids() -> list[str]:
    return [n["NodeID"] for n in ray.nodes() if n["Alive"]]


def ensure_agents() -> dict[str, "ray.actor.ActorHandle"]:
    """An agent on every alive node. The scheduler also does this on a timer, so nodes that
    join later (autoscaling, `ray start` elsewhere) get one without anyone asking."""
    return {node_id: ensure_agent(node_id) for node_id in alive_node_ids()}


def _running_local_clusters() -> list[str]:
    """GCS addresses of the Ray clusters running on this machine (Ray's own search of the
    processes, as `--address auto` uses); [] when it cannot tell."""
    from ray._private import services

    try:
        return sorted(services.find_gcs_addresses())
    except Exception:  # a notice is never worth failing the job over
        return []
    finally:  # Ray caches what it found; a later search in this process must see ours too
        services._thread_safe_find_gcs_addresses_cache_clear()


def _auto_address() -> tuple[str, str]:
    """(the GCS address "auto" names, how it was found): as Ray's lookup finds it, RAY_ADDRESS,
    else the one cluster running on this machine, else the one `ray start` last recorded
    here. Resolved here, not by ray.init, so that the record of a cluster that died without
    `ray stop` (kill -9, a restarted container) gets _check_reachable's fail-fast: ray.init
    retried its dead head for over a minute. ClusterConnectionError when there is none, or
    several, or a record that is no address."""
    from ray._common.utils import get_ray_address_file
    from ray._private import services

    record = get_ray_address_file(None)
    try:
        address = services.canonicalize_bootstrap_address_or_die("auto")
        recorded = services.find_bootstrap_address(None)
        from_record = bool(recorded) and services.canonicalize_bootstrap_address(
            recorded) == address
    except (ConnectionError, ValueError) as e:  # none running, several, a garbled record
        raise ClusterConnectionError(f"--address auto: {e} (Ray's record of the cluster "
                                     f"`ray start` runs here: {record})") from None
    finally:  # Ray caches what it found; a later search in this process must see ours too
        services._thread_safe_find_gcs_addresses_cache_clear()
    if os.environ.get("RAY_ADDRESS"):  # (Ray's lookup takes it over "auto")
        return address, "RAY_ADDRESS"
    if from_record:
        return address, (f"the cluster `ray start` recorded in {record}; a record left by "
                         "one that stopped without `ray stop` is cleared by `ray stop`")
    return address, "the Ray cluster running on this machine"


def _take_the_local_token_as_ray_does_for_auto() -> None:
    """What ray.init("auto") does before it connects: with RAY_AUTH_MODE unset and a token on
    this machine (~/.ray/auth_token, which `ray start` 2.60 writes: token auth is its
    default), token mode is turned on for this process. "auto" is resolved to an address
    here, and Ray takes a given address as explicit, never doing this: without it the
    probe and ray.init sent no token, and a cluster `ray start` ran on this very machine
    was reported as refusing it."""
    try:
        from ray._private.authentication.authentication_token_setup import \
            maybe_enable_token_auth_if_token_available
    except ImportError:  # (a Ray without token auth: nothing to take)
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _notice_clusters_beside(addresses: list[str]) -> None:
    """An embedded Ray started beside a cluster `ray start` runs here: the job is invisible
    to that cluster (`python -m orchestrator status`, preempt, cancel, its dashboard), and
    Ray's state API inside the job may reach the other one (Ray Train's placement-group
    cleaner did: "Found multiple active Ray instances"). Said once, before it starts."""
    if addresses:
        _warn(f"a Ray cluster already runs on this machine ({', '.join(addresses)}): this "
              "job starts an embedded Ray of its own, which that cluster's `python -m "
              "orchestrator status`, preempt, cancel and dashboard do not see. Pass "
              "--address auto to run it there.")


def _warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)


def ensure_control_plane(timeout_s: float | None = None, start_timeout_s: float | None = None,
                         warn: Callable[[str], None] = _warn, create_scheduler: bool = True):
    """Scheduler + agents up, and a fresh report in the scheduler from every agent that
    answers in time: `timeout_s` (default AGENT_REPORT_WAIT_S) for agents already up,
    `start_timeout_s` (default AGENT_START_WAIT_S) for agents this call started. Agents that
    do not answer (a hung probe, a stopped process, a node going away) are named in one
    warning and left out: the scheduler treats their silent nodes as suspect and places
    elsewhere, and its maintenance restarts an agent that stays silent. One hung agent must
    not block every job and `status`. SchedulerNotUp when the scheduler itself does not
    answer within `start_timeout_s`. `create_scheduler` False (the CLI's `status`, `preempt`
    and `cancel`): SchedulerNotRunning where the cluster has no scheduler, and nothing
    created, agents neither; where it has one, an agent is still started on a node that has
    none, as the scheduler's own maintenance would. Returns (scheduler, {node id: agent}) for
    every alive node."""
    timeout_s = AGENT_REPORT_WAIT_S if timeout_s is None else timeout_s
    start_timeout_s = AGENT_START_WAIT_S if start_timeout_s is None else start_timeout_s
    start = time.monotonic()
    scheduler = ensure_scheduler() if create_scheduler else get_scheduler()
    try:  # answers once its __init__ (state restored from the GCS) is done
        ray.get(scheduler.__ray_ready__.remote(), timeout=max(start_timeout_s, timeout_s))
    except (ray.exceptions.RayError, TimeoutError) as e:  # GetTimeoutError is both
        raise SchedulerNotUp(
            f"the scheduler actor ({SCHEDULER_NAME!r} in Ray namespace {NAMESPACE!r}) did not "
            f"come up: {type(e).__name__}: {e}") from None
    nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
    started = {node_id for node_id in nodes if not _agent_exists(node_id)}  # waited for longer
    if started and _runtime_env_inherited():
        _create_without_runtime_env({})
    agents = {node_id: ensure_agent(node_id) for node_id in nodes}
    asked = {agent.report_now.remote(): node_id for node_id, agent in agents.items()}
    refs = list(asked)
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    starting = [ref for ref in pending if asked[ref] in started]
    left = start_timeout_s - (time.monotonic() - start)
    if starting and left > 0:
        ray.wait(starting, num_returns=len(starting), timeout=left)
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
    answered = set(ready)
    silent = {}
    for ref, node_id in asked.items():
        if ref not in answered:
            waited = start_timeout_s if node_id in started else timeout_s
            silent[node_id] = f"no report within {waited:g}s"
            continue
        try:
            ray.get(ref)
        except Exception as e:  # the agent died, or its report to the scheduler failed
            first_line = (str(e).strip().splitlines() or [""])[0]
            silent[node_id] = f"{type(e).__name__}: {first_line}"
    if silent:
        warn(f"{len(silent)} of {len(agents)} node agent(s) did not report, carrying on "
             "without them (the scheduler gives a node whose agent stays silent no new work "
             "and restarts that agent): " + "; ".join(
                 f"node {node_id} ({nodes[node_id].get('NodeManagerAddress', '?')}): {why}"
                 for node_id, why in sorted(silent.items())))
    return scheduler, agents


def _agent_exists(node_id: str) -> bool:
    try:
        get_agent(node_id)
    except ValueError:
        return False
    return True


class ClusterConnectionError(RuntimeError):
    """Ray could not be reached at the given address."""


def _check_reachable(address: str, source: str, timeout_s: float = 5.0,
                     embedded: bool = True) -> None:
    """Fail fast on an unreachable host:port. ray.init itself retries for minutes.
    `embedded`: without an address the caller starts an embedded Ray (jobs do)."""
    import socket

    if address.startswith(("http://", "https://")):
        raise ClusterConnectionError(
            f"{source} {address!r} is a dashboard URL (what `ray job submit` wants); a job "
            "connects to the cluster's GCS address, host:6379"
            + (". Unset it to use an embedded Ray" if embedded and source == "RAY_ADDRESS"
               else ""))
    host, _, port = address.removeprefix("ray://").rpartition(":")
    # An IPv6 host comes bracketed ("[::1]:6379"); the socket wants it bare.
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdigit():
        raise ClusterConnectionError(f"{source} {address!r} is not of the form host:port")
    tls = os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as connection:
            other = None if tls else _not_grpc(connection)
    except OSError as e:
        raise ClusterConnectionError(
            f"cannot reach a Ray cluster at {address} ({source}): {e.strerror or e}. Is "
            "`ray start --head` running there, and is the port open from here?") from None
    if other:  # ray.init would retry its GCS there for minutes, logging each try
        raise ClusterConnectionError(
            f"{address} ({source}) is not a Ray cluster's GCS port: {other} (the dashboard's "
            "8265, or another service?); give the address `ray start --head` printed, "
            "host:6379 unless --port set another")
    refused = None if address.startswith("ray://") or tls else _token_refused(address,
                                                                               timeout_s)
    if refused:  # ray.init retried it for 20 s, then said only "Failed to connect"
        raise ClusterConnectionError(
            f"Ray at {address} ({source}) refuses this machine: {refused}. Its token is "
            "what `ray get-auth-token` prints on the head node; here set RAY_AUTH_MODE=token "
            "and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or the file ~/.ray/auth_token)")


# A GCS method every Ray 2.5x/2.60 GCS serves; its request message is empty.
GCS_PROBE_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"


def _token_metadata() -> tuple[tuple[str, str], ...] | None:
    """The gRPC metadata carrying the token Ray would send from this process (empty: none),
    or None where this Ray keeps it elsewhere (no check rather than a wrong one)."""
    try:
        from ray._private.authentication.grpc_authentication_client_interceptor import \
            _get_authentication_metadata_tuple
        return tuple(_get_authentication_metadata_tuple())
    except Exception:
        return None


def _token_refused(address: str, timeout_s: float) -> str | None:
    """Why a GCS with token authentication (RAY_AUTH_MODE=token on the cluster) refuses the
    token this process would send, or None: accepted, none needed, or the question could not
    be asked (ray.init then says what it finds)."""
    import grpc

    metadata = _token_metadata()
    if metadata is None:
        return None
    from ray._private.ray_constants import GLOBAL_GRPC_OPTIONS

    # Ray's own channel options: no http_proxy (as ray.init reaches the GCS), else the probe
    # went to the proxy and waited its timeout there.
    with grpc.insecure_channel(address, options=GLOBAL_GRPC_OPTIONS) as channel:
        ask = channel.unary_unary(GCS_PROBE_METHOD, request_serializer=None,
                                  response_deserializer=None)
        try:
            ask(b"", timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                return ("it asks for an authentication token, and this machine sends "
                        + ("another" if metadata else "none"))
    return None


# HTTP/2's client preface and an empty SETTINGS frame: a gRPC server (Ray's GCS, a Ray Client
# server) answers with a SETTINGS frame of its own (frame type 4, the 4th byte of its header).
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(3) + b"\x04" + bytes(5)


def _not_grpc(connection) -> str | None:
    """What answered on `connection` (connected, with a timeout) when it is not a gRPC
    server, or None when it is."""
    import socket

    answer = b""
    try:
        connection.sendall(HTTP2_PREFACE)
        while len(answer) < 9 and (chunk := connection.recv(9 - len(answer))):
            answer += chunk
    except socket.timeout:
        return f"no answer within {connection.gettimeout():g} s" if not answer else \
            f"it answered {answer!r}"
    except OSError as e:
        return f"it dropped the connection ({e.strerror or e})"
    if len(answer) == 9 and answer[3] == 4:
        return None
    if answer.startswith((b"HTTP/", b"<")):  # (a status line, or an HTML error page)
        return "an HTTP server answered"
    return f"it answered {answer!r}" if answer else "it closed the connection"


def runtime_env_problem(runtime_env: dict) -> str | None:
    """What Ray would refuse in a job's runtime_env, or None, asked before Ray starts: Ray
    checks it only in ray.init, after starting a node, and its error then read as a failed
    connection."""
    from ray.runtime_env import RuntimeEnv

    for key, value in [*runtime_env.items(), (None, None)]:  # each alone, then together
        try:
            RuntimeEnv(**({key: value} if key is not None else runtime_env))
        except Exception as e:  # ValueError, TypeError, a plugin schema's ValidationError
            where = f"runtime_env.{key}" if key is not None else "runtime_env"
            return f"{where}: {on_one_line(str(e))}{RUNTIME_ENV_HINTS.get(key, '')}"
    return env_vars_problem(runtime_env.get("env_vars") or {})


def env_vars_problem(env_vars: dict[str, str]) -> str | None:
    """An env_vars entry no process can be given (its name empty or holding '=' or NUL, its
    value holding NUL), or None. Ray takes them, then each worker process it starts with them
    dies setting them ("ValueError: illegal environment variable name" in the raylet's log
    alone), and the job, once placed, waited for its workers."""
    for name, value in env_vars.items():
        if not name or "=" in name or "\0" in name:
            return (f"runtime_env.env_vars: {name!r} cannot name an environment variable "
                    "(not empty, no '=' nor NUL in it)")
        if "\0" in value:
            return (f"runtime_env.env_vars: the value of {name!r} holds a NUL character, "
                    "which an environment variable cannot")
    return None


def submitted_runtime_env_conflict(runtime_env: dict,
                                   environ: dict[str, str] | None = None) -> str | None:
    """Under `ray job submit`, the runtime_env fields (and env_vars keys) the job's own
    runtime_env shares with the submission's (`--working-dir`, `--runtime-env`), which Ray
    refuses to merge, or None. Ray says so only in ray.init, as if the connection failed,
    and a dry run (which connects without the job's runtime_env) passed."""
    import json

    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    environ = os.environ if environ is None else environ
    if RAY_JOB_CONFIG_JSON_ENV_VAR not in environ or \
            environ.get("RAY_OVERRIDE_JOB_RUNTIME_ENV") == "1":
        return None
    try:
        submitted = json.loads(environ[RAY_JOB_CONFIG_JSON_ENV_VAR]).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None  # Ray's own to read; it says what is wrong with it
    shared = sorted((set(runtime_env) & set(submitted)) - {"env_vars"})
    shared += [f"env_vars.{k}" for k in sorted(set(runtime_env.get("env_vars") or {})
                                               & set(submitted.get("env_vars") or {}))]
    if not shared:
        return None
    return (f"runtime_env: {', '.join(shared)} also given by `ray job submit` (its "
            "--working-dir / --runtime-env), and Ray does not merge a field given twice: "
            "drop it from the job's runtime_env or from `ray job submit` (or set "
            "RAY_OVERRIDE_JOB_RUNTIME_ENV=1: the job's then wins)")


def runtime_env_warnings(runtime_env: dict) -> list[str]:
    """A key of runtime_env close to one of Ray's (`workdir`): Ray takes any key, for its
    plugins, and ignores one no plugin claims, so a typo passed silently. A warning, not a
    refusal: a plugin's key may look like one of Ray's (`conda_env`)."""
    import difflib

    from ray.runtime_env import RuntimeEnv

    known = sorted(k for k in RuntimeEnv.known_fields if not k.startswith("_"))
    warnings = []
    for key in runtime_env:
        close = difflib.get_close_matches(str(key), known, n=1)
        if key not in RuntimeEnv.known_fields and close:
            warnings.append(f"runtime_env: Ray does not know the key {key!r} (did you mean "
                            f"{close[0]!r}?); it is ignored unless a plugin takes it")
    return warnings


RUNTIME_ENV_HINTS = {  # what a job file's author most likely meant
    "env_vars": ' (values are strings, OMP_NUM_THREADS: "1": not a list, nor left empty)',
    "pip": " (a list of packages, [pandas, numpy==2.1], or a requirements file's path)",
    "working_dir": " (a folder, relative to the job file, or a URI)",
}


def connect(address: str | None, runtime_env: dict | None = None, embedded: bool = True
            ) -> bool:
    """Connect to the cluster at `address` (or RAY_ADDRESS; "auto": the one `ray start` runs
    on this machine); start an embedded local Ray when neither is given. `runtime_env`
    (Ray's: working_dir, pip, env_vars, ...) becomes the job's. `embedded`: whether the
    caller would start an embedded Ray without an address (jobs do; the operator commands
    never), for the advice in errors. Returns True when this call started Ray (and so should
    stop it)."""
    import os

    # (`--address "$UNSET"`): not None. Refused first, also where Ray is already initialized
    # in this process: a given --address is never quietly taken for the connection at hand.
    if address is not None and not address.strip():
        raise ClusterConnectionError("--address is empty: give host:port or auto, or leave "
                                     "it out (RAY_ADDRESS, else " + (
                                         "an embedded local Ray)" if embedded else
                                         "the Ray cluster `ray start` runs on this machine)"))
    if ray.is_initialized():
        if runtime_env:
            raise ClusterConnectionError(
                "runtime_env applies when the launcher connects, but Ray is already "
                "initialized in this process: pass it to your own ray.init() instead")
        return False
    source = "--address"
    if not address and os.environ.get("RAY_ADDRESS"):
        address, source = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    if address == "auto":  # (Ray's own lookup, then the checks a given address gets)
        _take_the_local_token_as_ray_does_for_auto()
        address, source = _auto_address()
    if address:
        _check_reachable(address, source, embedded=embedded)
    if not address:
        _notice_clusters_beside(_running_local_clusters())
    try:
        # "local", not None: None connects to whatever `ray start` last recorded on this
        # machine (/tmp/ray/ray_current_cluster), and to a stale record it retried a dead
        # head for minutes. Jobs without an address start their own Ray, as documented;
        # `--address auto` asks for the cluster started on this machine.
        ray.init(address=address or "local", runtime_env=runtime_env)
    except Exception as e:  # auth, version mismatch, ...: Ray raises many types here
        where = f"Ray at {address} ({source})" if address else "an embedded local Ray"
        raise ClusterConnectionError(f"cannot start or connect to {where}: "
                                     f"{type(e).__name__}: {e}") from None
    return not address


if __name__ == "__main__":  # _create_without_runtime_env's driver: no runtime_env of its own
    ray.init(address=sys.argv[1])
    ensure_scheduler(**(json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}))
    ensure_control_plane()
