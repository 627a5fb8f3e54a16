"""The modelled cluster of the simulator, and how fast a job runs where it is placed.

Cluster SPEC (`--cluster`):

    TYPE:GPUSxSERVERS[,TYPE:GPUSxSERVERS...][;rack=N][;rack_gbps=G][;inter_gbps=G]

    "v100:8x40,p100:8x40,k80:4x40;rack=16"
        40 servers of 8 V100, 40 of 8 P100, 40 of 4 K80; racks of 16 servers (a rack holds one
        server type; the last rack of a type may be smaller).

    "v100:8x24,v100:4x48,a100:8x12;rack=16"
        One type may appear in several groups with different GPUs per server: 24 servers of
        8 V100 and 48 of 4 V100 (384 V100 in all), and 12 of 8 A100. A rack holds servers of
        one group only (here 16+8 and 16+16+16 V100 servers, 12 A100). Servers are named
        TYPE-NNNN, numbered per type across its groups in SPEC order (v100-0000..v100-0023 have
        8 GPUs, v100-0024..v100-0071 have 4).

TYPE is one of GPU_TYPES (k80, p100, v100, t4, l4, a100, h100; case-insensitive). Each rack is a
network group (labels orchestrator.io/network-group and -network-gbps) with `rack_gbps` GB/s
between its servers (default 12.5 = 100 Gb/s); servers in different racks talk at `inter_gbps`
(default 1.25 = 10 Gb/s, ClusterState.inter_group_gbps); each at least MIN_GBPS (0.001 GB/s,
1 MB/s). GPUs of one server talk over
NVLink/PCIe: no network. Servers get CPUS_PER_GPU Ray CPUs per GPU, so CPUs never bind.

Speed model (per job, per placement):
- Model type: the trace's model_type, else by GPU-hours on the reference GPU, as the Pollux and
  Sia simulators do (MODEL_BY_GPU_HOURS: < 1 GPU-h ResNet-18, < 10 LM, < 100 Transformer,
  else ResNet-50, each with a fixed batch size).
- Throughput (iterations/s) per GPU type and GPU count from Gavel's measurements (K80, P100,
  V100; `consolidated` = one server, `unconsolidated` = spread). Counts between the measured
  1/2/4/8 are interpolated linearly; above the largest measured count, per-GPU throughput is
  held at that count's. Missing or zero entries are filled from V100's column with the same
  ratio. A100/H100/T4/L4 compute config.ACCELERATOR_SPEED times faster than a V100 but
  communicate no faster (same per-iteration communication time as V100), so their locality
  penalty is larger.
- Communication: per iteration, a spread job spends `comm = 1/unconsolidated - 1/consolidated`
  seconds (>= 0) on the network at Gavel's setting, taken as REFERENCE_NETWORK_GBPS (25 GbE,
  3.125 GB/s). At a bottleneck bandwidth B between the job's servers the iteration takes
      t(B) = 1/consolidated + comm * REFERENCE_NETWORK_GBPS / B
  (one server: B = inf, t = 1/consolidated). A job spanning GPU types runs at the pace of its
  slowest type (synchronous data parallel).
- Runtime: the trace duration is the run time on REFERENCE_GPU (P100: Philly's GPUs were
  Pascal P100/P40) with all GPUs on one server, so
      runtime = duration * throughput(REFERENCE_GPU, consolidated) / achieved throughput.
- Ideal speed (for goodput): consolidated throughput on the fastest GPU type in the cluster.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from orchestrator.config import ACCELERATOR_SPEED
from orchestrator.inventory import (GIB, LABEL_NETWORK_GBPS, LABEL_NETWORK_GROUP, ClusterState,
                                    GpuInfo, NodeReport)
from orchestrator.validation import parse_number

# Gavel's measured throughputs (Narayanan et al., OSDI 2020), per job type and accelerator.
GAVEL_CSV = Path(__file__).resolve().parents[1] / "data" / "gavel_throughputs.csv"


class ClusterSpecError(ValueError):
    """A --cluster SPEC is malformed; the message names the part at fault."""


@dataclass(frozen=True)
class GpuType:
    """A GPU type the simulator can model: its family, name and memory, and where its speed
    comes from (a Gavel column, or a factor over the V100)."""

    family: str  # accelerator family as placement knows it
    gpu_name: str  # what a GpuInfo would report (accelerator_family() maps it back)
    memory_gib: float
    gavel_column: str  # "k80" / "p100" / "v100": measured; "" = derived from V100
    speed_vs_v100: float = 1.0  # compute speed-up over a V100, for derived types


# Derived speed factors for types Gavel did not measure: config.ACCELERATOR_SPEED, the same
# table the live placement prefers faster hardware by.
GPU_TYPES: dict[str, GpuType] = {
    "k80": GpuType("K80", "Tesla K80", 12.0, "k80"),
    "p100": GpuType("P100", "Tesla P100-PCIE-16GB", 16.0, "p100"),
    "v100": GpuType("V100", "Tesla V100-SXM2-32GB", 32.0, "v100"),
    "t4": GpuType("T4", "Tesla T4", 16.0, "", ACCELERATOR_SPEED["T4"]),
    "l4": GpuType("L4", "NVIDIA L4", 24.0, "", ACCELERATOR_SPEED["L4"]),
    "a100": GpuType("A100", "NVIDIA A100-SXM4-80GB", 80.0, "", ACCELERATOR_SPEED["A100"]),
    "h100": GpuType("H100", "NVIDIA H100 80GB HBM3", 80.0, "", ACCELERATOR_SPEED["H100"]),
}
FAMILY_TO_TYPE = {t.family: key for key, t in GPU_TYPES.items()}
CPUS_PER_GPU = 8
REFERENCE_GPU = "p100"
REFERENCE_NETWORK_GBPS = 3.125  # the network Gavel's unconsolidated figures were measured on
MODEL_BY_GPU_HOURS = (
    (1.0, "ResNet-18 (batch size 64)"),  # small CNN / NCF
    (10.0, "LM (batch size 20)"),  # speech / BERT stand-in
    (100.0, "Transformer (batch size 64)"),  # detection-scale stand-in
    (math.inf, "ResNet-50 (batch size 64)"),  # ImageNet-scale
)
DEFAULT_RACK = 16
DEFAULT_RACK_GBPS = 12.5
DEFAULT_INTER_GBPS = 1.25
# The slowest rack_gbps / inter_gbps a SPEC may give: 1 MB/s (8 Mb/s), below any data-centre
# network. At 1e-300 a spread job's modelled run took 1e300 s (300-digit JCTs); at 1e-320 its
# speed underflowed to 0 (ZeroDivisionError in the replay).
MIN_GBPS = 0.001


# -- Gavel's throughput table ---------------------------------------------------------------------

def _read_gavel(path: Path) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """{job_type: {"counts": array, "<gpu>_consolidated": array, ...}} with gaps filled."""
    raw: dict[str, dict[int, dict[str, float]]] = {}
    with Path(path).open(newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            try:
                n = int(row["num_gpus"])
                raw.setdefault(row["job_type"], {})[n] = {
                    k: (float(v) if v not in ("", None) else 0.0)
                    for k, v in row.items() if k not in ("job_type", "num_gpus")}
            except (KeyError, ValueError) as e:
                raise ValueError(f"{path}:{line}: malformed throughput row: {e}") from None
    table = {}
    for job_type, by_n in raw.items():
        counts = np.array(sorted(by_n))
        cols = {"counts": counts}
        for gpu in ("k80", "p100", "v100"):
            for kind in ("consolidated", "unconsolidated"):
                cols[f"{gpu}_{kind}"] = np.array([by_n[n][f"{gpu}_{kind}"] for n in counts])
        v_c, v_u = cols["v100_consolidated"], cols["v100_unconsolidated"]
        v_u = np.where(v_u > 0, v_u, v_c)
        cols["v100_unconsolidated"] = v_u
        for gpu in ("k80", "p100"):
            c, u = cols[f"{gpu}_consolidated"], cols[f"{gpu}_unconsolidated"]
            c = np.where(c > 0, c, v_c * (c[0] / v_c[0]))  # same ratio to V100 as at 1 GPU
            u = np.where(u > 0, u, c * (v_u / v_c))  # same locality penalty as V100
            cols[f"{gpu}_consolidated"], cols[f"{gpu}_unconsolidated"] = c, u
        table[job_type] = cols
    return table


@lru_cache(maxsize=1)
def gavel_table() -> dict:
    return _read_gavel(GAVEL_CSV)


class _JobTypes:
    """Lazy view of the Gavel job types (the table is read on first use)."""

    def __contains__(self, name: str) -> bool:
        return name in gavel_table()

    def __iter__(self):
        return iter(gavel_table())


GAVEL_JOB_TYPES = _JobTypes()


def model_for(duration_s: float, num_gpus: int, model_type: str = "") -> str:
    if model_type:
        return model_type
    gpu_hours = duration_s * num_gpus / 3600.0
    return next(name for limit, name in MODEL_BY_GPU_HOURS if gpu_hours < limit)


def _at(counts: np.ndarray, values: np.ndarray, n: int) -> float:
    top = int(counts[-1])
    if n > top:  # per-GPU throughput held at the largest measured count
        return float(values[-1]) * n / top
    if len(counts) == 1:
        return float(values[0]) * n
    return float(np.interp(n, counts, values))


@lru_cache(maxsize=4096)
def iteration_times(model: str, gpu_type: str, n: int) -> tuple[float, float]:
    """(seconds per iteration on one server, extra seconds per iteration when spread at
    REFERENCE_NETWORK_GBPS) for `n` GPUs of `gpu_type` training `model`."""
    cols = gavel_table()[model]
    t = GPU_TYPES[gpu_type]
    column = t.gavel_column or "v100"
    cons = _at(cols["counts"], cols[f"{column}_consolidated"], n)
    uncons = _at(cols["counts"], cols[f"{column}_unconsolidated"], n)
    comm = max(0.0, 1.0 / uncons - 1.0 / cons)
    if not t.gavel_column:  # derived type: faster compute, same communication
        cons *= t.speed_vs_v100
    return 1.0 / cons, comm


def throughput(model: str, gpu_types: tuple[str, ...], n: int, bottleneck_gbps: float) -> float:
    """Iterations/s of `model` on `n` GPUs spread over `gpu_types` with that bottleneck."""
    worst = 0.0
    for gpu_type in gpu_types:
        compute, comm = iteration_times(model, gpu_type, n)
        step = compute if math.isinf(bottleneck_gbps) else \
            compute + comm * REFERENCE_NETWORK_GBPS / bottleneck_gbps
        worst = max(worst, step)
    return 1.0 / worst


def consolidated_throughput(model: str, gpu_type: str, n: int) -> float:
    return 1.0 / iteration_times(model, gpu_type, n)[0]


def speed_over_reference(model: str, gpu_type: str, n: int) -> float:
    """How many times faster `n` GPUs of `gpu_type` on one server train `model` than `n`
    REFERENCE_GPUs: a trace duration (on the reference GPU) over it is the run time there."""
    return consolidated_throughput(model, gpu_type, n) / consolidated_throughput(
        model, REFERENCE_GPU, n)


# -- the cluster ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerGroup:
    """One part of a --cluster SPEC: `servers` servers of one GPU type with `gpus_per_server`
    GPUs each."""

    gpu_type: str  # key of GPU_TYPES
    gpus_per_server: int
    servers: int


@dataclass(frozen=True)
class ClusterSpec:
    """A parsed --cluster SPEC: the server groups plus the rack size and the bandwidths inside
    and between racks, from which the simulator builds its modelled cluster."""

    groups: tuple[ServerGroup, ...]
    rack: int = DEFAULT_RACK
    rack_gbps: float = DEFAULT_RACK_GBPS
    inter_gbps: float = DEFAULT_INTER_GBPS
    text: str = ""

    @property
    def total_gpus(self) -> int:
        return sum(g.gpus_per_server * g.servers for g in self.groups)

    def gpus_by_type(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for g in self.groups:
            out[g.gpu_type] = out.get(g.gpu_type, 0) + g.gpus_per_server * g.servers
        return out

    @property
    def servers(self) -> int:
        return sum(g.servers for g in self.groups)


# The most servers a SPEC may have in all: each is a node of the modelled ClusterState (100,000
# take about 7 s to build here; a replay on them is slower still).
MAX_SERVERS = 100_000


def parse_cluster_spec(text: str) -> ClusterSpec:
    """Parse a --cluster SPEC (see the module docstring)."""
    def fail(part: str, why: str) -> ClusterSpecError:
        return ClusterSpecError(f"--cluster {text!r}: part {part!r}: {why}")

    if not isinstance(text, str) or not text.strip():
        raise ClusterSpecError("--cluster is empty: expected e.g. 'v100:8x40,k80:4x40;rack=16'")
    servers_part, *options = [p.strip() for p in text.split(";")]
    groups = []
    for part in [p.strip() for p in servers_part.split(",")]:
        kind, sep, shape = part.partition(":")
        if not sep:
            raise fail(part, "expected TYPE:GPUSxSERVERS, e.g. v100:8x40")
        kind = kind.strip().lower()
        if kind not in GPU_TYPES:
            raise fail(part, f"unknown GPU type {kind!r}; known: {', '.join(GPU_TYPES)}")
        gpus, x, count = shape.lower().partition("x")
        try:  # (parse_number: `1_0` and non-ASCII digits, which int() takes, are refused)
            gpus_i, count_i = (parse_number(n.strip(), whole=True) for n in (gpus, count))
        except ValueError as e:
            raise fail(part, "expected TYPE:GPUSxSERVERS with whole numbers, e.g. v100:8x40"
                       + (f" ({e})" if str(e) else "")) from None
        if not x or not 1 <= gpus_i <= 64 or count_i < 1:
            raise fail(part, "need 1 <= GPUs per server <= 64 and >= 1 server")
        # Each server is built as a node of the ClusterState: a typo such as 8x99999999 ran
        # for minutes and out of memory instead of being refused.
        if sum(g.servers for g in groups) + count_i > MAX_SERVERS:
            raise fail(part, f"at most {MAX_SERVERS:,} servers in all")
        groups.append(ServerGroup(kind, gpus_i, count_i))
    values = {"rack": DEFAULT_RACK, "rack_gbps": DEFAULT_RACK_GBPS,
              "inter_gbps": DEFAULT_INTER_GBPS}
    given: set[str] = set()
    for part in options:
        if not part:
            continue
        key, sep, value = (s.strip() for s in part.partition("="))
        if not sep or key not in values:
            raise fail(part, f"expected one of {', '.join(k + '=...' for k in values)}")
        if key in given:  # which one was meant? (the last silently won)
            raise fail(part, f"{key} is given twice")
        given.add(key)
        try:
            number = parse_number(value, whole=key == "rack")
        except ValueError as e:
            raise fail(part, ("rack must be a whole number" if key == "rack"
                              else f"{key} must be a number") + (f" ({e})" if str(e) else "")
                       ) from None
        if not (math.isfinite(number) and number > 0):
            raise fail(part, f"{key} must be > 0")
        if key != "rack" and number < MIN_GBPS:
            raise fail(part, f"{key} is in GB/s and must be >= {MIN_GBPS:g} (1 MB/s)")
        values[key] = number
    return ClusterSpec(tuple(groups), values["rack"], values["rack_gbps"],
                       values["inter_gbps"], text)


def build_state(spec: ClusterSpec, now: float = 0.0, order_seed: int = 0) -> ClusterState:
    """A ClusterState of the modelled servers, reported at `now`. Heartbeat limits are infinite:
    no node goes stale in a simulation.

    Table order (what first-fit walks) is rack by rack, servers of a rack together, racks in a
    fixed pseudo-random order (`order_seed`): like a real cluster, where nodes join in no
    particular type order, so no baseline is handed the fast GPUs first by accident."""
    state = ClusterState(suspect_after_s=math.inf, dead_after_s=math.inf,
                         inter_group_gbps=spec.inter_gbps)
    racks: list[list[tuple[str, ServerGroup]]] = []
    index: dict[str, int] = {}
    for group in spec.groups:
        for i in range(group.servers):
            if i % spec.rack == 0:
                racks.append([])
            k = index[group.gpu_type] = index.get(group.gpu_type, -1) + 1
            racks[-1].append((f"{group.gpu_type}-{k:04d}", group))
    order = np.random.default_rng([order_seed, 11]).permutation(len(racks))
    for rack_no in order:
        for node_id, group in racks[rack_no]:
            t = GPU_TYPES[group.gpu_type]
            memory = int(t.memory_gib * GIB)
            gpus = tuple(GpuInfo(j, t.gpu_name, memory, memory, source="declared")
                         for j in range(group.gpus_per_server))
            cpus = CPUS_PER_GPU * group.gpus_per_server
            state.update(NodeReport(
                node_id=node_id, hostname=node_id, ray_cpus=float(cpus),
                ray_gpus=float(group.gpus_per_server), cpu_count=cpus, load_avg_1m=0.0,
                ram_total_bytes=cpus * 8 * GIB, ram_available_bytes=cpus * 8 * GIB, gpus=gpus,
                labels={LABEL_NETWORK_GROUP: f"rack-{rack_no:04d}",
                        LABEL_NETWORK_GBPS: str(spec.rack_gbps)}), now)
    return state
