"""The container's HEALTHCHECK: exit 0 when GET /health answers 200, else 1 (one line on stderr).

Run as `python deploy/healthcheck.py` with the server's environment (ELAS_PORT, default 8000), so
the exec-form HEALTHCHECK needs no shell to find the port. Standard library only.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('ELAS_PORT', '8000')}/health"
    try:
        with urllib.request.urlopen(url, timeout=float(os.environ.get("ELAS_HEALTH_TIMEOUT", "2"))) as r:
            status = r.status
    except urllib.error.HTTPError as e:  # 503: draining, or the engine died
        status = e.code
    except (OSError, ValueError) as e:
        print(f"healthcheck: {url}: {e}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"healthcheck: {url} answered {status}", file=sys.stderr)
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
