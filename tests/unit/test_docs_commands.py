"""Every command the README and docs show (`python jobs/X.py ...`, `python -m orchestrator ...`,
`python -m scripts.X ...`, `python examples/.../make_data.py ...`), in a code block or an inline
code span, names an entry point that exists and only flags its own parser has; where the
command has no placeholders, the parser accepts it whole (value formats included). The Ray
commands they show (`ray ...`, `serve ...`) name a command and flags of the installed Ray's CLI."""
from __future__ import annotations

import argparse
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = ["README.md", "examples/README.md"] + [
    f"docs/{name}.md" for name in ("operations", "training", "data", "serving", "compression",
                                   "simulator", "scheduler", "architecture", "testing",
                                   "benchmarks")]  # (each figure's command reruns it)

# python jobs/X.py | python examples/.../X.py | python -m orchestrator | python -m scripts.X
# (not `python -m orchestrator.serving.engine_host`: a replica's own process, no command line)
ENTRY = re.compile(r"\bpython3? +(?:(?P<path>(?:jobs|scripts|examples)/[\w/]+\.py)"
                   r"|-m +(?P<module>orchestrator\.monitoring|scripts\.\w+|orchestrator)(?![.\w]))")
PLACEHOLDER = re.compile(r"[\[\]<>|]|\.\.\.|\bNAME\b|\bDIR\b|\bPATH\b|\bSPEC\b|\bN\b|\bX\b|[A-Z]{3,}")


def _code_spans(prose: str) -> list[str]:
    """Markdown's inline code spans: a run of N backticks up to the next run of exactly N
    (``a `b` c`` is one span), so that a span holding backticks does not pair the rest."""
    return [m.group(2) for m in
            re.finditer(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", prose, re.S)]


def _commands(text: str, entry: re.Pattern = ENTRY) -> list[tuple[str, bool]]:
    """(command line naming `entry`, whether it is a whole command: a fenced shell block's
    line, its continuations joined; else an inline code span, which may name only a part)."""
    lines = []
    fenced = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
    for m in fenced.finditer(text):
        if m.group(1) in ("python", "yaml", "json", "text"):
            continue
        lines += [(line, True) for line in re.sub(r"\\\n\s*", " ", m.group(2)).splitlines()]
    prose = fenced.sub("", text)
    lines += [(" ".join(span.split()), False) for span in _code_spans(prose)]
    return [(line, whole) for line, whole in lines if entry.search(line)]


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


_PARSERS: dict[str, argparse.ArgumentParser] = {}


def _parser(entry: str) -> argparse.ArgumentParser:
    """The entry point's own parser, caught at its first parse_args (nothing after it runs)."""
    if entry not in _PARSERS:
        def capture(self, *args, **kwargs):
            raise _Captured(self)

        saved = (argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args,
                 sys.argv)
        argparse.ArgumentParser.parse_args = capture
        argparse.ArgumentParser.parse_known_args = capture
        sys.argv = [entry]
        try:
            if entry.endswith(".py"):
                runpy.run_path(str(REPO / entry), run_name="__main__")
            else:
                runpy.run_module(entry, run_name="__main__", alter_sys=False)
        except _Captured as caught:
            _PARSERS[entry] = caught.parser
        finally:
            (argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args,
             sys.argv) = saved
        assert entry in _PARSERS, f"{entry} parsed no arguments"
    return _PARSERS[entry]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _documented() -> list[tuple[str, str, list[str], bool]]:
    """(where, entry point, its arguments as the docs give them, whether they are all: a
    command as typed)."""
    found = []
    for doc in DOCS:
        for line, whole in _commands((REPO / doc).read_text()):
            for m in ENTRY.finditer(line):
                rest = line[m.end():].split(" #")[0]
                rest = re.split(r"&&|\|\||;\s|\$\(|\)|`", rest)[0]
                try:
                    words = shlex.split(rest)
                except ValueError:
                    words = [word.strip("'\"") for word in rest.split()]  # 'python -m ... status'

                entry = m.group("path") or m.group("module")
                # A command as typed: at the line's start (after VAR=value), or after `&&`
                # or `ray job submit ... --`; not one named inside a comment or a tree.
                typed = whole and re.fullmatch(r"\s*(?:[A-Z_]+=\S*\s+)*|.*(?:&&|\s--)\s*",
                                               line[:m.start()]) is not None
                if entry != "scripts.NAME":  # architecture.md: "python -m scripts.NAME"
                    found.append((f"{doc}: {line.strip()}", entry, words, typed))
    return found


DOCUMENTED = _documented()


def test_a_double_backtick_span_does_not_hide_the_commands_after_it():
    # ``a `b` c`` (a span holding backticks, as operations.md's exit-code table has) once
    # paired the spans after it wrongly: their commands went unchecked.
    text = "``error (`cancel NAME` drops it)`` then `python jobs/pretrain.py --nope`"
    assert ("python jobs/pretrain.py --nope", False) in _commands(text)


def test_the_docs_show_commands_of_every_kind():
    entries = {entry for _, entry, _, _ in DOCUMENTED}
    assert {"jobs/pretrain.py", "jobs/compress.py", "jobs/export.py", "orchestrator",
            "examples/image_cnn/make_data.py"} <= entries


@pytest.mark.parametrize("where, entry, words, whole", DOCUMENTED,
                         ids=[f"{i}-{e}" for i, (_, e, _, _) in enumerate(DOCUMENTED)])
def test_a_documented_command_uses_only_flags_its_parser_has(where, entry, words, whole):
    if entry.endswith(".py"):
        assert (REPO / entry).is_file(), f"{where}: {entry} does not exist"
    parser = _parser(entry)
    commands = _subparsers(parser)
    if commands and (words or whole):
        assert words and words[0] in commands, (
            f"{where}: {words[:1]} is not one of {sorted(commands)}")
        parser = commands[words[0]]
    flags = {s for action in parser._actions for s in action.option_strings}
    for word in words:
        flag = word.strip("[]").split("=")[0]
        if flag.startswith("--") and "*" not in flag:
            assert flag in flags, f"{where}: {entry} has no {flag} (it has {sorted(flags)})"
    if not whole:
        return
    for word in words:  # a file of this repository it names (not ~/..., /mnt/..., s3://...)
        if "/" in word and re.fullmatch(r"[\w.-][\w./-]*\.(?:ya?ml|py|csv)", word):
            assert (REPO / word).is_file(), f"{where}: {word} does not exist"
    if not any(PLACEHOLDER.search(w) or w in ("-h", "--help") for w in words):
        try:
            args = _parser(entry).parse_args(words)
        except SystemExit:
            pytest.fail(f"{where}: {entry}'s parser refuses {words}")
        if entry == "orchestrator" and args.command == "simulate":  # checked after parsing
            from orchestrator.cluster_model import parse_cluster_spec
            from orchestrator.policies import POLICY_NAMES

            assert args.policy in (*POLICY_NAMES, "all"), f"{where}: no policy {args.policy}"
            if args.cluster:
                parse_cluster_spec(args.cluster)


def _job_files() -> list[tuple[str, str]]:
    """(where, text) of every YAML block the docs show as a job file (it has a name and a
    worker count)."""
    found = []
    for doc in DOCS:
        text = (REPO / doc).read_text()
        for m in re.finditer(r"^```ya?ml\n(.*?)^```", text, re.S | re.M):
            if re.search(r"^name:", m.group(1), re.M) and "num_workers:" in m.group(1):
                found.append((f"{doc}:{text[:m.start()].count(chr(10)) + 1}", m.group(1)))
    return found


def test_every_job_file_the_docs_show_loads(tmp_path):
    from orchestrator.job_file import load_job_file

    shown = _job_files()
    assert {where.split(":")[0] for where, _ in shown} >= {"examples/README.md",
                                                          "docs/scheduler.md"}
    for i, (where, text) in enumerate(shown):
        path = tmp_path / f"job{i}.yaml"
        path.write_text(text)
        job = load_job_file(path)  # ConfigError naming the key otherwise
        assert job.spec.name, where


# `ray up cluster.yaml`, `serve deploy ...`: Ray's own CLI (a subcommand after it: not prose
# such as "ray up's default", nor ray.init()).
RAY_CLI = re.compile(r"(?<![\w.$/-])(?P<tool>ray|serve) +(?P<rest>[a-z][\w-]*(?![\w'.:-]).*)")
# Where a shell command ends: a comment, &&, ;, |, a closing parenthesis or code span, a line
# continuation, or ` -- ` (the job's own command follows: `ray job submit ... -- python ...`).
COMMAND_END = re.compile(r"\s#|&&|;|\||\)|`|\\|\s--(?:\s|$)")


def _ray_commands() -> list[tuple[str, str, list[str]]]:
    """(where, `ray` or `serve`, the words after it) of every Ray CLI command the docs show."""
    found = []
    for doc in DOCS + ["SECURITY.md"]:
        for line, _ in _commands((REPO / doc).read_text(), RAY_CLI):
            for m in RAY_CLI.finditer(line):
                rest = COMMAND_END.split(m.group("rest"))[0]
                try:
                    words = shlex.split(rest)
                except ValueError:
                    words = rest.split()
                found.append((f"{doc}: {line.strip()}", m.group("tool"), words))
    return found


RAY_DOCUMENTED = _ray_commands()


def _click_command(tool: str, words: list[str]):
    """(Ray's click command that `tool words...` runs, the words after its name)."""
    import click
    from ray.scripts.scripts import cli as ray_cli
    from ray.serve.scripts import cli as serve_cli

    command, name = {"ray": ray_cli, "serve": serve_cli}[tool], tool
    # `ray job submit`: a group, then its command (`ray logs`, the group alone: named in prose)
    while isinstance(command, click.Group) and words:
        try:  # as the CLI resolves it (`ray logs FILE` is `ray logs cluster FILE`)
            found, command, words = command.resolve_command(click.Context(command), words)
        except click.UsageError as e:
            pytest.fail(f"`{name}`: {e.format_message()}")
        name = f"{name} {found}"
    return command, name, words


def _ray_flag_problems(tool: str, words: list[str]) -> list[str]:
    """The flags of `tool words...` that Ray's CLI does not have (with `=value` or not)."""
    command, name, words = _click_command(tool, words)
    flags = {"--help"} | {flag for param in command.params
                          for flag in (*param.opts, *param.secondary_opts)
                          if flag.startswith("-")}
    return [f"`{name}` has no {word.split('=')[0]}" for word in words
            if word.startswith("-") and word.split("=")[0] not in flags]


def test_the_docs_ray_commands_are_found():
    shown = {(tool, words[0]) for _, tool, words in RAY_DOCUMENTED}
    assert {("ray", "start"), ("ray", "up"), ("ray", "job"), ("ray", "attach"),
            ("serve", "run"), ("serve", "deploy")} <= shown


def test_a_command_or_flag_ray_lacks_is_reported():
    assert _ray_flag_problems("ray", ["up", "cluster.yaml", "--no-restarts"]) == [
        "`ray up` has no --no-restarts"]
    assert _ray_flag_problems("ray", ["start", "--head", "--labels=a=b", "-h"]) == [
        "`ray start` has no -h"]
    assert _ray_flag_problems("ray", ["job", "submit", "--working-dir", "."]) == []
    with pytest.raises(pytest.fail.Exception, match="No such command"):
        _ray_flag_problems("ray", ["job", "sumbit"])


@pytest.mark.parametrize("where, tool, words", RAY_DOCUMENTED,
                         ids=[f"{i}-{tool}" for i, (_, tool, _) in enumerate(RAY_DOCUMENTED)])
def test_a_documented_ray_command_uses_only_flags_ray_has(where, tool, words):
    assert _ray_flag_problems(tool, words) == [], where


# Flags named in prose on their own ("whatever `--dropout` the run trained with"): no command
# line says whose, so each must be a flag of a command the docs show or of Ray's CLI (a flag
# that was renamed, or never was, read as real). Other tools' flags named that way:
OTHER_TOOLS_FLAGS = {"--durations": "pytest's (pyproject.toml's addopts)",
                     "--backfill": "simulate's flag before --no-backfill, named as history"}


def _click_flags(command) -> set[str]:
    """Every long flag of a click command and of the commands under it."""
    import click

    flags = {flag for param in command.params for flag in (*param.opts, *param.secondary_opts)
             if flag.startswith("--")}
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            flags |= _click_flags(sub)
    return flags


def _known_flags() -> set[str]:
    """The flags of every command the docs show (their subcommands' too) and of Ray's CLI."""
    from ray.scripts.scripts import cli as ray_cli
    from ray.serve.scripts import cli as serve_cli

    flags = set(OTHER_TOOLS_FLAGS) | _click_flags(ray_cli) | _click_flags(serve_cli)
    for entry in {entry for _, entry, _, _ in DOCUMENTED}:
        parser = _parser(entry)
        for each in (parser, *_subparsers(parser).values()):
            flags |= {s for action in each._actions for s in action.option_strings}
    return flags


def _prose_flags(text: str) -> list[str]:
    """The flags of the inline code spans that start with one (`--max-steps`, `--resume
    --max-steps N`), outside fenced blocks; a pattern (`--eval-*`) is not a flag. Of an error
    message (`--data SPEC: ... (convmv ... --notest)`), the first only: the rest may be
    another tool's advice."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    flag = re.compile(r"(?<!\S)(--[a-z][\w-]*)(?![\w*-])")
    return [m.group(1) for span in _code_spans(prose) if span.startswith("--")
            for m in flag.finditer(span.split(":")[0] if ":" in span else span)]


def test_a_flag_named_in_prose_is_found_in_a_span_of_its_own():
    text = ("whatever `--dropout` it had, `--resume --max-steps N`, `--eval-*`, `--resume:`,"
            " `--lr=3e-3`, `--data X: run (tool --other)`\n```\n--x\n```")
    assert _prose_flags(text) == ["--dropout", "--resume", "--max-steps", "--resume", "--lr",
                                     "--data"]


@pytest.mark.parametrize("doc", DOCS + ["SECURITY.md"])
def test_every_flag_named_in_prose_is_one_a_command_has(doc):
    known = _known_flags()
    unknown = [flag for flag in _prose_flags((REPO / doc).read_text()) if flag not in known]
    assert unknown == [], f"{doc} names flags no command has: {unknown}"
