"""A user's own Ray Train loop under the launcher (orchestrator/launch.py is the public face).

Inside the loop, `report(metrics, checkpoint)` is `ray.train.report` plus the one thing the
scheduler needs: when it has asked the job to yield (preemption, migration, an operator's
cancel), the loop stops right after a report that saved a checkpoint, so nothing is lost.
That report carries "yielded" in its metrics: Ray Train's result keeps the metrics of the
latest checkpoint's report only, and the launcher's driver (ray_layer/placed_run.py) reads
"yielded" there to wait and fit again. `yielding(train_loop)` wraps the loop so that the stop
ends the worker normally.

Every worker must call `report` the same number of times (as Ray Train requires anyway);
the decision to stop is rank 0's, shared with the others at each report, so all ranks stop at
the same report: the first report after the directive at which any rank passes a checkpoint
(rank 0 alone, Ray Train's common pattern; every rank; or another rank alone).
"""
from __future__ import annotations

import functools
import io
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from orchestrator.entrypoints import accepts_config, library_folders, own_frame
from orchestrator.metric_catalogue import TRAIN_REPORT_KEYS, non_number_report_keys
from orchestrator.stuck_ranks import (REPORTING, RETURNED, WAITING, WORKING, collective_call,
                                      compiling, computing)
from orchestrator.validation import finite_json
from ray_layer.train_session import (DirectiveWatch, declared_gpu_only, quiet_ray_train_reports,
                                     record_training)

# Metric names the launcher itself reads from a report: "yielded" (a preemption) and
# "already_complete" (a resumed run with nothing left, kept out of metrics.jsonl).
RESERVED_METRICS = frozenset({"yielded", "already_complete"})
# Set on a loop's exception by the worker: where in the user's own code it was raised
# ("train.py line 57, in train_loop"), for the driver's one error line (ray_layer/launch.py).
RAISED_AT = "orchestrator_raised_at"
_watch: DirectiveWatch | None = None  # one per worker process (rank 0 asks)
_export_failed = False  # a failure to export the metrics was said (once per worker)
_non_numbers_said: set[str] = set()  # report keys said to hold no number (once each, per worker)
_pending: str | None = None  # a directive not yet acted on (no checkpoint since)
_reports = 0  # this worker's calls of report in this run of the loop
# What a worker that returned from the loop sends into the other ranks' agreement (a
# directive is never this): their report fails at once, naming it, where it waited in the
# gather for gloo's 30-minute timeout, with no message.
_RETURNED = "\0returned from the loop"
# What a worker whose report launch.report refused (ReportRefused) sends into the same
# gather, with its error line: the other ranks end their loop at that report too.
_REFUSED = "\0report refused"
# The key of rank 0's return value holding that line (ray_layer/launch.py fails the job on it,
# as jobs/pretrain.py does on train_session.DIVERGED): returned, not raised, since Ray Train
# restarted the workers max_failures times over for the same refused report.
REPORT_REFUSED = "orchestrator_report_refused"
# Where this worker's loop is, for the driver's watch for stuck ranks (`progress`): (state,
# since (time.monotonic()), reports, step); one tuple, replaced whole (read from another
# thread). None outside a launched loop.
_where: tuple[str, float, int, Any] | None = None
_loop_thread: int | None = None  # the thread running the loop (its stack: `progress`)
# That thread's CPU clock (time.clock_gettime), None where the platform has none: taken by
# the thread itself (time.pthread_getcpuclockid of another thread that may have ended is
# undefined behaviour; the clock of one that ended raises OSError).
_loop_clock: int | None = None
# torch's folder: a loop whose innermost frame is torch's code that waits for the other ranks
# (DDP's all-reduce in backward, a torch.distributed call) is blocked in a collective.
_TORCH_DIR = os.path.dirname(torch.__file__)
# Since when `progress` has seen the loop blocked in the same collective: ((which one, the
# id of its innermost frame, this worker's report count), first seen there not computing
# (time.monotonic()), the loop thread's CPU time and the time at the last ask); the frame,
# first seen, is marked (`_blocked_in`), so a new call at the same address is not it.
_blocked: tuple[tuple[str, int, int], float, float | None, float] | None = None
# When `progress` last found the loop in torch.compile's compiler (time.monotonic()), or None.
_compiled_at: float | None = None


class ReportRefused(BaseException):
    """launch.report's own refusal of its arguments (a tensor metric, a metrics dict that is
    no dict, ...): the same at that report on every try, so the loop ends there on every
    rank, not restarted (yielding's per_worker). `told`: this rank heard it from another
    rank's refusal, in the agreement gather (it announces nothing of its own). A
    BaseException, as Yielded is: a loop's own `except Exception:` around a step swallowed
    it (it was a TypeError), and the run trained on to its end, that report lost; a rank
    going on to its next step's collective while the others ended would hang there."""

    def __init__(self, message: str, told: bool = False) -> None:
        super().__init__(message)
        self.told = told


class Yielded(BaseException):
    """Raised by `report` on every rank when the job must give its placement back. A
    BaseException, as KeyboardInterrupt is: a loop's own `except Exception:` around a step
    (to log a bad batch and go on) must not swallow a preemption and train on."""

    def __init__(self, reason: str, step: Any) -> None:
        super().__init__(reason)
        self.reason, self.step = reason, step


def report(metrics: dict[str, Any], checkpoint: "ray.train.Checkpoint | None" = None) -> None:
    """ray.train.report(metrics, checkpoint); and when the scheduler has asked this job to
    yield and any rank passes a checkpoint with this report, "yielded" joins that report's
    metrics (on every rank) and Yielded is raised on every rank after it."""
    global _watch, _pending, _reports
    problem = report_arguments_problem(metrics, checkpoint)
    if problem:
        raise ReportRefused(f"launch.report: {problem}")
    _export(metrics)
    pending = None
    if ray.train.get_context().get_world_rank() == 0:
        _watch = _watch or DirectiveWatch()
        _pending = _pending or _watch.poll()  # asked without waiting; kept until acted on
        pending = _pending
    # Before the report, on every rank alike: rank 0's directive, and whether any rank
    # passes a checkpoint with this report (Ray Train keeps one, whichever rank's: a loop
    # whose checkpoints came from rank 1 alone never yielded, and nothing said why).
    _reports += 1
    _mark(WAITING, metrics.get("step"))
    pending, checkpointed = _agreed(pending, checkpoint is not None, metrics.get("step"))
    decision = pending if checkpointed else None
    if decision:
        # In the checkpoint's own report (rank 0's metrics are the ones Ray Train keeps).
        metrics = {**metrics, "yielded": decision}
    _mark(REPORTING)
    ray.train.report(metrics, checkpoint=checkpoint)
    _mark(WORKING)
    if checkpointed and _watch is not None:
        _watch.checkpointed()
    if decision:
        raise Yielded(decision, metrics.get("step"))


def _export(metrics: dict[str, Any]) -> None:
    """A report's training series to Prometheus, as a jobs/pretrain.py run's
    (metric_catalogue.TRAIN_REPORT_KEYS: "loss", "step", "tokens_per_s" the job's rate, ...;
    other keys are Ray Train's alone). Never fails the report: a failure is logged once."""
    global _export_failed
    _say_non_numbers(metrics)
    try:
        context = ray.train.get_context()
        device = ray.train.torch.get_device()
        record_training({"world_size": context.get_world_size(), **metrics},
                        context.get_world_rank(),
                        "cpu" if declared_gpu_only(device) else device.type)
    except Exception as e:
        if not _export_failed:
            _export_failed = True
            print(f"warning: launch.report: the training metrics were not exported: "
                  f"{type(e).__name__}: {e}", file=sys.stderr)


def _say_non_numbers(metrics: dict[str, Any]) -> None:
    """Warn, once per key, of a key Prometheus exports whose value is no number
    (`"loss": f"{loss:.3f}"`): Ray Train and metrics.jsonl keep it, as the loop may mean, but
    its series stays empty, and nothing said why."""
    for key in non_number_report_keys(metrics):
        if key not in _non_numbers_said:
            _non_numbers_said.add(key)
            value = metrics[key]
            print(f"warning: launch.report: metrics[{key!r}] is {type(value).__name__} "
                  f"{_short_repr(value)}, not a number: not exported as "
                  f"{TRAIN_REPORT_KEYS[key].exported} (report a float or int: loss.item())",
                  file=sys.stderr)


def report_arguments_problem(metrics: Any, checkpoint: Any) -> str | None:
    """What is wrong with report's arguments, or None. Ray Train checks neither: a float for
    the metrics failed as "TypeError: 'float' object is not iterable", a folder's path for
    the checkpoint as "AttributeError: 'str' object has no attribute 'path'", after the
    restarts; a list of pairs, or names that are not strings, later, in Ray Train's
    controller or the metrics log (JSON). None of them named report."""
    if not isinstance(metrics, dict):
        return (f"metrics must be a dict of metric names to values, got "
                f"{type(metrics).__name__} {_short_repr(metrics)}")
    # Names JSON cannot write (metrics.jsonl's): a number was written as its text, and stays.
    unwritable = [key for key in metrics if not _json_key(key)]
    if unwritable:
        return (f"metric names must be strings, got {_short_repr(unwritable[0])} "
                f"({type(unwritable[0]).__name__})")
    reserved = sorted(RESERVED_METRICS & set(metrics))
    if reserved:  # (a loop's own "yielded" re-queued the job; "already_complete" hid a line)
        return f"metric name(s) {reserved} are the launcher's own; rename them"
    if checkpoint is not None and not isinstance(checkpoint, ray.train.Checkpoint):
        return (f"checkpoint must be a ray.train.Checkpoint "
                f"(ray.train.Checkpoint.from_directory(folder)) or None, got "
                f"{type(checkpoint).__name__} {_short_repr(checkpoint)}")
    try:
        return (metrics_json_problem(metrics) or metrics_tensor_problem(metrics)
                or metrics_key_problem(metrics) or metrics_pickling_problem(metrics))
    except RecursionError:  # (a list in a list ... thousands deep: each check recurses)
        return ("metrics are nested too deeply to be written as JSON (the run's "
                "metrics.jsonl): report numbers and text")


def metrics_json_problem(metrics: dict[str, Any]) -> str | None:
    """Why `metrics` cannot be written to the run's metrics.jsonl (a list or dict holding
    itself, named), or None. It passed the other checks (pickle takes it) and failed in Ray
    Train's controller, writing the line, as a RecursionError."""
    try:
        finite_json(metrics, "metrics")
    except ValueError as e:
        return f"{e} (the run's metrics.jsonl): report numbers and text"
    return None


def metrics_key_problem(metrics: dict[str, Any]) -> str | None:
    """Where a nested dict of `metrics` has a key JSON takes no key of (np.int64, a tuple),
    or None. It failed writing metrics.jsonl in Ray Train's controller, naming no metric
    ("TypeError: keys must be str, int, float, bool or None"). After metrics_json_problem:
    no container holds itself."""
    found = _unwritable_key(metrics, "metrics")
    if found is None:
        return None
    where, key = found
    return (f"{where} key {_short_repr(key)} ({type(key).__name__}) cannot be written as "
            "JSON (the run's metrics.jsonl): key nested metrics by strings or numbers")


def _json_key(key: Any) -> bool:
    """Whether json.dumps takes `key` as a dict's key (numpy's int64 is no int to it)."""
    return key is None or isinstance(key, (str, int, float, bool))


def _unwritable_key(value: Any, where: str) -> tuple[str, Any] | None:
    """(path of the dict, key) of the first dict key in `value` that JSON cannot write,
    through dicts, lists and tuples; None where there is none. Paths are made only for the
    containers looked into (it runs at every report: a 100k-float list is no 100k strings)."""
    if isinstance(value, dict):
        key = next((key for key in value if not _json_key(key)), _NO_KEY)
        if key is not _NO_KEY:
            return where, key
        entries = value.items()
    elif isinstance(value, (list, tuple)):
        entries = enumerate(value)
    else:
        return None
    for key, item in entries:
        if isinstance(item, (dict, list, tuple)):
            found = _unwritable_key(item, f"{where}[{key!r}]")
            if found is not None:
                return found
    return None


_NO_KEY = object()  # (None is a key JSON writes, as null)


def metrics_tensor_problem(metrics: dict[str, Any]) -> str | None:
    """Where `metrics` hold a torch tensor or module (metrics['loss'] for `{"loss": loss}`),
    or None. Ray Train refuses them in its report (a ValueError naming no metric), and the
    loop was restarted max_failures times over for the same mistake."""
    found = _torch_entry(metrics, "metrics", set())
    if found is None:
        return None
    where, value = found
    kind = "tensor" if isinstance(value, torch.Tensor) else "module"
    return (f"{where} is a torch {kind} ({_short_repr(value)}), which Ray Train does not "
            "take as a metric: report its number (loss.item()), and save tensors in the "
            "checkpoint")


def _torch_entry(value: Any, where: str, seen: set[int]) -> tuple[str, Any] | None:
    """(path, value) of the first torch tensor or module in `value`, through dicts (their
    keys too), lists and tuples (where Ray Train looks), each looked into once (a list
    holding itself); None where there is none."""
    if isinstance(value, (torch.Tensor, torch.nn.Module)):
        return where, value
    if id(value) in seen:
        return None
    seen.add(id(value))
    return next((found for path, item in _entries(value, where, keys=True)
                 if (found := _torch_entry(item, path, seen)) is not None), None)


def _entries(value: Any, where: str, keys: bool = False) -> list[tuple[str, Any]]:
    """(path, entry) of each entry of a dict, list or tuple (`where[key]`, `where[index]`;
    with `keys`, a dict's keys too, `where key K`); [] for anything else."""
    if isinstance(value, dict):
        return [pair for key, item in value.items()
                for pair in (((f"{where} key {_short_repr(key)}", key),) if keys else ())
                + ((f"{where}[{key!r}]", item),)]
    if isinstance(value, (list, tuple)):
        return [(f"{where}[{index}]", item) for index, item in enumerate(value)]
    return []


def metrics_pickling_problem(metrics: dict[str, Any]) -> str | None:
    """Why `metrics` cannot be sent to Ray Train's controller, naming the entry at fault
    (metrics['guard']); None when they can. Ray Train failed it in its controller's health
    check: a 27-line WorkerHealthCheckFailedError naming neither the metric nor the loop's
    line, after the restarts."""
    if _pickling_error(metrics) is None:
        return None
    where, error = _unpicklable_entry(metrics, "metrics", set())
    return (f"{where} cannot be sent to Ray Train's controller ({type(error).__name__}: "
            f"{error}): report numbers and text (loss.item()), and save objects in the "
            "checkpoint")


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _rank_zero_result(value: Any) -> Any:
    """What a worker hands Ray Train back: rank 0's return value (the result's
    `return_value`; it was dropped), when it can travel. Ray Train sends every worker's at
    each status check, and one that cannot be pickled failed the finished run as a failed
    health check: the other ranks' are left out, and rank 0's is replaced by None, said."""
    if value is None or _world_rank() != 0:
        return None
    try:
        ray.cloudpickle.dumps(value)
    except Exception as e:
        sys.stderr.write(f"warning: the loop's return value ({type(value).__name__}) cannot "
                         f"be sent back ({type(e).__name__}: {e}); the result's return_value "
                         "is None\n")
        return None
    return value


def _world_rank() -> int:
    try:
        return ray.train.get_context().get_world_rank()
    except Exception:  # (outside Ray Train: a test calling the wrapper)
        return 0


def _agreed(pending: str | None, has_checkpoint: bool,
            step: Any = None) -> tuple[str | None, bool]:
    """(rank 0's `pending` directive, whether any rank's `has_checkpoint`), the same on every
    rank (one small collective when a process group is up). RuntimeError, naming them, when
    other ranks had already returned from the loop (their `_announce_return`)."""
    every = _gathered((pending, has_checkpoint))
    if every is None:
        return pending, has_checkpoint
    refused = next((entry[1] for entry in every if entry[0] == _REFUSED), None)
    if refused is not None:
        raise ReportRefused(refused, told=True)
    returned = {rank: entry[1] for rank, entry in enumerate(every) if entry[0] == _RETURNED}
    if returned:
        counts = sorted(set(returned.values()))
        raise RuntimeError(
            f"launch.report{'' if step is None else f' at step {step}'} (this rank's report "
            f"{_reports}): worker rank(s) {', '.join(map(str, sorted(returned)))} had already "
            f"returned from the training loop, after {' or '.join(map(str, counts))} "
            "report(s): every rank must call launch.report the same number of times (as Ray "
            "Train requires); call it on every rank, rank 0's metrics are the ones kept")
    return every[0][0], any(entry[1] for entry in every)


def _mark(state: str, step: Any = ...) -> None:
    """This worker is now in `state` (the step: of the report it is in or came from)."""
    global _where
    if step is ...:
        step = _where[3] if _where else None
    elif step is not None and not isinstance(step, (int, float, str)):
        step = str(step)[:40]  # (a numpy number, a tensor: it travels to the driver as text)
    _where = (state, time.monotonic(), _reports, step)


def progress(where_after_s: float = float("inf")) -> dict[str, Any] | None:
    """Where this worker's loop is (orchestrator.stuck_ranks reads it): run in the worker's
    actor, beside the loop's thread, by the driver's watch (ray_layer/train_callbacks.py).
    A loop in its own code for `where_after_s` or more also says where in its own files it is
    now. A loop in its own code that is blocked in a collective (orchestrator.stuck_ranks.
    collective_call) says which and since when this watch has seen it waiting there (sampled:
    from the first of its calls that found it there, or the last that found its thread
    computing there). None before a launched loop started in this
    process."""
    snapshot = _where
    if snapshot is None:
        return None
    state, since, reports, step = snapshot
    now = time.monotonic()
    for_s = now - since
    frame = sys._current_frames().get(_loop_thread) \
        if state == WORKING and _loop_thread is not None else None
    stack = _stack(frame)
    collective, collective_s, busy = _blocked_in(frame, stack, reports, now)
    # torch.compile's compile (minutes, on a first step) is progress: the loop's own work
    # counts from the last ask that found it compiling.
    global _compiled_at
    in_compiler = compiling(stack, _TORCH_DIR)
    if in_compiler:
        _compiled_at = now
    own_s = for_s if _compiled_at is None else min(for_s, now - _compiled_at)
    where = None
    if frame is not None and for_s >= where_after_s:
        where = _own_frame(traceback.extract_stack(frame))
    return {"state": state, "for_s": for_s, "reports": reports, "step": step, "where": where,
            "collective": collective, "collective_s": collective_s, "computing": busy,
            "compiling": in_compiler, "own_s": own_s}


def _stack(frame) -> list[tuple[str, str]]:
    """(file, function) of `frame` and its callers, outermost first ([] for None)."""
    stack = []
    while frame is not None:
        stack.append((frame.f_code.co_filename, frame.f_code.co_name))
        frame = frame.f_back
    return stack[::-1]


def _blocked_in(frame, stack: list[tuple[str, str]], reports: int,
                now: float) -> tuple[str | None, float | None, bool]:
    """(the collective the loop's innermost `frame` (`stack`: _stack(frame)) is blocked in,
    seconds seen there, whether its thread computed there since the last ask), or
    (None, None, False). The same call (its frame, marked when first seen) at the same report as the
    last time counts on, from the last ask that found the loop's thread computing there (a
    backward's own work, which reads as DDP's wait by its frame)."""
    global _blocked
    collective = collective_call(stack, _TORCH_DIR)
    if collective is None:
        _blocked = None
        return None, None, False
    key = (collective, id(frame), reports)
    # The same call, not only the same address: a frame object is freed when its call returns
    # and the next call's (the next step's backward) often takes its place, so a rank seen in
    # backward at each ask, step after step between two reports, read as blocked since the
    # first. The frame seen first is marked (f_trace_lines, read only by a tracer, for that
    # frame of torch's alone): a new call's is not. (Holding the frame itself would keep its
    # tensors, an all-gather's output, after the call returned.)
    cpu, busy = _loop_cpu_s(), False
    if _blocked is None or _blocked[0] != key or frame.f_trace_lines:
        frame.f_trace_lines = False
        _blocked = (key, now, cpu, now)
    else:
        _, since, last_cpu, asked_at = _blocked
        busy = computing(None if cpu is None or last_cpu is None else cpu - last_cpu,
                         now - asked_at)
        _blocked = (key, now if busy else since, cpu, now)
    return collective, now - _blocked[1], busy


def _loop_cpu_s() -> float | None:
    """The CPU time the loop's thread has used, or None where it cannot be read."""
    try:
        return None if _loop_clock is None else time.clock_gettime(_loop_clock)
    except OSError:  # (the thread ended)
        return None


def _gathered(mine: tuple) -> list | None:
    """Every rank's `mine` (all_gather_object), or None without a process group of 2+."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


def _announce_return(said: tuple = ()) -> str | None:
    """Said by a worker whose loop returned, into the gather of ranks still in a report (so
    they fail at once, naming this rank) or of the others returning too (the normal end);
    `said`: (_REFUSED, its line) for a loop ended by a refused report. Another rank's
    refused report's line, heard there, or None. Its loop has finished: a gather that fails
    (another rank's work after its last report outlasting the process group's timeout, a
    rank gone) costs the announcement, never the run (a warning)."""
    try:
        every = _gathered(said or (_RETURNED, _reports)) or []
    except Exception as e:  # noqa: BLE001 (any backend's error: DistBackendError, timeouts)
        print(f"warning: launch: this worker's loop returned, but telling the other ranks "
              f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
              "its result stands", file=sys.stderr)
        return None
    return next((entry[1] for entry in every if entry[0] == _REFUSED), None)


def _refused(error: ReportRefused) -> dict[str, str] | None:
    """End this worker's loop at a refused report, told to the other ranks (unless heard from
    one): rank 0 returns {REPORT_REFUSED: the line}, "worker rank N: TypeError: ... (where
    in the loop)", for the driver's error line; the others None."""
    _mark(RETURNED)
    line = str(error)
    if not error.told:
        where = getattr(error, RAISED_AT, None)
        line = (f"worker rank {_world_rank()}: TypeError: {error}"  # (a bad argument's)
                + (f" ({where})" if isinstance(where, str) else ""))
        line = _announce_return((_REFUSED, line)) or line
    return {REPORT_REFUSED: line} if _world_rank() == 0 else None


def yielding(train_loop: Callable, import_path: tuple[str, ...] = ()) -> Callable[[dict], Any]:
    """The function Ray Train runs on each worker: the user's loop (called with the config,
    or with nothing when it takes no argument), a Yielded ending it normally (its report,
    with the checkpoint and "yielded", is already in). `import_path`: folders put first on
    the worker's import path where they exist there (the script's own, so a helper the loop
    imports only when it runs is found on this node or on shared storage)."""
    takes_config = accepts_config(train_loop)

    def per_worker(config: dict) -> Any:
        _loop_starts()
        quiet_ray_train_reports()  # (as pretrain's workers: the loop's output, not Ray's dump)
        for folder in reversed(import_path):
            if os.path.isdir(folder) and folder not in sys.path:
                sys.path.insert(0, folder)
        try:
            value = train_loop(config) if takes_config else train_loop()
        except Yielded:
            return None
        except ReportRefused as e:  # (the same on every try: no restart, see _refused)
            _mark_where_raised(e)
            return _refused(e)
        except BaseException as e:  # (a SystemExit too: sys.exit("diverged") in the loop)
            if not _exit_ok(e):
                _mark_where_raised(e)
                stand_in = _stand_in_if_unsendable(e)
                if stand_in is None:
                    raise  # as it is, its cause and context with it
                raise stand_in from None
            value = None  # sys.exit(0): the loop's end, as a script's (it failed the job)
        _mark(RETURNED)
        refused = _announce_return()
        if refused is not None and _world_rank() == 0:  # (another rank's last report)
            return {REPORT_REFUSED: refused}
        return _rank_zero_result(value)

    # The loop's name in Ray's logs, but not its signature: Ray Train counts the parameters
    # through __wrapped__, and would call a loop taking none (or an optional config) without
    # the config per_worker needs.
    functools.update_wrapper(per_worker, train_loop, updated=())  # (no __dict__: no
    del per_worker.__wrapped__                                     # __signature__ either)
    return per_worker


def _exit_ok(error: BaseException) -> bool:
    """Whether `error` is a successful exit: sys.exit(), sys.exit(0), as Python takes them.
    Ray Train counted it as the worker's failure, restarted the loop and ended exit 4. A code
    that is no int is a failure, even one equal to 0 (0.0, numpy's 0): Python prints it and
    exits 1."""
    return isinstance(error, SystemExit) and (
        error.code is None or (isinstance(error.code, int) and error.code == 0))


def _loop_starts() -> None:
    """A launched loop starts in this thread: no report yet, in its own code. Set here, not
    in per_worker: Ray Train sends per_worker by value, with a copy of the module's globals
    it names, and a `global` assignment there changed only that copy."""
    global _reports, _where, _loop_thread, _blocked, _loop_clock, _compiled_at
    _reports, _where, _loop_thread, _blocked = 0, None, threading.get_ident(), None
    _compiled_at = None
    try:
        _loop_clock = time.pthread_getcpuclockid(_loop_thread)
    except (AttributeError, OSError):  # (macOS, Windows: the wait counts from first seen)
        _loop_clock = None
    _mark(WORKING)


def _library_folders() -> tuple[str, ...]:
    return library_folders()  # (here: a test adds a folder of its own)


def _mark_where_raised(error: BaseException) -> None:
    """Note on `error` (attribute RAISED_AT, which travels with it to the driver) the
    innermost frame of the user's own code it came through: the driver's error line held only
    the exception's type and message (a bare `assert` read "AssertionError: ", nothing else),
    the traceback being in a worker's log."""
    where = _own_frame(traceback.extract_tb(error.__traceback__)[1:])  # (the first:
    if where is None:                                                    # per_worker's)
        return
    try:
        setattr(error, RAISED_AT, where)
    except Exception:  # (an exception type that takes no attributes: said without it)
        pass


def _own_frame(frames: traceback.StackSummary) -> str | None:
    """The innermost of `frames` in the user's own files (entrypoints.own_frame)."""
    return own_frame(frames, _library_folders())


def _stand_in_if_unsendable(error: BaseException) -> Exception | None:
    """None when the loop's exception reaches the driver as it is (it pickles and unpickles:
    `class BadBatch(Exception): __init__(self, step, reason)` pickles, then fails to
    rebuild). Else a RuntimeError carrying its type, message and traceback, so the job's
    error line names it and not Ray's failed health check."""
    try:
        ray.cloudpickle.loads(ray.cloudpickle.dumps(error))
        return None
    except Exception as why:
        trace = "".join(traceback.format_exception(error)).rstrip()
        stand_in = RuntimeError(f"{type(error).__qualname__}: {error} (the exception itself "
                                f"cannot be sent to the driver: {type(why).__name__}: {why})"
                                f"\n{trace}")
        if hasattr(error, RAISED_AT):
            setattr(stand_in, RAISED_AT, getattr(error, RAISED_AT))
        return stand_in


def pickling_problem(train_loop: Callable, per_worker: Callable) -> str | None:
    """Why `per_worker` (yielding(train_loop)) cannot be sent to the workers, naming what in
    the loop's reach does not pickle; None when it can. Checked before the job is placed: Ray
    fails it only after placement, as a training failure."""
    try:
        ray.cloudpickle.dumps(per_worker)
        return None
    except Exception as e:
        from ray.util import inspect_serializability

        name = getattr(train_loop, "__qualname__", repr(train_loop))
        _, failures = inspect_serializability(train_loop, name=name, print_file=io.StringIO())
        culprits = sorted({" -> ".join(str(p) for p in f.path) + f" ({type(f.obj).__name__})"
                           for f in failures or ()})
        return (f"the training loop {name} cannot be sent to the workers: {type(e).__name__}: "
                f"{e}" + (f"; it reaches {', '.join(culprits)}" if culprits else "")
                + ". Create such objects inside the loop, where each worker makes its own")


def config_pickling_problem(config: dict[str, Any]) -> str | None:
    """Why `config` cannot be sent to the workers, naming the entry at fault
    (config['lock'], config['data'][2]); None when it can. Ray Train pickles it only inside
    fit(), once the job was placed: it failed there as "training failed after 3 restart(s):
    TypeError: Could not serialize the put value ..." (exit 4), no restart spent on it."""
    if _pickling_error(config) is None:
        return None
    where, error = _unpicklable_entry(config, "config", set())
    return (f"{where} cannot be sent to the workers ({type(error).__name__}: {error}): put "
            "what a worker can rebuild it from in the config (a path, a number, a string) and "
            "create it inside the loop")


class _RayHandlesLeftToRay(ray.cloudpickle.CloudPickler):
    """cloudpickle, leaving Ray's own references (an ObjectRef, an actor handle) out: Ray
    sends those itself, and pickling one here, outside a task, would pin its object for
    the life of this process."""

    def persistent_id(self, obj: Any) -> Any:
        return id(obj) if isinstance(obj, (ray.ObjectRef, ray.actor.ActorHandle)) else None


def _pickling_error(value: Any) -> Exception | None:
    try:
        _RayHandlesLeftToRay(io.BytesIO()).dump(value)
        return None
    except Exception as e:
        return e


def _unpicklable_entry(value: Any, where: str, seen: set[int]) -> tuple[str, Exception]:
    """(the innermost entry of `value`, itself unpicklable, that does not pickle, and why),
    through dicts, lists and tuples; `value` itself when none of its entries is to blame."""
    seen.add(id(value))
    for path, item in _entries(value, where):
        if id(item) not in seen and _pickling_error(item) is not None:
            return _unpicklable_entry(item, path, seen)
    return where, _pickling_error(value)


def ship_by_value(module) -> None:
    """Send `module`'s functions to the workers by value: it was loaded from a file path, and
    a worker cannot import it by name."""
    ray.cloudpickle.register_pickle_by_value(module)
