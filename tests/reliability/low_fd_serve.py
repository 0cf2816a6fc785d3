"""`python -m tests.reliability.low_fd_serve serve ...`: flatout's CLI with its open-file limit
(soft and hard, so that the server cannot raise it) set to `$FLATOUT_TEST_FD_LIMIT`, to reach the
file-descriptor limit with a few hundred connections."""

from __future__ import annotations

import os
import resource
import sys

if __name__ == "__main__":
    limit = int(os.environ["FLATOUT_TEST_FD_LIMIT"])
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    from flatout.cli import main

    sys.exit(main())
