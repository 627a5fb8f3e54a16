"""The tokenizing pass on Ray Data: read the user's files, tokenize them in parallel across the
cluster and write token shards to the cache, then the manifest (last).

    manifest = tokenize_with_ray_data(plan, num_workers=4)

One row per source file goes through `map_batches` into a pool of tokenizer actors (each loads
the tokenizer once); each actor streams its file's documents (orchestrator/training/corpus.py),
tokenizes them and writes the file's shards (orchestrator/training/shards.py) straight to the
cache, so only small records come back to the driver, which shows progress (documents,
tokens, MB/s) as files finish. A bad line or row, a file that cannot be read (removed since
planning, a storage error) or a cache that cannot be written (disk full) stops the pass with
the DataError that names it, before any training worker starts; the cache then has no
manifest and is redone next time. So does a tokenizer worker that dies more often than it
is restarted (WORKER_RESTARTS), naming the files not tokenized.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Callable

import ray
import ray.data
import ray.exceptions
from ray.util.annotations import RayDeprecationWarning

from orchestrator.tokenizer import tokenizer_from_json
from orchestrator.training.corpus import DataError, SourceFile
from orchestrator.training.data_plan import BUNDLED_FILE, DataPlan, PassProgress, finish
from orchestrator.training.shards import SHARD_TOKENS, clear_cache_dir, tokenize_source

# How often a dead tokenizer actor is restarted and its file retried (a node lost, a worker
# killed): Ray Data's default is without end, and a file that got its worker killed every
# time (the OOM killer) held the pass forever.
WORKER_RESTARTS = 3


class _DropMessage(logging.Filter):
    """A logger filter that keeps out the records whose message starts with `start`."""

    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


# Ray 2.60 warns "Progress bars disabled. To enable, set ..." (once a process) when a
# dataset runs with DataContext.enable_progress_bars False, which the pass sets on purpose,
# and has no setting that keeps that one message out: a filter on the logger that says it
# drops that message alone (the logger's other warnings still print).
PROGRESS_LOGGER = "ray.data._internal.progress"
_PROGRESS_BARS_OFF = _DropMessage("Progress bars disabled.")


class TokenizeFiles:
    """Ray Data's callable class: the tokenizer is built once per actor, then each batch of
    source rows is tokenized into shards."""

    def __init__(self, tokenizer_json: str, cache_uri: str, text_field: str,
                 skip_bad_lines: bool, shard_tokens: int) -> None:
        self.tokenizer = tokenizer_from_json(tokenizer_json, "the run's tokenizer")
        self.cache_uri, self.text_field = cache_uri, text_field
        self.skip_bad_lines, self.shard_tokens = skip_bad_lines, shard_tokens

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        results = []
        for index, source in zip(batch["index"], batch["source"]):
            try:
                results.append(tokenize_source(
                    SourceFile.from_dict(dict(source)), int(index), self.tokenizer,
                    self.cache_uri, text_field=self.text_field,
                    skip_bad_lines=self.skip_bad_lines, shard_tokens=self.shard_tokens))
            except DataError as e:
                # Returned, not raised: Ray Data would wrap it in its own exceptions and
                # retries; the driver raises it with its message intact.
                results.append({"index": int(index), "error": str(e)})
        return {"result": results}


def tokenize_with_ray_data(plan: DataPlan, num_workers: int = 2, *,
                           shard_tokens: int = SHARD_TOKENS,
                           say: Callable[[str], None] = print) -> dict[str, Any]:
    """Tokenize `plan`'s sources into its cache directory with `num_workers` tokenizer actors
    (one CPU each); returns the manifest. Ray must be initialised (ray_layer.cluster.connect)."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # our own progress line says more (PassProgress)
    context.print_on_execution_start = False
    logging.getLogger(PROGRESS_LOGGER).addFilter(_PROGRESS_BARS_OFF)  # (added once)
    clear_cache_dir(plan.cache_uri)
    items = [{"index": i, "source": s.to_dict()} for i, s in enumerate(plan.sources)]
    with warnings.catch_warnings():
        # Ray 2.60 warns of any extra `ray_remote_args` ("deprecated ... Use the named remote
        # parameters instead"), but map_batches has no named parameter for max_restarts /
        # max_task_retries, and ActorPoolStrategy and DataContext have none either: its actor
        # pool reads them from these arguments alone (ActorPoolMapOperator's
        # _apply_default_remote_args), so they stay, and that one warning, printed on every
        # --data run, is kept out.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated",
                                category=RayDeprecationWarning)
        dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            TokenizeFiles, batch_size=1, num_cpus=1,
            compute=ray.data.ActorPoolStrategy(size=max(1, min(num_workers, len(items)))),
            max_restarts=WORKER_RESTARTS, max_task_retries=WORKER_RESTARTS,
            fn_constructor_kwargs={"tokenizer_json": plan.tokenizer.to_json(),
                                   "cache_uri": plan.cache_uri, "text_field": plan.text_field,
                                   "skip_bad_lines": plan.skip_bad_lines,
                                   "shard_tokens": shard_tokens})
    progress, results = PassProgress(len(items), say), []
    try:
        for row in dataset.iter_rows():
            result = row["result"]
            if "error" in result:
                raise DataError(result["error"])
            results.append(result)
            progress.add(result)
    except ray.exceptions.RayActorError as e:
        done = {r["index"] for r in results}
        left = [s.uri for i, s in enumerate(plan.sources) if i not in done]
        raise DataError(
            f"the tokenizing pass stopped: a tokenizer worker kept dying ({WORKER_RESTARTS} "
            "restarts; killed by the out-of-memory killer, or its node lost: see dmesg there) "
            f"with {len(left)} file(s) not tokenized: {', '.join(left[:3])}"
            f"{', ...' if len(left) > 3 else ''} ({str(e).splitlines()[0]})") from None
    skipped = [line for r in results for line in r["skipped"]]
    if skipped:
        say(f"skipped {sum(r['skipped_count'] for r in results)} bad line(s) "
            f"(--skip-bad-lines), e.g. {skipped[0]}")
    return finish(plan, results)


def prepare_shards(plan: DataPlan, address: str | None, ingest_workers: int, *,
                   shard_tokens: int = SHARD_TOKENS, say: Callable[[str], None] = print
                   ) -> tuple[dict[str, Any], bool]:
    """The plan's manifest: read from the cache, else built by one tokenizing pass on Ray Data
    (connecting to the cluster first; the bundled corpus is small and tokenized in this
    process). Returns (manifest, whether this call started Ray: the caller stops it)."""
    from orchestrator.training.data_plan import tokenize_in_process, tokenize_once
    from ray_layer.cluster import connect

    if plan.cached:
        say(f"token shards cached at {plan.cache_uri}: {plan.manifest['train_tokens']:,} "
            f"training and {plan.manifest['held_out_tokens']:,} held-out tokens "
            "(--retokenize to redo)")
        return plan.manifest, False
    if plan.sources and plan.sources[0].uri.endswith("/" + BUNDLED_FILE) \
            and len(plan.sources) == 1:
        return tokenize_once(plan, lambda p: tokenize_in_process(p, shard_tokens, say=say),
                             say), False
    started_ray = connect(address)
    try:
        workers = ingest_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        say(f"tokenizing {len(plan.sources)} file(s) "
            f"({sum(s.size for s in plan.sources) / 1e6:.1f} MB) on Ray Data with up to "
            f"{workers} worker(s) into {plan.cache_uri}")
        manifest = tokenize_once(
            plan, lambda p: tokenize_with_ray_data(p, workers, shard_tokens=shard_tokens,
                                                   say=say), say)
    except BaseException:
        if started_ray:
            ray.shutdown()
        raise
    return manifest, started_ray
