"""Print a work pool's base job template with new defaults for some of its variables.

    python infra/pool_template.py infra/work-pools/gpu-process.json repo_dir="$PWD" cuda_visible_devices=0 \\
        > /tmp/gpu-process.json
    prefect work-pool create gpu-process --type process --base-job-template /tmp/gpu-process.json --overwrite

A pool variable's default applies to every run of the pool that neither its deployment nor the run
overrides (see infra/README.md, section 2). VALUE is kept as text for a variable of type string and read
as JSON otherwise (``gpu_count=2``); a JSON object is merged key by key into an object default
(``env='{"HF_HOME": "/data/hf"}'`` keeps the template's ``PREFECT_LOGGING_EXTRA_LOGGERS``). An unknown
variable name fails (exit 2) and lists the template's variables. A ``repo_dir`` that is not a directory
on this machine is reported on stderr: a process worker on this host would crash every run.

Standard library only: it runs with or without Prefect installed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def set_defaults(template: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """``template`` with ``variables.properties[NAME].default`` set from each ``NAME=VALUE``.

    Raises:
        ValueError: an assignment without ``=``, an unknown variable or a value that is not JSON
            where the variable is not a string.
    """
    template = json.loads(json.dumps(template))  # a copy
    props = template["variables"]["properties"]
    for item in assignments:
        name, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r}: expected NAME=VALUE, e.g. repo_dir=/srv/evop")
        if name not in props:
            known = ", ".join(sorted(props))
            raise ValueError(f"{name!r} is not a variable of this template; it has: {known}")
        prop = props[name]
        types = {prop.get("type")} | {option.get("type") for option in prop.get("anyOf", [])}
        if "string" in types:
            value: Any = raw
        else:
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                raise ValueError(f"{name}: {raw!r} is not JSON (needed for a non-string variable)") from None
        if isinstance(value, dict) and isinstance(prop.get("default"), dict):
            value = {**prop["default"], **value}
        prop["default"] = value
    return template


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if args else 2
    try:
        template = json.loads(Path(args[0]).read_text())
        out = set_defaults(template, args[1:])
    except (OSError, ValueError) as err:
        print(f"pool_template: {err}", file=sys.stderr)
        return 2
    repo_dir = out["variables"]["properties"].get("repo_dir", {}).get("default")
    if repo_dir and not os.path.isdir(repo_dir):
        print(
            f"pool_template: note: repo_dir {repo_dir} is not a directory on this machine; a process worker "
            "on a host without it crashes every run (infra/README.md, section 6)",
            file=sys.stderr,
        )
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
