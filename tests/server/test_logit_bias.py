"""logit_bias over real HTTP and offline: a +100 bias forces a token, -100 keeps the greedy token
out, and bad biases are 400s naming the field."""

from __future__ import annotations

import httpx
import openai
import pytest

from flatout import LLM, SamplingParams

PROMPT = "The quick brown fox jumps over the lazy dog. Then the fox"


@pytest.fixture(scope="module")
def client(demo_server) -> openai.OpenAI:  # noqa: ANN001
    return openai.OpenAI(base_url=f"{demo_server.url}/v1", api_key="EMPTY", max_retries=0,
                         timeout=120)


def _forced_token(llm: LLM) -> int:
    """A token greedy decoding of PROMPT would not produce first."""
    greedy = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1))[0].token_ids[0]
    return 100 if greedy != 100 else 101


def test_offline_bias_forces_a_token_and_bans_another(llm: LLM) -> None:
    forced = _forced_token(llm)
    out = llm.generate([PROMPT], SamplingParams(temperature=0.8, seed=1, max_tokens=6,
                                                ignore_eos=True, logit_bias={forced: 100}))[0]
    assert out.token_ids == [forced] * 6
    plain = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1))[0].token_ids[0]
    banned = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1,
                                                   logit_bias={plain: -100}))[0].token_ids[0]
    assert banned != plain
    vocab = llm.engine.model_config.vocab_size
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate([PROMPT], SamplingParams(logit_bias={vocab: 1.0}))


def test_http_bias_forces_a_token_in_completions_and_chat(client: openai.OpenAI,
                                                          llm: LLM) -> None:
    forced = _forced_token(llm)
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=4, temperature=0,
                                  logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == llm.get_tokenizer().decode([forced] * 4)
    chunks = list(client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True,
        logit_bias={str(forced): 100}, extra_body={"ignore_eos": True, "return_reasoning": False,
                                                    "skip_special_tokens": False},
        stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 4
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == llm.get_tokenizer().decode([forced] * 4, skip_special_tokens=False)


@pytest.mark.parametrize(("bias", "param"), [
    ({"5": 100.5}, "logit_bias"), ({"5": -101}, "logit_bias"), ({"x": 1}, "logit_bias"),
    ({"5": "1"}, "logit_bias"), ({"99999999": 1}, "logit_bias"), ([1, 2], "logit_bias"),
])
@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_bad_bias_is_a_400_naming_the_field(demo_server, endpoint: str, bias: object,  # noqa: ANN001
                                            param: str) -> None:
    body: dict[str, object] = {"max_tokens": 1, "logit_bias": bias}
    body |= {"prompt": "hi"} if endpoint == "completions" else {
        "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(f"{demo_server.url}/v1/{endpoint}", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"].startswith(param), err
