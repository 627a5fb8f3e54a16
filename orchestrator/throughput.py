"""How fast a workload trains on each accelerator family, learnt from what jobs report.

The scheduler weighs moves between accelerator families (migration, and which family sets a
spread job's pace) by a job's *relative speed* there. A single static table per family
(`config.ACCELERATOR_SPEED`) is wrong for many workloads: a small model barely gains from an
H100, a large one gains more than the table says. `ThroughputTable` keeps one speed per
(workload, family):

- a **workload** is what determines a job's speed: for a live job, `JobSpec.workload`
  (`workload_key`: model preset, sequence length, per-worker batch, precision); in the
  simulator, the Gavel job type;
- the **bootstrap** is Gavel's measurements (`from_gavel`) for its job types and the static
  table (the *prior*) for everything else;
- **observations** (a job of that workload ran at R units/s per worker on family F; any unit)
  are smoothed per (workload, family) and then normalised: their ratios to each other are
  kept, and as a group they are scaled to agree with the bootstrap on (geometric) average.
  So one observed family only anchors the units and changes no ratio; two or more observed
  families replace the bootstrap's ratio between them by the measured one, and units never
  matter (rates x1000 give the same speeds).

Speeds are relative to a reference family (V100 by default: 1.0 there for a bootstrap
measured there). `speed` is a dictionary look-up or two: the scheduler calls it in its loops.
Pure: no Ray, no clock (`now` comes in with each observation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from orchestrator.config import ACCELERATOR_SPEED, MAX_WORKLOAD_CHARS, TrainConfig
from orchestrator.validation import is_int, is_number

# Weight of a new observation in the smoothed rate. Jobs report every `log_every` steps, so
# about the last five reports count: quick to follow a change of hardware or data, slow
# enough that one slow interval (a checkpoint, a noisy neighbour) moves little.
EMA_WEIGHT = 0.2
# Distinct workloads measured at most; beyond it the one updated longest ago is forgotten, so
# the state saved with the scheduler stays small however many job shapes come and go.
MAX_WORKLOADS = 500
MAX_KEY_CHARS = MAX_WORKLOAD_CHARS  # workload and family names
SAVED_VERSION = 1

MEASURED, GAVEL, STATIC = "measured", "gavel", "static"


def workload_key(model: str | int, seq_len: int, batch_per_worker: int, precision: str,
                 variant: str = "") -> str:
    """The key of a GPT training workload: what its speed on an accelerator depends on.

    model: a preset name ("small") or a parameter count (124_000_000 -> "124M").
    variant: anything else that changes the work per token (e.g. "span" for learnable
    attention spans); "" for none. Precision is the one asked for ("auto" included: what it
    resolves to on a family is part of that family's speed)."""
    if is_int(model):
        model = f"{model / 1e6:.0f}M" if model >= 1_000_000 else str(model)
    key = f"gpt-{model}/seq{seq_len}/b{batch_per_worker}/{precision}"
    return f"{key}/{variant}" if variant else key


def pretrain_workload(config: TrainConfig) -> str:
    """The workload key of a run of the built-in training loop (jobs/pretrain.py). Compile
    left at its default follows the family (compiled on CUDA, eager on CPU), like precision
    "auto"; forced either way, it is part of the key (compiled runs 1.09-1.18x faster). The
    vocabulary is (the LM head: a third of GPT-2 small's FLOPs at GPT-2's 50,257 tokens, next
    to nothing at 257 bytes), and FSDP (its gathers), so that their speeds are not averaged."""
    forced = {True: "compiled", False: "eager", None: ""}[config.compile]
    variant = "+".join(v for v in ("span" if config.attention_span else "", forced,
                                   "fsdp" if config.strategy == "fsdp" else "") if v)
    return workload_key(config.model_size, config.seq_len, config.batch_size, config.precision,
                        "/".join(v for v in (f"v{config.vocab_size}", variant) if v))


def per_worker_rate(metrics: Mapping[str, Any]) -> float | None:
    """Tokens/s per worker from a training report ("tokens_per_s" over all workers, and
    "world_size"), or None when the report has no usable figure."""
    rate, workers = metrics.get("tokens_per_s"), metrics.get("world_size", 1)
    if not (is_number(rate) and rate > 0 and is_int(workers) and workers >= 1):
        return None
    return rate / workers


@dataclass
class _Observed:
    """Smoothed rate of one workload on one family, in the reporter's units."""

    rate: float
    samples: int
    updated_at: float


class ThroughputTable:
    """Relative training speed per (workload, accelerator family): Gavel's measurements and
    the static table to start, then what training jobs report (see the module docstring).

    prior: family -> static relative speed (default `config.ACCELERATOR_SPEED`), rescaled so
    that the reference family is 1.0; a family not in it runs at 1.0."""

    def __init__(self, prior: Mapping[str, float] | None = None, reference: str = "V100") -> None:
        prior = dict(ACCELERATOR_SPEED if prior is None else prior)
        bad = {f: s for f, s in prior.items()
               if not (isinstance(f, str) and is_number(s) and s > 0)}
        if bad:
            raise ValueError(f"ThroughputTable prior: speeds must be numbers > 0 per family "
                             f"name, got {bad}")
        if not (isinstance(reference, str) and reference):
            raise ValueError(f"ThroughputTable reference must be a family name, got "
                             f"{reference!r}")
        unit = prior.get(reference, 1.0)
        self.reference = reference
        self.prior = {f: s / unit for f, s in prior.items()}
        self._bootstrap: dict[str, dict[str, float]] = {}  # workload -> family -> speed
        self._observed: dict[str, dict[str, _Observed]] = {}  # workload -> family -> rate
        self._speeds: dict[str, dict[str, float]] = {}  # look-up cache: bootstrap + observed
        self.bootstrapped_from_gavel = False

    @classmethod
    def from_gavel(cls, prior: Mapping[str, float] | None = None,
                   reference: str = "V100") -> "ThroughputTable":
        """Every Gavel job type, on every family the simulator models (cluster_model.GPU_TYPES:
        K80/P100/V100 measured, the others V100 x their speed-up), at its one-GPU
        consolidated throughput relative to the reference family's."""
        from orchestrator.cluster_model import GPU_TYPES, consolidated_throughput, gavel_table

        table = cls(prior, reference)
        ref_type = next((k for k, t in GPU_TYPES.items() if t.family == reference), None)
        if ref_type is None:
            raise ValueError(f"ThroughputTable.from_gavel: reference {reference!r} is not a "
                             f"modelled GPU type ({', '.join(t.family for t in GPU_TYPES.values())})")
        for model in gavel_table():
            ref = consolidated_throughput(model, ref_type, 1)
            table._bootstrap[model] = {t.family: consolidated_throughput(model, key, 1) / ref
                                       for key, t in GPU_TYPES.items()}
            table._speeds[model] = dict(table._bootstrap[model])
        table.bootstrapped_from_gavel = True
        return table

    # -- reading ------------------------------------------------------------------------------
    def speed(self, workload: str, family: str) -> float:
        """Relative speed of `workload` on `family`: learnt or bootstrapped for that pair,
        else the prior's for the family, else 1.0."""
        row = self._speeds.get(workload)
        if row is not None:
            found = row.get(family)
            if found is not None:
                return found
        return self.prior.get(family, 1.0)

    def source(self, workload: str, family: str) -> str:
        """Where speed(workload, family) comes from: measured, gavel or static."""
        if family in self._observed.get(workload, {}):
            return MEASURED
        if family in self._bootstrap.get(workload, {}):
            return GAVEL
        return STATIC

    def rows(self) -> list[dict]:
        """For `status`: measured pairs first (by workload, then fastest first), then Gavel's.
        Families that fall back to the static prior are not listed (the prior is the same
        for every workload): `prior` holds them."""
        measured, gavel = [], []
        for workload in sorted(self._speeds):
            observed = self._observed.get(workload, {})
            for family, speed in sorted(self._speeds[workload].items(), key=lambda x: -x[1]):
                row = {"workload": workload, "family": family, "speed": round(speed, 4),
                       "source": MEASURED if family in observed else GAVEL}
                if family in observed:
                    o = observed[family]
                    row.update(samples=o.samples, rate=round(o.rate, 4),
                               updated_at=o.updated_at)
                    measured.append(row)
                else:
                    gavel.append(row)
        return measured + gavel

    # -- learning -----------------------------------------------------------------------------
    def observe(self, workload: str, family: str, per_worker_rate: float, now: float) -> None:
        """A job of `workload` ran at `per_worker_rate` (any unit, e.g. tokens/s per worker)
        on `family` at time `now`. Ignored: an empty, non-string or over-long workload or
        family (a CPU job's family is ""), a rate that is not a finite number > 0."""
        if not (_usable_key(workload) and _usable_key(family) and is_number(per_worker_rate)
                and per_worker_rate > 0 and is_number(now)):
            return
        row = self._observed.setdefault(workload, {})
        seen = row.get(family)
        if seen is None:
            row[family] = _Observed(float(per_worker_rate), 1, float(now))
        else:
            seen.rate += EMA_WEIGHT * (per_worker_rate - seen.rate)
            seen.samples += 1
            seen.updated_at = float(now)
        self._forget_oldest_beyond(MAX_WORKLOADS)
        self._recompute(workload)

    def _base(self, workload: str, family: str) -> float:
        """The speed before any observation: Gavel's, else the prior's, else 1.0."""
        found = self._bootstrap.get(workload, {}).get(family)
        return found if found is not None else self.prior.get(family, 1.0)

    def _recompute(self, workload: str) -> None:
        """Refresh the look-up cache of one workload. Observed rates are divided by one scale
        per workload: the geometric mean of rate / base over its observed families (the
        geometric mean, so a family measured 2x faster and another 2x slower than the base
        cancel out, and the scale does not depend on the units)."""
        observed = self._observed.get(workload, {})
        speeds = dict(self._bootstrap.get(workload, {}))
        if observed:
            log_scale = sum(math.log(o.rate / self._base(workload, f))
                            for f, o in observed.items()) / len(observed)
            scale = math.exp(log_scale)
            speeds.update({f: o.rate / scale for f, o in observed.items()})
        if speeds:
            self._speeds[workload] = speeds
        else:
            self._speeds.pop(workload, None)

    def _forget_oldest_beyond(self, limit: int) -> None:
        while len(self._observed) > limit:
            oldest = min(self._observed,
                         key=lambda w: max(o.updated_at for o in self._observed[w].values()))
            del self._observed[oldest]
            self._recompute(oldest)

    # -- persistence --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """What is learnt (raw smoothed rates; speeds are derived again on restore), plus how
        the table was bootstrapped. Plain JSON types."""
        return {"version": SAVED_VERSION, "reference": self.reference,
                "gavel": self.bootstrapped_from_gavel,
                "observed": [{"workload": w, "family": f, "rate": o.rate, "samples": o.samples,
                              "updated_at": o.updated_at}
                             for w, row in sorted(self._observed.items())
                             for f, o in sorted(row.items())]}

    @classmethod
    def from_dict(cls, data: Any, prior: Mapping[str, float] | None = None
                  ) -> tuple["ThroughputTable", list[str]]:
        """A table from `to_dict`'s output, tolerantly: what cannot be read (a corrupt entry,
        a wrong type) is skipped and named in the returned problems; the rest is kept."""
        problems: list[str] = []
        if not isinstance(data, Mapping):
            return cls(prior), [f"throughput table: expected a mapping, got "
                                f"{type(data).__name__}; starting from the bootstrap"]
        reference = data.get("reference", "V100")
        if not (isinstance(reference, str) and reference):
            problems.append(f"throughput table: reference must be a family name, got "
                            f"{reference!r}; using V100")
            reference = "V100"
        try:
            table = cls.from_gavel(prior, reference) if data.get("gavel") is True \
                else cls(prior, reference)
        except ValueError as e:
            problems.append(f"throughput table: {e}; using V100 as the reference")
            table = cls.from_gavel(prior) if data.get("gavel") is True else cls(prior)
        entries = data.get("observed", [])
        if not isinstance(entries, list):
            problems.append(f"throughput table: observed must be a list, got "
                            f"{type(entries).__name__}; nothing measured restored")
            entries = []
        for i, entry in enumerate(entries):
            problem = _entry_problem(entry)
            if problem:
                problems.append(f"throughput table: observed[{i}] skipped: {problem}")
                continue
            table._observed.setdefault(entry["workload"], {})[entry["family"]] = _Observed(
                float(entry["rate"]), entry["samples"], float(entry["updated_at"]))
        table._forget_oldest_beyond(MAX_WORKLOADS)
        for workload in list(table._observed):
            table._recompute(workload)
        return table, problems


def _usable_key(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_KEY_CHARS


def _entry_problem(entry: Any) -> str:
    """Why a saved observation cannot be restored, naming the field; "" when it can."""
    if not isinstance(entry, Mapping):
        return f"expected a mapping, got {type(entry).__name__}"
    where = f"(workload {entry.get('workload')!r}, family {entry.get('family')!r})"
    for name in ("workload", "family"):
        value = entry.get(name)
        if not _usable_key(value):
            return f"{name} must be a non-empty string of <= {MAX_KEY_CHARS} characters, " \
                   f"got {value!r}"
    rate = entry.get("rate")
    if not (is_number(rate) and rate > 0):
        return f"{where} rate must be a finite number > 0, got {rate!r}"
    samples = entry.get("samples")
    if not (is_int(samples) and samples >= 1):
        return f"{where} samples must be an integer >= 1, got {samples!r}"
    if not is_number(entry.get("updated_at")):
        return f"{where} updated_at must be a finite number, got {entry.get('updated_at')!r}"
    return ""
