"""docs/serving.md's Settings table against ServeSettings: every field named with the
code's default, so the list cannot drift from the code again."""
import dataclasses
import os
import re
import subprocess
from pathlib import Path

import yaml

from orchestrator.serving.settings import ServeSettings

DOC = Path(__file__).resolve().parents[2] / "docs" / "serving.md"


def settings_rows() -> dict[str, str]:
    """Each setting the Settings table names -> its default column (a row naming two
    settings, `a`, `b` with "x, y", gives each its own)."""
    section = DOC.read_text().split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`(\w+)`", cells[0])
        defaults = [d.strip() for d in cells[1].split(",")] if len(names) > 1 else [cells[1]]
        rows.update(zip(names, defaults))
    return rows


def shown(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value) if value != "" else '""'


def test_every_serve_setting_is_in_the_docs_with_its_code_default():
    rows = settings_rows()
    fields = {f.name: f.default for f in dataclasses.fields(ServeSettings)}
    assert sorted(set(fields) - set(rows)) == [], "not in docs/serving.md's Settings table"
    assert sorted(set(rows) - set(fields)) == [], "in the table but not a ServeSettings field"
    for name, default in fields.items():
        assert rows[name].split(" (")[0] == shown(default), name


def documented_autoscaling_check() -> str:
    """The one-line check of a serve_config.yaml's autoscaling_config that docs/serving.md
    gives (the `python -c` line after "To check your own copy of the file")."""
    after = DOC.read_text().split("To check\nyour own copy of the file", 1)[1]
    return re.search(r"^python -c (\".*\")$", after, re.M).group(1)


def run_check(tmp_path, autoscaling) -> subprocess.CompletedProcess:
    """The documented check, run by a shell in a folder whose serve_config.yaml is the
    shipped one with the model deployment's autoscaling_config set to `autoscaling`."""
    config = yaml.safe_load((DOC.parents[1] / "serve_config.yaml").read_text())
    config["applications"][0]["deployments"][0]["autoscaling_config"] = autoscaling
    (tmp_path / "serve_config.yaml").write_text(yaml.safe_dump(config))
    return subprocess.run(f"python -c {documented_autoscaling_check()}", shell=True,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(DOC.parents[1])})


def test_the_documented_autoscaling_check_prints_what_serve_applies(tmp_path):
    """Serve takes the file's autoscaling_config whole: fields it leaves out take Serve's
    defaults, not the app settings' (target_ongoing_requests 2, not 16). The check printed
    the settings merged under it, a config Serve never ran, and passed fields that are no
    setting (look_back_period_s: -1) that Serve refuses at deploy."""
    from ray.serve.config import AutoscalingConfig

    partial = {"min_replicas": 1, "max_replicas": 4}
    checked = run_check(tmp_path, partial)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.strip() == str(AutoscalingConfig(**partial))
    refused = run_check(tmp_path, {**partial, "look_back_period_s": -1})
    assert refused.returncode != 0 and "look_back_period_s" in refused.stderr
    misspelt = run_check(tmp_path, {**partial, "max_replica": 5})  # (Serve drops it silently)
    assert misspelt.returncode != 0 and "did you mean 'max_replicas'" in misspelt.stderr
