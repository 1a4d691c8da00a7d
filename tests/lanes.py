"""Run the whole suite as two pytest processes side by side: ``make test``.

Most of the suite's wall time is spent waiting (Ray and apps starting, training runs paced
by Ray Train's controller, multi-node clusters joining), not computing, so on a 2-core
machine two lanes finish well before one. The lanes share nothing they could race on:

- the **ray** lane holds every test that takes the shared in-process Ray (``ray_session``);
- the **solo** lane holds the rest: unit tests, in-process engines, and tests that start
  their own Ray (``maas up``, ``serve run``, ``ray start`` clusters) on private temp dirs
  and free ports.

Each lane has its own ``--basetemp``. The ray lane prints as it goes; the solo lane's output
is kept in a file and printed when it ends. The exit status is the first non-zero of the
two. Extra arguments go to both lanes (``make test PYTEST_ARGS="-x -q"``).

    python tests/lanes.py [pytest args...]
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(args: list[str]) -> int:
    root = Path(tempfile.mkdtemp(prefix="maas-lanes-"))
    log = root / "solo.log"
    pytest = [sys.executable, "-m", "pytest", *args]
    started = time.monotonic()
    with log.open("wb") as out:
        solo = subprocess.Popen([*pytest, "--lane", "solo", "--basetemp", str(root / "solo")],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        try:
            ray_code = subprocess.call([*pytest, "--lane", "ray", "--basetemp", str(root / "ray")],
                                       cwd=REPO)
            print(f"\n=== lane ray: exit {ray_code} after {time.monotonic() - started:.0f} s; "
                  "waiting for lane solo ===", flush=True)
            solo_code = solo.wait()
        except KeyboardInterrupt:
            solo.send_signal(signal.SIGINT)  # pytest stops and tears its fixtures down
            solo.wait()
            raise
    print(f"\n=== lane solo: exit {solo_code} after {time.monotonic() - started:.0f} s ===",
          flush=True)
    sys.stdout.buffer.write(log.read_bytes())
    sys.stdout.flush()
    # pytest exits 5 when a lane selects no test (e.g. -k matching only the other lane)
    codes = [c for c in (ray_code, solo_code) if c not in (0, 5)] or [min(ray_code, solo_code)]
    if codes == [0]:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"lanes: the test folders are kept in {root}", flush=True)
    return codes[0]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
