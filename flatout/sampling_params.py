"""SamplingParams: how to pick tokens and when to stop, validated with errors naming the field."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Any

_GREEDY_EPS = 1e-5


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range; `field` names it."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """Constrain a sequence's output to a grammar (vLLM's field names); exactly one of `json`,
    `regex`, `choice`, `grammar`, `json_object` or `structural_tag` is set. `field` names the
    request field the constraint came from, so that a grammar the engine cannot compile is
    reported against it.

    A reasoning model's output starts inside `<think>`: then `after_token_id` is the id of
    `</think>`, and the grammar constrains only what follows it."""

    json: dict[str, Any] | bool | str | None = None  # a JSON schema (parsed, or its text)
    regex: str | None = None
    choice: list[str] | None = None  # the output is exactly one of these strings
    grammar: str | None = None  # an EBNF grammar (xgrammar's dialect, GBNF-like), rule `root`
    json_object: bool | None = None  # any JSON object
    # xgrammar's structural tag ({"type": "structural_tag", "format": {...}}): free text with
    # constrained parts, e.g. tool calls whose arguments follow their schemas (strict tools)
    structural_tag: dict[str, Any] | None = None
    field: str = "structured_outputs"
    after_token_id: int | None = None

    MAX_SPEC_CHARS = 1 << 20  # a schema's or grammar's text

    def __post_init__(self) -> None:
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as e:
                raise SamplingParamsError(self.field, f"the JSON schema is not JSON: {e}") from e
        self.validate()

    def validate(self) -> None:
        f = self.field
        given = [name for name in _KINDS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise SamplingParamsError(
                f, f"set exactly one of {', '.join(_KINDS)}"
                + (f", got {', '.join(given)}" if given else ""))
        if self.json is not None and not isinstance(self.json, dict | bool):
            raise SamplingParamsError(f, f"a JSON schema must be an object, got {self.json!r:.80}")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise SamplingParamsError(f, f"{name} must be a non-empty string")
        if self.choice is not None and (
                not isinstance(self.choice, list) or not self.choice
                or not all(isinstance(c, str) and c for c in self.choice)):
            raise SamplingParamsError(f, "choice must be a non-empty list of non-empty strings")
        tag = self.structural_tag
        if tag is not None and (not isinstance(tag, dict) or tag.get("type") != "structural_tag"):
            raise SamplingParamsError(f, 'a structural tag must be {"type": "structural_tag", '
                                      '"format": {...}}')
        if len(self.spec) > self.MAX_SPEC_CHARS:
            raise SamplingParamsError(f, f"at most {self.MAX_SPEC_CHARS} characters of grammar")
        t = self.after_token_id
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 0):
            raise SamplingParamsError("after_token_id", f"must be a token id, got {t!r}")

    @property
    def kind(self) -> str:
        """json, regex, choice, grammar, json_object or structural_tag."""
        for name in ("json", "regex", "choice", "grammar", "structural_tag"):
            if getattr(self, name) is not None:
                return name
        return "json_object"

    @property
    def spec(self) -> str:
        """The constraint as text: with `kind`, the key grammars are compiled and cached by."""
        if self.json is not None:
            return json.dumps(self.json, ensure_ascii=False)  # key order is the output's
        if self.choice is not None:
            return json.dumps(self.choice, ensure_ascii=False)
        if self.structural_tag is not None:
            return json.dumps(self.structural_tag, ensure_ascii=False)
        return self.regex or self.grammar or ""


@dataclass
class SamplingParams:
    """Per-request sampling settings (names and meanings as vLLM's and OpenAI's)."""

    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per generated token (0: sampled only)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # token id -> value added to its logit before sampling (OpenAI's logit_bias); -100 bans a
    # token in practice, +100 forces it
    logit_bias: dict[int, float] | None = None
    # the output follows a grammar: a JSON schema, a regex, a choice, EBNF (None: free text)
    structured_outputs: StructuredOutputsParams | None = None

    # the accepted ranges, checked in `validate`; the API's request bodies declare the same
    # (server/protocol.py), so /openapi.json states them
    MAX_N = 128
    MAX_LOGPROBS = 20
    MAX_TEMPERATURE = 100.0
    MAX_REPETITION_PENALTY = 10.0
    # the sampler divides positive logits by the penalty in float32 (then by a temperature down to
    # 1e-5): below this the penalised logits overflow to inf and the row's probabilities to NaN
    MIN_REPETITION_PENALTY = 1e-6
    MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-MAX_PENALTY, MAX_PENALTY]
    MIN_TOP_K = -1  # -1 or 0: no top-k
    MIN_SEED, MAX_SEED = -(2**63), 2**63 - 1  # the runner's generators take 64-bit seeds
    MAX_TOKEN_ID = 2**63 - 1  # stop token ids go into an int64 tensor
    MAX_LOGIT_BIAS = 100.0  # biases lie in [-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS]
    MAX_LOGIT_BIAS_TOKENS = 1024  # entries in one request's logit_bias

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    # -- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        def num(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
                raise SamplingParamsError(name, f"must be a number, got {v!r}")
            return float(v)

        def integer(name: str) -> int:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise SamplingParamsError(name, f"must be an integer, got {v!r}")
            return v

        if not 1 <= integer("n") <= self.MAX_N:
            raise SamplingParamsError("n", f"must be in [1, {self.MAX_N}], got {self.n}")
        t = num("temperature")
        if not 0.0 <= t <= self.MAX_TEMPERATURE:
            raise SamplingParamsError("temperature",
                                      f"must be in [0, {self.MAX_TEMPERATURE:g}], got {t}")
        p = num("top_p")
        if not 0.0 < p <= 1.0:
            raise SamplingParamsError("top_p", f"must be in (0, 1], got {p}")
        k = integer("top_k")
        if k < self.MIN_TOP_K:
            raise SamplingParamsError("top_k", f"must be -1, 0 (disabled) or >= 1, got {k}")
        mp = num("min_p")
        if not 0.0 <= mp <= 1.0:
            raise SamplingParamsError("min_p", f"must be in [0, 1], got {mp}")
        rp = num("repetition_penalty")
        if not self.MIN_REPETITION_PENALTY <= rp <= self.MAX_REPETITION_PENALTY:
            raise SamplingParamsError(
                "repetition_penalty", f"must be in [{self.MIN_REPETITION_PENALTY:g}, "
                f"{self.MAX_REPETITION_PENALTY:g}], got {rp}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = num(name)
            if not -self.MAX_PENALTY <= v <= self.MAX_PENALTY:
                raise SamplingParamsError(
                    name, f"must be in [-{self.MAX_PENALTY:g}, {self.MAX_PENALTY:g}], got {v}")
        # the runner seeds a generator with seed + sample index, which torch takes in 64 bits
        if self.seed is not None and not self.MIN_SEED <= integer("seed") <= self.MAX_SEED:
            raise SamplingParamsError("seed", f"must fit in 64 bits (signed), got {self.seed}")
        if self.max_tokens is not None and integer("max_tokens") < 1:
            raise SamplingParamsError("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if integer("min_tokens") < 0:
            raise SamplingParamsError("min_tokens", f"must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamsError(
                "min_tokens", f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )
        for s in self.stop or ():
            if not isinstance(s, str) or not s:
                raise SamplingParamsError("stop", f"must be non-empty strings, got {s!r}")
        for tid in self.stop_token_ids or ():
            # the sampler puts them in an int64 tensor (ids past the vocabulary are ignored)
            if (isinstance(tid, bool) or not isinstance(tid, int)
                    or not 0 <= tid <= self.MAX_TOKEN_ID):
                raise SamplingParamsError("stop_token_ids", f"must be token ids >= 0, got {tid!r}")
        self._validate_logit_bias()
        so = self.structured_outputs
        if so is not None:
            if not isinstance(so, StructuredOutputsParams):
                raise SamplingParamsError("structured_outputs",
                                          f"must be StructuredOutputsParams, got {so!r:.80}")
            if self.min_tokens:  # its ban of the stop ids would fight the grammar's end
                raise SamplingParamsError(
                    "min_tokens", "cannot be combined with structured outputs (the grammar "
                    "decides where the output ends)")
        if self.logprobs is not None:
            lp = integer("logprobs")
            if not 0 <= lp <= self.MAX_LOGPROBS:
                raise SamplingParamsError(
                    "logprobs", f"must be in [0, {self.MAX_LOGPROBS}], got {lp}"
                )

    def _validate_logit_bias(self) -> None:
        bias = self.logit_bias
        if bias is None:
            return
        if not isinstance(bias, dict):
            raise SamplingParamsError("logit_bias", f"must map token ids to numbers, got {bias!r}")
        if len(bias) > self.MAX_LOGIT_BIAS_TOKENS:
            raise SamplingParamsError(
                "logit_bias", f"at most {self.MAX_LOGIT_BIAS_TOKENS} tokens, got {len(bias)}")
        m = self.MAX_LOGIT_BIAS
        for tid, v in bias.items():
            if (isinstance(tid, bool) or not isinstance(tid, int)
                    or not 0 <= tid <= self.MAX_TOKEN_ID):
                raise SamplingParamsError("logit_bias", f"keys must be token ids >= 0, got {tid!r}")
            if (isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v)
                    or not -m <= v <= m):
                raise SamplingParamsError(
                    "logit_bias", f"values must be numbers in [-{m:g}, {m:g}], got {v!r} for "
                    f"token {tid}")

    def check_token_ids(self, vocab_size: int) -> None:
        """Token ids the model must know: logit_bias keys within [0, vocab_size)."""
        bad = next((t for t in self.logit_bias or () if t >= vocab_size), None)
        if bad is not None:
            raise SamplingParamsError(
                "logit_bias", f"token id {bad} is outside the vocabulary [0, {vocab_size})")

    # -- derived ----------------------------------------------------------------------------
    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @classmethod
    def from_defaults(cls, defaults: dict[str, object], **overrides: object) -> SamplingParams:
        """Build params from generation_config.json `defaults`, with `overrides` (the fields a
        caller set explicitly) taking precedence. Unknown default keys are ignored; unknown
        override keys raise."""
        names = {f.name for f in fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise SamplingParamsError(sorted(unknown)[0], "unknown sampling parameter")
        values = {k: v for k, v in defaults.items() if k in names}
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]
