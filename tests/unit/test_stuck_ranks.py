"""A user loop's rank stuck in its own code (no Ray): the verdict (orchestrator/stuck_ranks.py),
where a worker says its loop is (ray_layer/user_loop.progress, through Ray Train's pickling of
the loop), and the controller's watch that fails the stuck worker
(ray_layer/train_callbacks.WatchStuckRanks). Before, the other ranks waited in their report for
the process group's 30-minute timeout with no message (once they had all returned: for as long
as that rank stayed stuck)."""
import threading
import time
from types import SimpleNamespace

import ray

from orchestrator.stuck_ranks import stuck_verdict
from ray_layer import train_callbacks, user_loop
from ray_layer.train_callbacks import StuckRank, WatchStuckRanks


def working(for_s, reports=3, step=7, where="train.py line 9, in train_loop"):
    return {"state": "working", "for_s": for_s, "reports": reports, "step": step,
            "where": where}


def waiting(for_s, reports=4, step=8):
    return {"state": "waiting", "for_s": for_s, "reports": reports, "step": step,
            "where": None}


def test_a_rank_in_its_own_code_past_the_timeout_while_another_waits_is_named():
    ranks, message = stuck_verdict({0: waiting(301), 1: working(305)}, 300)
    assert ranks == [1]
    assert message.startswith("worker rank(s) 1 stuck in the loop's own code: neither called "
                              "launch.report nor returned for 300s (stuck_timeout_s)")
    assert ("rank 1 last seen in its report 3 (step 7), 305s ago, now at train.py line 9, in "
            "train_loop; rank 0 waiting in its report 4 (step 8) for 301s") in message


def test_ranks_that_returned_wait_too_and_a_rank_stuck_before_its_first_report_is_named():
    returned = {"state": "returned", "for_s": 400, "reports": 5, "step": 4, "where": None}
    ranks, message = stuck_verdict(
        {0: returned, 1: working(900, reports=0, step=None, where=None), 2: returned,
         3: working(400)}, 300)
    assert ranks == [1, 3]
    assert "rank 1 has not reported since the loop started, 900s ago;" in message
    assert "rank 0 returned from the loop 400s ago; rank 2 returned" in message


def test_no_verdict_before_the_timeout_without_a_waiting_rank_or_from_silent_workers():
    assert stuck_verdict({0: waiting(299), 1: working(500)}, 300) is None
    assert stuck_verdict({0: waiting(500), 1: working(299)}, 300) is None
    # A DDP loop's rank 0 blocked in the model's all-reduce is in its own code too.
    assert stuck_verdict({0: working(900), 1: working(900)}, 300) is None
    # Inside Ray Train's report (a checkpoint's upload) is not the loop's own code.
    uploading = {"state": "reporting", "for_s": 900, "reports": 4, "step": 8}
    assert stuck_verdict({0: uploading, 1: waiting(900)}, 300) is None
    assert stuck_verdict({0: waiting(900), 1: None}, 300) is None


def test_a_worker_says_where_its_loop_is_through_ray_trains_pickling_of_it(tmp_path):
    # Ray Train sends the wrapped loop by value, with a copy of the globals it names: state
    # set there (the loop's thread) never reached the module that `progress` reads.
    release = tmp_path / "release"

    def train_loop(config):
        while not release.exists():
            time.sleep(0.01)  # where it is stuck

    per_worker = ray.cloudpickle.loads(ray.cloudpickle.dumps(user_loop.yielding(train_loop)))
    worker = threading.Thread(target=per_worker, args=({},))
    worker.start()
    try:
        time.sleep(0.2)
        now = user_loop.progress(0.1)
        assert now["state"] == "working" and now["reports"] == 0 and now["for_s"] >= 0.1
        assert now["where"] == (f"test_stuck_ranks.py line "
                                f"{train_loop.__code__.co_firstlineno + 2}, in train_loop")
        assert user_loop.progress()["where"] is None  # (asked only past the timeout)
    finally:
        release.touch()
        worker.join()
    assert user_loop.progress()["state"] == "returned"


def test_the_watch_fails_the_stuck_worker_in_the_controllers_poll(monkeypatch):
    answers = {0: waiting(40), 1: working(45)}
    asked = []
    group = SimpleNamespace(execute_async=lambda fn, timeout_s: asked.append(
        (fn, timeout_s)) or [0, 1])
    monkeypatch.setattr(train_callbacks.ray, "wait", lambda refs, **kw: (list(refs), []))
    monkeypatch.setattr(train_callbacks.ray, "get", lambda ref, timeout=None: answers[ref])
    watch = WatchStuckRanks(30, check_every_s=0.01)
    watch.after_worker_group_start(group)
    status = SimpleNamespace(worker_statuses={0: SimpleNamespace(error=None),
                                              1: SimpleNamespace(error=None)})
    time.sleep(0.02)
    watch.after_worker_group_poll_status(status)  # asks
    assert asked == [(user_loop.progress, 30)] and status.worker_statuses[1].error is None
    watch.after_worker_group_poll_status(status)  # reads the answers
    assert status.worker_statuses[0].error is None
    error = status.worker_statuses[1].error
    assert isinstance(error, StuckRank) and str(error).startswith("worker rank(s) 1 stuck")


def test_the_advice_names_the_work_the_others_waited_through():
    # With every other rank returned, the stuck rank's work is after its last report: the
    # advice said "a step or a checkpoint write between two reports" whatever the others did,
    # and named neither an evaluation one rank does alone nor work after the last report.
    returned = {"state": "returned", "for_s": 400, "reports": 5, "step": 4, "where": None}
    _, after_last = stuck_verdict({0: working(400, reports=5), 1: returned}, 300)
    assert after_last.endswith(
        "raise stuck_timeout_s if one rank's work after its last report (a final evaluation "
        "or save) takes longer while the others have returned")
    _, between = stuck_verdict({0: working(400), 1: waiting(350), 2: returned}, 300)
    assert between.endswith(
        "raise stuck_timeout_s if one rank's work between two reports (a step, an evaluation "
        "on that rank alone, a checkpoint write of the loop's own) takes longer while the "
        "others wait in their report")


def blocked(collective_s, collective="backward (where DDP all-reduces the gradients)",
            for_s=None, where="train.py line 12, in train_loop"):
    return {**working(collective_s if for_s is None else for_s, reports=4, step=8,
                      where=where), "collective": collective, "collective_s": collective_s}


def test_a_rank_in_its_own_code_while_another_is_blocked_in_a_collective_is_named():
    # Rank 1 sleeps before its backward; rank 0 waits in DDP's gradient all-reduce in its
    # own backward. Both read "working": the run waited out gloo's 30 minutes, silently.
    ranks, message = stuck_verdict({0: blocked(302), 1: working(310, reports=4, step=8)}, 300)
    assert ranks == [1]
    assert ("(rank 1 last seen in its report 4 (step 8), 310s ago, now at train.py line 9, in "
            "train_loop; rank 0 blocked in backward (where DDP all-reduces the gradients) for "
            "302s, at train.py line 12, in train_loop)") in message
    assert message.endswith(
        "raise stuck_timeout_s if one rank's work between two reports (a step, an evaluation "
        "on that rank alone, a checkpoint write of the loop's own) takes longer while the "
        "others wait in their report or in a collective (DDP's gradient all-reduce in "
        "backward, a torch.distributed call)")
    ranks, message = stuck_verdict({0: blocked(400, "torch.distributed.barrier"),
                                    1: working(500), 2: blocked(300, where=None)}, 300)
    assert ranks == [1] and message.count("blocked in") == 2


def test_no_verdict_before_a_rank_was_blocked_that_long_nor_against_a_blocked_rank():
    # Blocked only since a moment (its own work before took the rest): not yet waiting.
    assert stuck_verdict({0: blocked(30, for_s=900), 1: working(900)}, 300) is None
    # A rank in a collective itself is not in its own code, however long.
    assert stuck_verdict({0: blocked(900), 1: blocked(900, "torch.distributed.barrier")},
                         300) is None
    # But one that never joins the others' report (a report skipped on that rank).
    ranks, message = stuck_verdict({0: waiting(900), 1: blocked(900)}, 300)
    assert ranks == [1] and ("rank 1 last seen in its report 4 (step 8), 900s ago, now "
                             "blocked in backward (where DDP all-reduces the gradients) at "
                             "train.py line 12, in train_loop; rank 0 waiting") in message
    assert message.count("rank 1 last seen") == 1 and "rank 1 blocked in" not in message


def test_which_collective_a_loop_is_blocked_in_from_its_innermost_frame():
    from orchestrator.stuck_ranks import collective_call

    torch = "/py/site-packages/torch"
    own = ("/home/me/train.py", "train_loop")
    assert collective_call([own, (f"{torch}/_tensor.py", "backward"),
                            (f"{torch}/autograd/__init__.py", "backward"),
                            (f"{torch}/autograd/graph.py", "_engine_run_backward")],
                           torch) == "backward (where DDP all-reduces the gradients)"
    c10d = f"{torch}/distributed/distributed_c10d.py"
    logger = (f"{torch}/distributed/c10d_logger.py", "wrapper")
    assert collective_call([own, logger, (c10d, "all_gather_object"), logger,
                            (c10d, "all_gather")], torch) \
        == "torch.distributed.all_gather_object"
    assert collective_call([own, (f"{torch}/distributed/utils.py", "_sync_params")], torch) \
        == "torch.distributed (_sync_params)"
    assert collective_call([own, (f"{torch}/nn/parallel/distributed.py", "forward"),
                            (f"{torch}/nn/parallel/distributed.py",
                             "_distributed_broadcast_coalesced")], torch) \
        == "DistributedDataParallel's broadcast of its buffers or parameters"
    # Its own code, a torch computation, a custom Function's backward: not a collective.
    assert collective_call([own], torch) is None
    assert collective_call([own, (f"{torch}/nn/modules/module.py", "_call_impl")],
                           torch) is None
    assert collective_call([own, (f"{torch}/autograd/graph.py", "_engine_run_backward"),
                            ("/home/me/ops.py", "backward")], torch) is None
    assert collective_call([("/py/site-packages/torchvision/io.py", "read")], torch) is None
    assert collective_call([], torch) is None


def test_a_worker_says_how_long_its_loop_has_been_blocked_in_a_collective(tmp_path,
                                                                         monkeypatch):
    # A stand-in for torch's folder: its distributed/distributed_c10d.py blocks as a
    # collective does while another rank is elsewhere.
    fake_torch, c10d = _fake_torch_module(
        tmp_path, monkeypatch, "distributed/distributed_c10d.py", "fake_c10d",
        "import time\n\ndef barrier(release):\n    while not release.exists():\n"
        "        time.sleep(0.01)\n")
    library = user_loop._library_folders() + (f"{fake_torch.resolve()}/",)
    monkeypatch.setattr(user_loop, "_library_folders", lambda: library)
    release, go = tmp_path / "release", tmp_path / "go"

    def train_loop(config):
        while not go.exists():
            time.sleep(0.01)
        c10d.barrier(release)

    per_worker = ray.cloudpickle.loads(ray.cloudpickle.dumps(user_loop.yielding(train_loop)))
    worker = threading.Thread(target=per_worker, args=({},))
    worker.start()
    try:
        time.sleep(0.1)
        assert user_loop.progress(0.0)["collective"] is None  # (in its own code)
        go.touch()
        time.sleep(0.1)
        first = user_loop.progress(0.0)
        assert first["collective"] == "torch.distributed.barrier"
        assert first["collective_s"] == 0  # first seen there now
        assert first["where"] == (f"test_stuck_ranks.py line "
                                  f"{train_loop.__code__.co_firstlineno + 3}, in train_loop")
        time.sleep(0.3)
        later = user_loop.progress(0.0)
        assert later["collective"] == "torch.distributed.barrier"
        assert 0.3 <= later["collective_s"] < later["for_s"]
    finally:
        go.touch()
        release.touch()
        worker.join()
    assert user_loop.progress()["collective"] is None


def test_a_rank_blocked_in_a_collective_the_others_never_join_is_named_for_that():
    # Rank 1 returned (its loop ran fewer steps) while rank 0 waits in backward's all-reduce
    # for it: rank 0 was named "stuck in the loop's own code", with the advice to raise
    # stuck_timeout_s for "a final evaluation or save", neither of which it was doing.
    returned = {"state": "returned", "for_s": 400, "reports": 5, "step": 4, "where": None}
    ranks, message = stuck_verdict({0: blocked(390, for_s=400, where="train.py line 21, in "
                                               "train_loop"), 1: returned}, 300)
    assert ranks == [0]
    assert message.startswith(
        "worker rank(s) 0 blocked in a collective the others never join: neither called "
        "launch.report nor returned for 300s (stuck_timeout_s) while the others waited for "
        "them (rank 0 last seen in its report 4 (step 8), 400s ago, now blocked in backward "
        "(where DDP all-reduces the gradients) at train.py line 21, in train_loop; rank 1 "
        "returned from the loop 400s ago); ")
    assert "own code" not in message and "final evaluation" not in message
    assert message.endswith(
        "the ranks' loops disagree on the steps or collectives they run (rank 1 returned "
        "while rank 0 is in a collective): every rank must run the same number of steps "
        "(batches), backward and torch.distributed calls, and call launch.report the same "
        "number of times")
    # Others in their report: a collective they skipped, or a report skipped on that rank.
    ranks, message = stuck_verdict({0: waiting(900), 1: blocked(900)}, 300)
    assert ranks == [1] and message.startswith("worker rank(s) 1 blocked in a collective the "
                                               "others never join: ")
    assert message.endswith(
        "the ranks' loops disagree on the steps or collectives they run (rank 0 in its report "
        "while rank 1 is in a collective): every rank must run the same number of steps "
        "(batches), backward and torch.distributed calls, and call launch.report the same "
        "number of times; raise stuck_timeout_s only if that rank's backward computes that "
        "long without DDP")
    # A rank in its own code beside one in a collective that the reporting rank skipped.
    ranks, message = stuck_verdict({0: blocked(900), 1: working(900), 2: waiting(900)}, 300)
    assert ranks == [0, 1] and message.startswith(
        "worker rank(s) 1 stuck in the loop's own code and rank(s) 0 blocked in a collective "
        "the others never join: neither called launch.report")
    assert "takes longer while the others wait in their report" in message
    assert message.endswith("long without DDP")


def test_a_new_call_of_the_same_collective_is_not_counted_as_the_wait_of_the_last(
        tmp_path, monkeypatch):
    # A loop reporting every N steps runs backward at every step; its frame object, freed at
    # each return, comes back at the same address: a fast rank seen in backward at each ask
    # (waiting there for a rank slow at reading its batches) counted one wait since the first
    # sighting, and the slow rank, healthy, was named stuck after stuck_timeout_s.
    fake_torch, c10d = _fake_torch_module(
        tmp_path, monkeypatch, "distributed/distributed_c10d.py", "fake_c10d_calls",
        "def barrier(done):\n    done.acquire()\n")
    calls = [threading.Lock() for _ in range(3)]  # (waited for in C, as torch's calls do)
    for done in calls:
        done.acquire()

    def train_loop(config):
        for done in calls:  # one step each, no report between them
            c10d.barrier(done)

    per_worker = user_loop.yielding(train_loop)
    worker = threading.Thread(target=per_worker, args=({},))
    worker.start()
    try:
        seen = []
        for done in calls:
            time.sleep(0.1)
            first = user_loop.progress()
            time.sleep(0.3)
            seen.append((first["collective_s"], user_loop.progress()["collective_s"]))
            done.release()
        # Each call counted from its own first sighting: 0 (the second call read 0.4 s, the
        # first call's wait), then the 0.3 s asleep there.
        assert [first for first, _ in seen] == [0, 0, 0], seen
        assert all(later >= 0.3 for _, later in seen), seen
    finally:
        for done in calls:
            if done.locked():
                done.release()
        worker.join()


def test_a_backward_that_computes_is_not_a_wait_and_names_no_one(tmp_path, monkeypatch):
    # Rank 0's backward computed (torch's C++ code, innermost frame autograd's) for
    # stuck_timeout_s while rank 1 did its own work as long: rank 0 read as blocked in DDP's
    # all-reduce since it entered backward, and rank 1, healthy, was named stuck, though no
    # rank waited yet (seen in a 2-rank gloo run: rank 0's loop thread computed 2.5 s of its
    # 3.5 s in backward). The wait is counted from the last ask that found it computing.
    fake_torch, graph = _fake_torch_module(
        tmp_path, monkeypatch, "autograd/graph.py", "fake_graph",
        "def _engine_run_backward(computed, done):\n"
        "    while not computed.is_set():  # (the backward's own work)\n"
        "        sum(range(1000))\n"
        "    done.acquire()  # (DDP's all-reduce, waiting for the other ranks)\n")
    computed, done = threading.Event(), threading.Lock()
    done.acquire()

    def train_loop(config):
        graph._engine_run_backward(computed, done)

    worker = threading.Thread(target=user_loop.yielding(train_loop), args=({},))
    worker.start()
    try:
        time.sleep(0.1)
        assert user_loop.progress()["collective"].startswith("backward")
        time.sleep(0.4)
        computing = user_loop.progress()
        assert computing["collective"].startswith("backward")
        assert computing["collective_s"] < 0.4, computing  # (read 0.4 s: all of it)
        assert computing["computing"] is True
        other = working(900, reports=0, step=None)  # rank 1 in its own code all along
        assert stuck_verdict({0: computing, 1: other}, 0.4) is None
        computed.set()  # now it waits: counted from this ask on
        time.sleep(0.1)
        user_loop.progress()
        time.sleep(0.4)
        waited = user_loop.progress()
        assert waited["collective_s"] >= 0.4, waited
        assert waited["computing"] is False
        assert stuck_verdict({0: waited, 1: other}, 0.4)[0] == [1]
    finally:
        computed.set()
        done.release()
        worker.join()


def test_a_rank_compiling_its_model_is_not_stuck_and_its_own_work_counts_after(
        tmp_path, monkeypatch):
    # torch.compile's first step on rank 1 (dynamo's tracing, inductor's compile: torch's
    # Python code, under the loop's `model(x)` line) read as the loop's own code: a compile
    # that took stuck_timeout_s while rank 0 waited in backward's all-reduce had rank 1 named
    # stuck ("now at train.py line 20, in train_loop"), and the restart compiled again.
    compiling = {**working(900), "compiling": True, "own_s": 0}
    assert stuck_verdict({0: blocked(900), 1: compiling}, 300) is None
    # Its own work counts from the last ask that found it compiling.
    assert stuck_verdict({0: blocked(900), 1: {**working(900), "own_s": 100}}, 300) is None
    ranks, message = stuck_verdict({0: blocked(900), 1: {**working(900), "own_s": 301}}, 300)
    assert ranks == [1] and ("rank 1 last seen in its report 3 (step 7), 900s ago, last seen "
                             "compiling (torch.compile) 301s ago, now at train.py") in message
    from orchestrator.stuck_ranks import compiling as in_compiler

    torch = "/py/site-packages/torch"
    own = ("/home/me/train.py", "train_loop")
    fx = f"{torch}/_inductor/compile_fx.py"
    assert in_compiler([own, (f"{torch}/_dynamo/convert_frame.py", "_compile")], torch)
    assert in_compiler([own, (f"{torch}/_functorch/_aot_autograd/runtime_wrappers.py",
                              "_backward_impl"), (fx, "bw_compiler"),
                        (fx, "compile_fx_inner")], torch)  # (a backward compiled lazily)
    # A compiled graph's run (CUDA graphs' wrapper in compile_fx.py) is not a compile.
    assert not in_compiler([own, (f"{torch}/_dynamo/eval_frame.py", "_fn"), (fx, "run")],
                           torch)
    fake_torch, convert_frame = _fake_torch_module(
        tmp_path, monkeypatch, "_dynamo/convert_frame.py", "fake_convert_frame",
        "def _compile(done):\n    done.acquire()\n")
    compiled, release = threading.Lock(), threading.Event()
    compiled.acquire()

    def train_loop(config):
        convert_frame._compile(compiled)
        release.wait()  # its own work after the compile

    worker = threading.Thread(target=user_loop.yielding(train_loop), args=({},))
    worker.start()
    try:
        time.sleep(0.3)
        now = user_loop.progress()
        assert now["compiling"] is True and now["collective"] is None, now
        compiled.release()
        time.sleep(0.3)
        after = user_loop.progress()
        # (counted from that ask, the last that found it compiling)
        assert after["compiling"] is False, after
        assert 0.3 <= after["own_s"] < after["for_s"] - 0.2, after
    finally:
        if compiled.locked():
            compiled.release()
        release.set()
        worker.join()


def test_a_rank_computing_in_backward_beside_ranks_in_their_report_is_named_for_its_work():
    # Rank 1's backward (no DDP: the loop's ranks meet only in launch.report) computed for
    # stuck_timeout_s while rank 0 waited in its report: it was named "blocked in a
    # collective the others never join", the loops said to disagree, though its own work
    # (seen computing at the last ask) was what took that long.
    computing = {**blocked(0, for_s=900), "computing": True}
    ranks, message = stuck_verdict({0: waiting(900), 1: computing}, 300)
    assert ranks == [1] and message.startswith(
        "worker rank(s) 1 stuck in the loop's own code: neither called launch.report")
    assert ("rank 1 last seen in its report 4 (step 8), 900s ago, now in backward (where DDP "
            "all-reduces the gradients), computing, at train.py line 12, in train_loop; "
            "rank 0 waiting") in message
    assert "disagree" not in message and message.endswith(
        "takes longer while the others wait in their report")
    # Waiting there (not computing at the last ask): a collective the others never join.
    _, message = stuck_verdict({0: waiting(900), 1: {**computing, "computing": False}}, 300)
    assert message.startswith("worker rank(s) 1 blocked in a collective the others never join")


def _fake_torch_module(tmp_path, monkeypatch, relative, name, source):
    """A module written at `relative` under a fake torch folder the watch reads as torch's
    (user_loop._TORCH_DIR), loaded: its frames are torch's to the watch."""
    fake_torch = tmp_path / "torch"
    (fake_torch / relative).parent.mkdir(parents=True, exist_ok=True)
    (fake_torch / relative).write_text(source)
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, fake_torch / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(user_loop, "_TORCH_DIR", str(fake_torch))
    return fake_torch, module
