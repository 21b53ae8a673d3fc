"""Rewrite the CLI's parser snapshot (diffgr2_trl/commands/cli_spec.json), or check that it is current.

    python scripts/cli_spec.py            # after changing a subcommand's options, or bumping TRL/transformers
    python scripts/cli_spec.py --check    # exit status 1 when the snapshot is stale

It lives here rather than in the package because it needs the CLI's table of subcommands, pipeline included, and
the package keeps ``diffgr2_trl.commands`` free of any reference to the pipeline.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from diffgr2_trl.cli import COMMANDS  # noqa: E402
from diffgr2_trl.commands._spec import SPEC_PATH, build_spec, write_spec  # noqa: E402


def main() -> int:
    if "--check" in sys.argv[1:]:
        current = json.loads(json.dumps(build_spec(COMMANDS), sort_keys=True))
        stored = json.loads(SPEC_PATH.read_text()) if SPEC_PATH.is_file() else None
        if current == stored:
            print("cli_spec.json is current")
            return 0
        print("cli_spec.json is stale: run python scripts/cli_spec.py")
        return 1
    print(f"wrote {write_spec(COMMANDS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
