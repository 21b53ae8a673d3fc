"""How fast each ``diffgr2`` subcommand answers: ``--help``, a bad value and a missing path (wall seconds, one
subprocess each, as a user types them). Issue 20's targets: ``--help`` <= 1 s, bad-path/bad-value errors <= 2 s.

    python scripts/cli_latency.py            # prints a markdown table; exit status 1 if a target is missed
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from diffgr2_trl.cli import COMMANDS  # noqa: E402
from diffgr2_trl.commands._spec import SPEC_PATH  # noqa: E402

MISSING = "./does/not/exist"
PATH_OPTION = {"pipeline": "--data_dir", "prepare": "--data_dir", "convert": "--model_name_or_path",
               "generate": "--model_name_or_path", "evaluate": "--dataset_name", "cft": "--dataset_name",
               "opd": "--dataset_name", "grpo": "--dataset_name", "train-ar": "--dataset_name",
               "serve-teacher": "--model_name_or_path", "bench-decode": "--model_name_or_path",
               "bench-rl": "--model_name_or_path", "bench-copy": "--dataset_name"}


def _time(argv: list[str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    rc = subprocess.run([sys.executable, "-m", "diffgr2_trl.cli", *argv], capture_output=True).returncode
    return time.perf_counter() - t0, rc


def main() -> int:
    import json

    spec = json.loads(SPEC_PATH.read_text())["commands"]
    rows, missed = [], 0
    for name in COMMANDS:
        # a word where the command's first integer (else boolean) option expects a number
        option = next(o for kind in ("int", "string_to_bool") for o in spec[name]["options"] if o["type"] == kind)
        bad_value = [option["flags"][0], "two"]
        help_s, help_rc = _time([name, "--help"])
        bad_s, bad_rc = _time([name, *bad_value])
        path_s = path_rc = None
        if name in PATH_OPTION:
            path_s, path_rc = _time([name, PATH_OPTION[name], MISSING])
        ok = help_s <= 1 and help_rc == 0 and bad_s <= 2 and bad_rc == 2 and (path_s is None or (path_s <= 2 and path_rc == 2))
        missed += not ok
        rows.append(f"| {name} | {help_s:.2f} | {bad_s:.2f} (rc {bad_rc}) | "
                    + (f"{path_s:.2f} (rc {path_rc})" if path_s is not None else "-") + f" | {'yes' if ok else 'NO'} |")
    print(f"load average: {os.getloadavg()[0]:.2f}")
    print("| command | --help (s) | bad value (s) | missing path (s) | within target |\n|---|---|---|---|---|")
    print("\n".join(rows))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
