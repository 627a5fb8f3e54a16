"""Whether a rank of a user's own training loop is stuck in its own code.

Every rank of a launched loop (ray_layer/user_loop.py) says where it is: in its own code
(WORKING), in `launch.report`'s agreement of the ranks (WAITING: a collective that needs every
rank), inside Ray Train's report (REPORTING: the launcher's and Ray Train's own time, an upload
included), or back from the loop (RETURNED, telling the others). A rank that neither reports
nor returns held the others in their report (or in their return) until the process group's
timeout, 30 minutes, with no message; and where they had all returned, the run went on
waiting for as long as that rank stayed stuck (Ray Train waits for every worker to end).

`stuck_verdict` reads one snapshot of every rank's progress (a dict per rank: "state", "for_s"
(seconds in that state, on the rank's own clock), "reports" (its launch.report calls so far,
the one it is in included), "step" (the step of that report, if its metrics had one),
"where" (where in its own code a WORKING rank is, if known), "collective" and "collective_s"
(a WORKING rank seen blocked in a collective of the model's or the loop's own, DDP's gradient
all-reduce in `backward`, a torch.distributed call: which one, `collective_call`, and for how
long; None when it is not), "computing" (such a rank's thread computed there since the
watch's last ask: a backward's own work, `computing`), "compiling" (a WORKING rank in
torch.compile's compiler, `compiling`: progressing, never named) and "own_s" (a WORKING
rank's seconds since its last report or since it was last seen compiling)) and says, once
some rank has waited `timeout_s` for the others (in its report, after returning, or blocked in
such a collective) and some rank has been in its own code that long, which ranks are stuck and
the one error line the run fails with (a rank blocked in a collective read WORKING as the stuck
one did: a rank stuck while the others were blocked in DDP's all-reduce went unnoticed until
gloo's 30-minute timeout). A rank named while blocked in a collective, the others in their
report or returned, is said to be in a collective they never join (the loops disagree on the
steps or collectives they run), not in its own code. Ray Train's controller takes that as those
workers' failure (ray_layer/train_callbacks.py): a restart from the latest checkpoint within
`max_failures`, as for a crashed worker, then the job fails naming them.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from orchestrator.validation import is_number

# Far below the process group's 30 minutes, and above a step plus a local checkpoint write of
# the loops this launcher runs (a report's upload of the checkpoint is Ray Train's: REPORTING).
DEFAULT_STUCK_TIMEOUT_S = 300.0
# A loop's thread that used this share of a CPU between two of the watch's asks while in a
# collective was computing there (a backward's own work, in torch's C++ code), not waiting:
# one blocked in a collective (gloo's wait, DDP's all-reduce at the end of backward) uses none.
COMPUTING_CPU_SHARE = 0.05
WORKING, WAITING, REPORTING, RETURNED = "working", "waiting", "reporting", "returned"


def stuck_verdict(progress: Mapping[int, Mapping[str, Any] | None],
                  timeout_s: float) -> tuple[list[int], str] | None:
    """(the stuck ranks, the error line) or None. `progress`: rank -> its snapshot (None: the
    rank did not answer, and is neither named nor waited on)."""
    known = {rank: p for rank, p in progress.items() if p}
    in_report = {rank: p for rank, p in known.items()
                 if p.get("state") in (WAITING, RETURNED) and p.get("for_s", 0) >= timeout_s}
    blocked = {rank: p for rank, p in known.items() if p.get("state") == WORKING
               and p.get("collective") and p.get("collective_s", 0) >= timeout_s}
    # A rank blocked in a collective is itself waiting, unless others wait in their report:
    # a collective they never join (a report skipped on that rank), named as before.
    # A rank compiling its model (torch.compile) is progressing, however long; its own work
    # counts from the last ask that found it compiling ("own_s").
    stuck = sorted(rank for rank, p in known.items()
                   if p.get("state") == WORKING and not p.get("compiling")
                   and _own_s(p) >= timeout_s
                   and (in_report or not p.get("collective")))
    waiting = {rank: p for rank, p in sorted({**in_report, **blocked}.items())
               if rank not in stuck}
    if not waiting or not stuck:
        return None
    # A named rank blocked in a collective is not in its own code: the others, in their
    # report or returned, never join it (the loops disagree on what they run). One computing
    # there at the last ask (a backward's own work) is named for its work, as in its code.
    joined = [rank for rank in stuck if known[rank].get("collective")
              and not known[rank].get("computing")]
    own = [rank for rank in stuck if rank not in joined]
    heads = [f"rank(s) {', '.join(map(str, own))} stuck in the loop's own code"] if own else []
    if joined:
        heads.append(f"rank(s) {', '.join(map(str, joined))} blocked in a collective the "
                     "others never join")
    seen = "; ".join(f"rank {rank} {_since(known[rank])}" for rank in stuck)
    waited = "; ".join(f"rank {rank} {_waited(p)}" for rank, p in sorted(waiting.items()))
    advice = [_advice(waiting.values())] if own else []
    if joined:
        advice.append(_disagree_advice(joined, in_report, any(
            known[rank]["collective"].startswith("backward") for rank in joined)))
    return stuck, (
        f"worker {' and '.join(heads)}: neither called launch.report nor returned for "
        f"{timeout_s:g}s (stuck_timeout_s) while the others waited for them ({seen}; "
        f"{waited}); {'; '.join(advice)}")


def _disagree_advice(joined: list[int], in_report: Mapping[int, Mapping[str, Any]],
                     backward: bool) -> str:
    """What is wrong where ranks wait in a collective while the others are in their report or
    have returned: the loops run different steps or collectives (raising stuck_timeout_s helps
    only a backward that computes that long, beside ranks in their report)."""
    returned = sorted(rank for rank, p in in_report.items() if p.get("state") == RETURNED)
    reporting = sorted(rank for rank in in_report if rank not in returned)
    others = " and ".join(f"{_named(ranks)} {what}" for ranks, what in (
        (returned, "returned"),
        (reporting, "in its report" if len(reporting) == 1 else "in their report")) if ranks)
    return (f"the ranks' loops disagree on the steps or collectives they run ({others} while "
            f"{_named(joined)} {'is' if len(joined) == 1 else 'are'} in a collective): every "
            "rank must run the same number of steps (batches), backward and torch.distributed "
            "calls, and call launch.report the same number of times"
            + ("; raise stuck_timeout_s only if that rank's backward computes that long "
               "without DDP" if reporting and backward else ""))


def _named(ranks: list[int]) -> str:
    return f"rank{'' if len(ranks) == 1 else 's'} {', '.join(map(str, ranks))}"


def _advice(waiting) -> str:
    """What to raise stuck_timeout_s above: the work after the stuck rank's last report where
    every waiting rank has returned, else the work between two reports."""
    if all(p.get("state") == RETURNED for p in waiting):
        return ("raise stuck_timeout_s if one rank's work after its last report (a final "
                "evaluation or save) takes longer while the others have returned")
    where = " or in a collective (DDP's gradient all-reduce in backward, a torch.distributed " \
            "call)" if any(p.get("state") == WORKING for p in waiting) else ""
    return ("raise stuck_timeout_s if one rank's work between two reports (a step, an "
            "evaluation on that rank alone, a checkpoint write of the loop's own) takes longer "
            f"while the others wait in their report{where}")


def _since(p: Mapping[str, Any]) -> str:
    reports = p.get("reports") or 0
    last = (f"last seen in its report {reports}{_step(p)}" if reports
            else "has not reported since the loop started")
    ago = f"{p.get('for_s', 0):.0f}s ago"
    if _own_s(p) < p.get("for_s", 0) - 1:
        ago += f", last seen compiling (torch.compile) {_own_s(p):.0f}s ago"
    where = f", now at {p['where']}" if p.get("where") else ""
    if p.get("collective") and p.get("computing"):
        where = f", now in {p['collective']}, computing{where.replace(', now at', ', at')}"
    elif p.get("collective"):
        where = f", now blocked in {p['collective']}{where.replace(', now', '')}"
    return f"{last}, {ago}{where}"


def _own_s(p: Mapping[str, Any]) -> float:
    """A working rank's seconds in its own code: since its last report (or the loop's
    start), or since it was last seen compiling."""
    return p["own_s"] if p.get("own_s") is not None else p.get("for_s", 0)


def _waited(p: Mapping[str, Any]) -> str:
    if p.get("state") == WORKING:  # (blocked in a collective)
        where = f", at {p['where']}" if p.get("where") else ""
        return f"blocked in {p['collective']} for {p.get('collective_s', 0):.0f}s{where}"
    if p.get("state") == RETURNED:
        return f"returned from the loop {p.get('for_s', 0):.0f}s ago"
    return f"waiting in its report {p.get('reports') or 0}{_step(p)} for {p.get('for_s', 0):.0f}s"


def _step(p: Mapping[str, Any]) -> str:
    return "" if p.get("step") is None else f" (step {p['step']})"


def collective_call(frames: Sequence[tuple[str, str]], torch_dir: str) -> str | None:
    """The collective a loop's thread is blocked in, from its stack (`frames`: (file, function),
    outermost first; `torch_dir`: torch's package folder), or None where it is elsewhere (its
    own code, a computation). Read from the innermost Python frame, torch's code that waits in
    C++: `backward` (DDP all-reduces the gradients there, and its end waits for every rank's),
    torch.distributed's calls (named by the outermost in distributed_c10d.py), and DDP's own
    broadcasts (buffers in its forward, parameters as it is made). A backward that computes
    reads the same: the worker tells them apart by its loop thread's CPU time (`computing`),
    counting a wait from the last time it saw it computing there."""
    if not frames:
        return None
    root = os.path.join(torch_dir, "")
    innermost = frames[-1][0]
    if not innermost.startswith(root):
        return None
    part = innermost[len(root):].replace(os.sep, "/")
    if part in ("autograd/graph.py", "autograd/__init__.py"):
        return "backward (where DDP all-reduces the gradients)"
    if part == "nn/parallel/distributed.py":
        return "DistributedDataParallel's broadcast of its buffers or parameters"
    if part.startswith("distributed/"):
        c10d = os.path.join(root, "distributed", "distributed_c10d.py")
        calls = [name for file, name in frames if file == c10d]
        return f"torch.distributed.{calls[0]}" if calls else \
            f"torch.distributed ({frames[-1][1]})"
    return None


def computing(cpu_s: float | None, wall_s: float) -> bool:
    """Whether a loop's thread that used `cpu_s` of CPU time (None: not known) in `wall_s`
    seconds in a collective was computing there: a backward that computes reads, by its
    innermost frame, as one that waits for the other ranks."""
    return cpu_s is not None and wall_s > 0 and cpu_s >= COMPUTING_CPU_SHARE * wall_s


def compiling(frames: Sequence[tuple[str, str]], torch_dir: str) -> bool:
    """Whether a loop's stack (`frames`: (file, function)) is in torch.compile's compiler:
    dynamo's tracing of a frame or inductor's compile of a graph (a first step's forward,
    its backward's, a recompile), which can take minutes; a compiled model's runs are not
    (compile_fx.py also holds the wrappers a compiled graph runs through: CUDA graphs')."""
    root = os.path.join(torch_dir, "")
    dynamo = os.path.join(root, "_dynamo", "convert_frame.py")
    inductor = os.path.join(root, "_inductor", "compile_fx.py")
    return any(file == dynamo or (file == inductor and name == "compile_fx_inner")
               for file, name in frames)


def stuck_timeout_problem(value: Any) -> str | None:
    """What is wrong with a stuck_timeout_s (a job file's, launch.fit's), or None: a finite
    number > 0 (seconds), or None (no watch)."""
    if value is None or (is_number(value) and value > 0):
        return None
    return f"stuck_timeout_s must be a finite number > 0 (seconds) or null/None (no watch), " \
           f"got {value!r}"
