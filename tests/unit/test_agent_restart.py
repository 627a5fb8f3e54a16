"""The scheduler's rule for a node agent that has gone silent while Ray lists its node alive
(orchestrator/inventory.py: silent_agent, used by ray_layer/scheduler_actor.py): killed once silent past the limit, and a new
agent is given as long to report before it could be killed in its turn, so a maintenance pass
every few seconds does not kill the agents it has just started."""
from orchestrator.inventory import silent_agent

LIMIT = 15.0


def test_an_agent_silent_past_the_limit_is_killed_once_and_its_successor_given_time():
    last_seen = 100.0  # the node's last report, from agent "a"
    known, kill = silent_agent(None, "a", last_seen, now=110.0, limit_s=LIMIT)
    assert known == ("a", 100.0) and not kill  # suspect, but not yet silent 15 s
    known, kill = silent_agent(known, "a", last_seen, now=116.0, limit_s=LIMIT)
    assert kill  # silent 16 s since its last report
    # The pass kills "a" and starts "b" at 116: the node has still not reported, pass after
    # pass, yet "b" is left alone for 15 s ...
    known = ("b", 116.0)
    for now in (121.0, 126.0, 131.0):
        known, kill = silent_agent(known, "b", last_seen, now, LIMIT)
        assert known == ("b", 116.0) and not kill, now
    # ... and killed in its turn only if it stays silent past that.
    assert silent_agent(known, "b", last_seen, 131.5, LIMIT)[1]


def test_a_silent_agent_first_seen_counts_from_the_nodes_last_report():
    """A scheduler that meets the agent only now (it was started by a job's driver, or this
    scheduler just restarted and remembers the node's report) does not wait another limit."""
    assert silent_agent(None, "a", 100.0, now=130.0, limit_s=LIMIT) == (("a", 100.0), True)
    # Another agent than the one remembered (a job's driver started one): counted the same.
    assert silent_agent(("old", 50.0), "a", 100.0, 130.0, LIMIT) == (("a", 100.0), True)


def test_an_agent_of_a_node_never_heard_from_may_be_starting():
    known, kill = silent_agent(None, "a", None, now=500.0, limit_s=LIMIT)
    assert known == ("a", 500.0) and not kill
    assert not silent_agent(known, "a", None, 515.0, LIMIT)[1]
    assert silent_agent(known, "a", None, 515.5, LIMIT)[1]
