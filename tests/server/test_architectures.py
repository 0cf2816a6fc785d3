"""`flatout serve` on a tiny checkpoint of every supported architecture (no tokenizer: prompts
and results as token ids): greedy tokens over HTTP equal the offline engine's."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from flatout import LLM, SamplingParams
from tests.helpers.tiny_checkpoints import ARCHITECTURES, make_tiny_checkpoint
from tests.server.server_process import ServerProcess

PROMPTS = [[5, 17, 42, 99, 7, 150, 3 + 1], [200, 11, 12]]


def _ids(logprobs: object) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in logprobs.tokens]  # type: ignore[attr-defined]


# Glm4ForCausalLM is the demo model's architecture, served by the other modules
@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a != "Glm4ForCausalLM"])
def test_greedy_over_http_equals_offline(arch: str, tmp_path: Path) -> None:
    path = make_tiny_checkpoint(arch, tmp_path / arch.lower())
    server = ServerProcess(["--model", str(path), "--num-kv-blocks", "64"], tmp_path / "log",
                           wait=False)
    try:
        llm = LLM(str(path), num_kv_blocks=64)  # the oracle, computed while the server boots
        params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        expected = [o.token_ids for o in llm.generate(PROMPTS, params)]
        del llm
        server.wait()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY", max_retries=0)
        r = client.completions.create(model=arch.lower(), prompt=PROMPTS, max_tokens=10,
                                      temperature=0, logprobs=0, extra_body={"ignore_eos": True})
        assert [_ids(c.logprobs) for c in r.choices] == expected
        assert r.usage.completion_tokens == 20

        stream = client.completions.create(model=arch.lower(), prompt=PROMPTS[0], max_tokens=10,
                                           temperature=0, logprobs=0, stream=True,
                                           extra_body={"ignore_eos": True})
        streamed = [i for c in stream if c.choices[0].logprobs for i in _ids(c.choices[0].logprobs)]
        assert streamed == expected[0]

        # no tokenizer, so no text: still one chunk per generated token, so that clients can
        # time them
        bare = client.completions.create(model=arch.lower(), prompt=PROMPTS[0], max_tokens=10,
                                         temperature=0, stream=True,
                                         extra_body={"ignore_eos": True})
        chunks = [c for c in bare if c.choices]
        assert len(chunks) == 10 and all(c.choices[0].text == "" for c in chunks)
        # echo of token ids without a tokenizer: no text either (it used to answer 500)
        echoed = client.completions.create(model=arch.lower(), prompt=PROMPTS[1], max_tokens=2,
                                           temperature=0, echo=True)
        assert echoed.choices[0].text == ""

        with pytest.raises(openai.BadRequestError, match="chat template"):
            client.chat.completions.create(model=arch.lower(),
                                           messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.BadRequestError, match="token ids"):
            client.completions.create(model=arch.lower(), prompt="text needs a tokenizer")
    finally:
        server.stop()
