"""A/B decode step timing: GLM-4-9B (dummy weights) decode steps at batch 1, 32 and 256 (prompts of
512 tokens, 80 generated), three times each, for the source tree given (run it once per tree and
interleave the trees, so that both see the same GPU state):

    PYTHONPATH=OLD python benchmarks/decode_ab.py OLD before
    PYTHONPATH=NEW python benchmarks/decode_ab.py NEW after

Prints `LABEL {batch: [[step ms, event-timed busy fraction], ...]}`."""
import json
import sys

sys.path.insert(0, sys.argv[1] + "/benchmarks")
import torch
from decode_timing import steady_decode

from flatout import LLM, SamplingParams

try:
    from flatout.engine.messages import EngineCoreRequest
except ImportError:
    from flatout.engine.engine_core import EngineCoreRequest
llm = LLM("glm-4-9b", load_format="dummy", max_model_len=8192, max_num_seqs=256,
          max_num_batched_tokens=8192, enable_prefix_caching=False)
core = llm.engine.core
g = torch.Generator().manual_seed(0)
out = {}
for rep in range(3):
    for bs in (1, 32, 256):
        for i in range(bs):
            p = SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True)
            ids = torch.randint(100, 150000, (512,), generator=g).tolist()
            core.add_request(EngineCoreRequest(f"{rep}-{bs}-{i}", ids, p, 80))
        t = steady_decode(core)
        out.setdefault(bs, []).append((round(t["step_ms"], 3), round(t["gpu_busy_events"], 3)))
print(sys.argv[2], json.dumps(out))
