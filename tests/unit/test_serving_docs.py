"""docs/serving.md's Settings table against ServeSettings: every field named with the
code's default, so the list cannot drift from the code again."""
import dataclasses
import re
from pathlib import Path

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
