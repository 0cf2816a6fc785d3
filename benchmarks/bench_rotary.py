"""Rotary kernel alone at GLM-4-9B's shapes (32 q heads, 2 KV heads, head dim 128, rotary 64,
interleaved; q and k views into the fused qkv output), timed as a replayed CUDA graph, for the
source tree on PYTHONPATH:

    PYTHONPATH=TREE python benchmarks/bench_rotary.py LABEL

Prints `LABEL {tokens: us}`."""
import json
import sys

import torch
from triton.testing import do_bench_cudagraph

from flatout.kernels.rotary import rotary_embedding

dev = torch.device("cuda")
H, KVH, D, R = 32, 2, 128, 64
cache = torch.randn(32768, R, device=dev)
out = {}
for t in (1, 8, 32, 128, 256, 1024, 8192):
    qkv = torch.randn(t, (H + 2 * KVH) * D, dtype=torch.bfloat16, device=dev)
    q, k = qkv[:, : H * D], qkv[:, H * D : (H + KVH) * D]
    pos = torch.randint(0, 32768, (t,), device=dev)
    torch.cuda.synchronize()
    out[t] = round(do_bench_cudagraph(
        lambda q=q, k=k, pos=pos: rotary_embedding(pos, q, k, cache, D, True), rep=20) * 1e3, 2)
print(sys.argv[1], json.dumps(out), flush=True)
