"""Run in a subprocess by the lookup tests: ``python -m tests.lookups._worker MODE URLS_JSON ...``.

* ``race EMAIL ID``: insert one user with that email and id; prints ``won`` or ``refused``.
* ``crash EMAIL ID``: insert one user, killed by SIGKILL right after its lookup was committed
  and before its row was sent (the step is wrapped from outside, as a crash would hit it).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

from shardkit.errors import UniqueLookupError
from shardkit.lookups import _write

from .models import User, make_cluster


def main(argv: list[str]) -> int:
    mode, urls, email, uid = argv[0], json.loads(argv[1]), argv[2], int(argv[3])
    start_at = float(argv[4]) if len(argv) > 4 else 0.0
    cluster = make_cluster(urls)
    if mode == "crash":
        claim = _write.claim_rows

        def claim_then_die(session: Any, items: Any) -> None:
            claim(session, items)
            print("claimed", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

        _write.claim_rows = claim_then_die  # type: ignore[assignment]
    with cluster.session() as s:
        s.add(User(id=uid, email=email, name=f"p{uid}"))
        while time.time() < start_at:
            time.sleep(0.001)
        try:
            s.commit()
        except UniqueLookupError:
            print("refused", flush=True)
            return 0
    print("won", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
