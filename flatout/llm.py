"""Offline API: `LLM(model, **engine_args).generate(prompts, sampling_params)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from typing import Any, cast

from flatout.config import EngineArgs
from flatout.engine.llm_engine import LLMEngine, RequestError
from flatout.engine.outputs import OutputAccumulator, RequestOutput
from flatout.multimodal.image_io import ImageError, data_url_bytes, decode_image
from flatout.sampling_params import SamplingParams

Prompt = str | list[int]
# {"prompt": str | list[int], "multi_modal_data": {"image": image or [images]}}: each image
# (PIL image or [H, W, 3] uint8 array) goes to the prompt's next image placeholder (GLM-4.1V's
# <|image|>, GLM-4V-9B's <|begin_of_image|><|endoftext|><|end_of_image|>)
MultiModalPrompt = dict[str, Any]
Message = dict[str, Any]


class LLM:
    """Generate with continuous batching, in this process.

    `model` is a checkpoint folder, a preset name with `load_format="dummy"` (e.g. "glm-4-9b"),
    or None for the built-in demo model. Keyword arguments are `EngineArgs` fields, named as
    vLLM's (max_num_seqs, max_num_batched_tokens, max_model_len, block_size,
    enable_prefix_caching, gpu_memory_utilization, dtype, seed, load_format, ...).
    """

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        unknown = set(engine_args) - set(EngineArgs.field_names())
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(sorted(unknown))}")
        self.engine = LLMEngine(EngineArgs(model=model, **engine_args))
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Release the engine: stop its tensor-parallel worker processes, leave their process
        group, free the model and the KV cache (idempotent). Another `LLM` can then start in
        this process, with any tensor_parallel_size. Deleting the last reference to an `LLM`,
        leaving a `with LLM(...) as llm:` block and interpreter exit do the same."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return self.engine.default_sampling_params()

    def generate(
        self,
        prompts: Prompt | MultiModalPrompt | Seq[Prompt | MultiModalPrompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One output per prompt, in order. Every prompt is checked before any is queued, so a
        bad one leaves the engine untouched."""
        if isinstance(prompts, str | dict) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"got {len(params_list)} sampling params for {len(prompts)} prompts"
                )
        engine = self.engine
        processed = []
        for prompt, params in zip(prompts, params_list, strict=True):
            text_or_ids, images = _split_prompt(prompt)
            processed.append(engine.inputs.process(text_or_ids, params, images))
        accumulators: dict[str, OutputAccumulator] = {}
        try:
            for prompt, params in zip(processed, params_list, strict=True):
                rid = f"offline-{next(self._ids)}"
                engine.add_request(rid, prompt, params)
                accumulators[rid] = OutputAccumulator(params.n)
            return self._run(accumulators)
        except BaseException:
            for rid in accumulators:
                engine.abort_request(rid)
            raise

    def _run(self, accumulators: dict[str, OutputAccumulator]) -> list[RequestOutput]:
        """Step until every request in `accumulators` is finished, joining their deltas."""
        pending = set(accumulators)
        while pending:
            for delta in self.engine.step():
                acc = accumulators.get(delta.request_id)
                if acc is None:
                    continue
                acc.add(delta)
                if delta.finished:
                    pending.discard(delta.request_id)
            if pending and not self.engine.core.has_unfinished():
                raise RuntimeError("engine idle with requests pending")  # scheduler invariant
        return [acc.result() for acc in accumulators.values()]

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | None = None,
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Apply the checkpoint's chat template to one conversation (or a list of them) and
        generate a reply for each. A message's content may be a list of parts: {"type": "text",
        "text": ...}, {"type": "image", "image": PIL image or [H, W, 3] uint8 array} or
        {"type": "image_url", "image_url": {"url": "data:image/...;base64,..."}} (vision
        models); the parts are joined by newlines, each image as its placeholder text."""
        tok = self.engine.tokenizer
        if tok is None:
            raise RequestError("this model has no tokenizer, so no chat template")
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts: list[Prompt | MultiModalPrompt] = []
        for conv in conversations:
            images: list[Any] = []
            conv = [self._flatten_parts(m, images) for m in cast(list[Message], conv)]
            text = tok.apply_chat_template(
                conv,
                chat_template=chat_template,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                **(chat_template_kwargs or {}),
            )
            ids = tok.encode(text, add_special_tokens=False)
            prompts.append({"prompt": ids, "multi_modal_data": {"image": images}} if images
                           else ids)
        return self.generate(prompts, sampling_params)

    def _flatten_parts(self, message: Message, images: list[Any]) -> Message:
        """The message with list content as one string; its images appended to `images`."""
        content = message.get("content")
        if not isinstance(content, list):
            return message
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(part["text"])
                continue
            placeholder = self.engine.inputs.image_placeholder
            if kind not in ("image", "image_url") or placeholder is None:
                raise RequestError(f"content[{j}]: part of type {kind!r} is not supported by "
                                   f"this model")
            if kind == "image":
                images.append(part["image"])
            else:
                try:
                    images.append(decode_image(data_url_bytes(part["image_url"]["url"])))
                except ImageError as e:
                    raise RequestError(f"content[{j}]: {e}") from None
            texts.append(placeholder)
        return {**message, "content": "\n".join(texts)}


def _split_prompt(prompt: Prompt | MultiModalPrompt) -> tuple[Prompt, list[Any] | None]:
    """(prompt, images) of a plain or multimodal prompt (ValueError naming a bad key)."""
    if not isinstance(prompt, dict):
        return prompt, None
    unknown = set(prompt) - {"prompt", "multi_modal_data"}
    if unknown or "prompt" not in prompt:
        raise ValueError(f"a prompt dict takes 'prompt' and 'multi_modal_data' (got "
                         f"{sorted(prompt)})")
    data = prompt.get("multi_modal_data") or {}
    if set(data) - {"image"}:
        raise ValueError(f"multi_modal_data supports 'image' only (got {sorted(data)})")
    images = data.get("image")
    if images is not None and not isinstance(images, list | tuple):
        images = [images]
    return prompt["prompt"], list(images) if images is not None else None
