"""Replicas of `flatout serve` under Ray Serve: each replica starts one server on its GPUs and
forwards requests to it. `serve run examples.ray_serve:app` (Ray's own HTTP proxy balances).

    MODEL=/models/glm-4-9b-chat-hf TP=2 serve run examples.ray_serve:app
"""

from __future__ import annotations

import os
import socket
import subprocess
import time

import httpx
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

TP = int(os.environ.get("TP", "1"))


@serve.deployment(num_replicas=2, ray_actor_options={"num_gpus": TP})
class FlatoutReplica:
    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(["flatout", "serve", "--model", os.environ["MODEL"],
                                      "--tensor-parallel-size", str(TP), "--port",
                                      str(self.port)])
        self.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", timeout=None)
        while True:  # ready when /health answers
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)

    async def __call__(self, request: Request) -> Response:
        r = await self.client.request(request.method, request.url.path,
                                      content=await request.body(),
                                      headers={"content-type": "application/json"})
        return Response(r.content, status_code=r.status_code, media_type=r.headers.get(
            "content-type"))


app = FlatoutReplica.bind()
