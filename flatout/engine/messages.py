"""Every message between the API process and the engine core, and the errors of that seam.

The API process (server, async_client.py) and the engine core (engine_core.py, run in its own
process by core_process.py, or in the caller's by the offline LLM) exchange only these small
dataclasses. They are pickled over multiprocessing pipes that only our two processes hold:
nothing a client sends is ever unpickled; client data crosses only as plain fields of these
messages, after the server has validated it. This module imports no torch, so the API process
never loads it.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from flatout.config import CacheConfig, ModelConfig
from flatout.engine.batch import MultiModalItem as MultiModalItem  # defined beside the rows
from flatout.monitor.step_clock import StepTotals
from flatout.sampling_params import SamplingParams


# -- token-level results --------------------------------------------------------------------
class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"  # cancelled by the caller


@dataclass
class TokenLogprobs:
    """Logprob of one generated token and the top alternatives (raw model distribution)."""

    token_id: int
    logprob: float
    top: dict[int, float]  # token id -> logprob, best first
    # the text this token added to the output's text, set by the output processor: the whole of
    # a character goes to the token that completes it ('' for the tokens before), a stop token
    # adds ''. None without a tokenizer.
    text: str | None = None


# -- API process -> engine core ---------------------------------------------------------------
@dataclass
class EngineCoreRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved by the caller's validation
    eos_token_ids: tuple[int, ...] = ()  # from the config, generation config and tokenizer
    arrival_time: float = field(default_factory=time.monotonic)
    mm_items: list[MultiModalItem] = field(default_factory=list)  # in prompt order


@dataclass
class AbortRequest:
    request_id: str
    index: int | None = None  # one sample of the request, or all of them


@dataclass
class Shutdown:
    pass


# -- engine core -> API process ---------------------------------------------------------------
@dataclass
class EngineCoreOutput:
    """What one sequence produced in one step (only sequences that produced a token)."""

    request_id: str
    index: int
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    queue_time: float | None = None  # seconds from arrival to first scheduling, on the 1st token


@dataclass
class EngineStats:
    """The core's running counters."""

    num_steps: int = 0
    num_prefill_tokens: int = 0  # prompt (and recomputed) tokens actually computed
    num_decode_tokens: int = 0
    num_generated_tokens: int = 0


@dataclass
class CoreReady:
    model_config: ModelConfig
    cache_config: CacheConfig
    device: str
    load_seconds: float


@dataclass
class CoreStats:
    """A snapshot of the core's state after a step, for /metrics."""

    num_running: int = 0
    num_waiting: int = 0
    num_used_blocks: int = 0
    num_blocks: int = 0
    num_preemptions: int = 0
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    num_steps: int = 0
    step_batch_size: int = 0  # sequences in the last step
    timestamp: float = field(default_factory=time.time)
    # device time and work of finished steps by type (prefill/decode/mixed), and the device's
    # peaks, for the busy fraction and MBU/MFU (see flatout/monitor/step_clock.py)
    step_totals: dict[str, StepTotals] = field(default_factory=dict)
    peak_bandwidth: float = 0.0
    peak_flops: float = 0.0


@dataclass
class CoreOutputs:
    outputs: list[EngineCoreOutput]
    stats: CoreStats


@dataclass
class CoreFailed:
    message: str


@dataclass
class CoreRejected:
    """The core could not take one request (it is not queued; nothing else is affected)."""

    request_id: str
    message: str
    # the request field at fault (a grammar that does not compile): the client's mistake, not
    # the engine's; None: the engine could not take it
    field: str | None = None


# -- errors -------------------------------------------------------------------------------------
class RequestError(ValueError):
    """A request that can never be served (too long, bad prompt); raised at submission."""


class RequestFieldError(RequestError):
    """A request field the engine core found invalid (a grammar that does not compile)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class EngineDeadError(RuntimeError):
    """The engine core process is gone (or was stopped because it hung)."""


class EngineRequestError(RuntimeError):
    """The engine core refused one request."""


class RequestTimeoutError(TimeoutError):
    """A request ran past its deadline."""


class ConsumerTooSlowError(RuntimeError):
    """A request's outputs piled up unread past the backlog limit: its consumer (a streaming
    client that stopped reading) is treated as gone and the request was aborted."""
