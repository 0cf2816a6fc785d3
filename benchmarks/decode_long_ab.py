"""A/B decode step timing at long context: GLM-4-9B (dummy weights) decode steps at batch x context
(1 x 32k, 32 x 4k, 64 x 8k; 40 generated tokens), twice each, for the source tree given (run it
once per tree, interleaved, so that both see the same GPU state):

    PYTHONPATH=OLD python benchmarks/decode_long_ab.py OLD before
    PYTHONPATH=NEW python benchmarks/decode_long_ab.py NEW after

Prints `LABEL {"BxCTX": [[step ms, event-timed busy fraction], ...]}`."""
import json
import sys

sys.path.insert(0, sys.argv[1] + "/benchmarks")
import torch
from decode_timing import steady_decode

from flatout import LLM, SamplingParams
from flatout.engine.messages import EngineCoreRequest

SHAPES = [(1, 32768), (32, 4096), (64, 8192)]
llm = LLM("glm-4-9b", load_format="dummy", max_model_len=32768 + 64, max_num_seqs=256,
          max_num_batched_tokens=16384, enable_prefix_caching=False)
core = llm.engine.core
g = torch.Generator().manual_seed(0)
out: dict = {}
for rep in range(2):
    for bs, ctx in SHAPES:
        for i in range(bs):
            p = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
            ids = torch.randint(100, 150000, (ctx,), generator=g).tolist()
            core.add_request(EngineCoreRequest(f"{rep}-{bs}-{ctx}-{i}", ids, p, 40))
        t = steady_decode(core)
        out.setdefault(f"{bs}x{ctx}", []).append((round(t["step_ms"], 3),
                                                  round(t["gpu_busy_events"], 3)))
print(sys.argv[2], json.dumps(out), flush=True)
