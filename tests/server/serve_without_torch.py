"""`python -m tests.server.serve_without_torch serve ...`: flatout's CLI in a process where
`import torch` (and triton) raises. Only this process is so restricted: the engine core process
that it spawns imports this module as `__mp_main__`, which skips the block below."""

from __future__ import annotations

import sys

if __name__ == "__main__":
    for name in ("torch", "triton"):
        sys.modules[name] = None  # type: ignore[assignment]  # `import torch` raises ImportError
    from flatout.cli import main

    sys.exit(main())
