"""In-process generation with transformers, batched across concurrent requests.

Requests arrive one coroutine at a time; a collector groups those that share decoding settings
into one left-padded `generate` call, so K samples × many questions become a few batches.

A request's constraint (a `Grammar` or a `Choice`) is compiled by llguidance into per-token masks; the
backend knows no task or tag, only the grammar it is given. Measured on SmolLM2-135M: unconstrained it
almost never emits an action tag; under the action grammar every message parses.

A request that offers `tools` is rendered with them (`chat_templates`: the model's own template when it renders
tools, else the shipped tool-calling one), and the `<tool_call>` blocks of its completion come back as the
OpenAI-form `tool_calls` a served model's parser would return.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from functools import cached_property
from pathlib import Path

from swirl_core.llm.base import ChatRequest, Choice, Grammar, LLMError
from swirl_core.llm.chat_templates import ToolTemplate, parse_tool_call_blocks, shipped_template, template_messages, tool_template
from swirl_core.records import LLMResponse

_models: dict[str, tuple[object, object]] = {}
_models_lock = threading.Lock()


def load_model(path: Path, device: str | None = None):
    """Load (once per process) a causal LM and its tokenizer; Dask workers reuse it across shards."""
    key = f"{path}@{device}"
    with _models_lock:
        if key not in _models:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            # Dask workers start with OMP_NUM_THREADS=1; an in-process model should use the cores.
            torch.set_num_threads(int(os.environ.get("SWIRL_TORCH_THREADS", os.cpu_count() or 1)))
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
            tokenizer = AutoTokenizer.from_pretrained(path)
            tokenizer.padding_side = "left"
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
            _models[key] = (model, tokenizer)
        return _models[key]


MIN_SHARED_PREFIX = 32  # below this, prefix caching is not worth a cache copy


def choice_lark(options: tuple[str, ...]) -> str:
    return "start: " + " | ".join(json.dumps(o) for o in options) + "\n"


def grammar_tokenizer(tokenizer):
    """The tokenizer as llguidance sees it (about a second to build: once per backend)."""
    import llguidance.hf

    return llguidance.hf.from_tokenizer(tokenizer)


class GrammarProcessor:
    """A logits processor: every row's reply matches one grammar, compiled by llguidance.

    One matcher per row consumes the row's tokens; its mask allows exactly the tokens that keep the reply in
    the grammar (end-of-sequence once it is complete). Where the grammar leaves a single continuation (a
    closing tag), the row gets its canonical tokens, so forced text costs the fewest tokens of the budget.
    """

    def __init__(self, lltok, grammar: str) -> None:
        import llguidance

        self.lltok = lltok
        self.grammar = llguidance.grammar_from("lark", grammar)
        self.matchers: list | None = None

    def __call__(self, input_ids, scores):
        import llguidance
        import numpy as np
        import torch

        batch, vocab = scores.shape
        if self.matchers is None:  # the first call: only the prompt so far
            self.matchers = [llguidance.LLMatcher(self.lltok, self.grammar) for _ in range(batch)]
            for m in self.matchers:
                if m.is_error():
                    raise ValueError(f"grammar does not compile: {m.get_error()}")
        else:
            for m, token in zip(self.matchers, input_ids[:, -1].tolist()):
                if not m.is_stopped():
                    m.consume_token(token)
        bitmask = torch.zeros((batch, (self.lltok.vocab_size + 31) // 32), dtype=torch.int32)  # 32 tokens a word
        forced: list[tuple[int, int]] = []
        for row, m in enumerate(self.matchers):
            ff = [] if m.is_stopped() or m.is_error() else m.compute_ff_tokens()
            if ff:
                forced.append((row, ff[0]))
            elif not m.is_error():
                words = bitmask[row]
                m.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")  # token i: bit i % 32 of word i // 32
        allowed = torch.zeros((batch, vocab), dtype=torch.bool)  # tokens beyond the tokenizer's vocabulary: never
        n = min(vocab, self.lltok.vocab_size)
        allowed[:, :n] = torch.from_numpy(bits[:, :n]).bool()
        for row, token in forced:
            allowed[row] = False
            allowed[row, token] = True
        for row, m in enumerate(self.matchers):
            if m.is_error():  # cannot happen while the mask is honoured; end the row rather than corrupt it
                allowed[row] = False
                allowed[row, self.lltok.eos_token] = True
        return scores.masked_fill(~allowed.to(scores.device), float("-inf"))


class TransformersBackend:
    name = "transformers"

    def __init__(self, model_path: Path, *, max_batch: int = 16, batch_wait_s: float = 0.05, device: str | None = None) -> None:
        self.model_path = Path(model_path)
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.device = device
        self._pending: list[tuple[ChatRequest, asyncio.Future]] = []
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self.batches: list[int] = []  # batch sizes, for benchmarks and tests
        self._choice_owners: dict = {}
        self._prefix_caches: dict[tuple[int, ...], object] = {}

    @cached_property
    def _model(self):
        return load_model(self.model_path, self.device)

    @cached_property
    def _grammar_tokenizer(self):
        return grammar_tokenizer(self._model[1])

    @cached_property
    def _tool_template(self) -> str | None:
        """The chat template that renders tools: None for the model's own, else the shipped one's text."""
        return None if tool_template(self._model[1]) == ToolTemplate.MODEL else shipped_template()

    def _prompt(self, request: ChatRequest) -> str:
        _, tok = self._model
        if not request.tools:
            return tok.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
        return tok.apply_chat_template(template_messages(request.messages), tools=request.tools, add_generation_prompt=True,
                                       tokenize=False, chat_template=self._tool_template)

    @cached_property
    def _token_strings(self) -> list[str]:
        _, tok = self._model
        return [tok.decode([i]) for i in range(len(tok))]

    async def complete(self, request: ChatRequest, timeout_s: float) -> LLMResponse:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = loop.create_task(self._collect())
        future = loop.create_future()
        self._pending.append((request, future))
        self._wakeup.set()
        return await future

    async def _collect(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await asyncio.sleep(self.batch_wait_s)  # let concurrent callers join the batch
            while self._pending:
                group_key = _group_key(self._pending[0][0])
                batch = [item for item in self._pending if _group_key(item[0]) == group_key][: self.max_batch]
                for item in batch:
                    self._pending.remove(item)
                try:
                    responses = await asyncio.to_thread(self._generate, [r for r, _ in batch])
                except Exception as exc:  # one failed batch must not strand its callers
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(LLMError(f"local generation failed: {exc}"))
                    continue
                for (_, fut), resp in zip(batch, responses):
                    if not fut.done():
                        fut.set_result(resp)

    def _generate(self, requests: list[ChatRequest]) -> list[LLMResponse]:
        import torch

        model, tok = self._model
        first = requests[0]
        started = time.perf_counter()
        prompts = [self._prompt(r) for r in requests]
        enc = self._encode(prompts)
        prompt_len = enc["input_ids"].shape[1]
        kwargs = dict(max_new_tokens=first.max_tokens, pad_token_id=tok.pad_token_id)
        if first.temperature > 0:
            kwargs.update(do_sample=True, temperature=first.temperature, top_p=first.top_p or 1.0)
        else:
            kwargs.update(do_sample=False)
        constraint = first.constraint
        choice = constraint if isinstance(constraint, Choice) else None
        if isinstance(constraint, Grammar):
            processor = GrammarProcessor(self._grammar_tokenizer, constraint.lark)
        elif choice is not None:
            processor = GrammarProcessor(self._grammar_tokenizer, choice_lark(choice.options))
            kwargs.update(output_scores=True, return_dict_in_generate=True)
        elif constraint is not None:
            raise LLMError(f"an in-process model cannot apply a {constraint.kind} constraint")
        else:
            processor = None
        if processor is not None:
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList([processor])
        elif first.stop:
            kwargs.update(stop_strings=first.stop, tokenizer=tok)
        # Seeded from the requests themselves: a rerun of the same batch samples the same text.
        torch.manual_seed(int(first.key()[:8], 16) ^ len(requests))
        with torch.inference_mode():
            out = model.generate(**enc, **kwargs)
        enc.pop("cache", None)
        probs = self._choice_probs(out.scores[0], choice.options) if choice else [None] * len(requests)
        if choice:
            out = out.sequences
        elapsed = time.perf_counter() - started
        self.batches.append(len(requests))
        responses = []
        for row, request in enumerate(requests):
            new = out[row, prompt_len:]
            n_new = int((new != tok.pad_token_id).sum())
            text = tok.decode(new, skip_special_tokens=True)
            finish = "stop" if n_new < first.max_tokens else "length"
            calls = None
            if request.tools:  # ids from the request's key: unique in the conversation, the same on a rerun
                text, calls = parse_tool_call_blocks(text, f"call_{request.key()[:12]}")
            responses.append(
                LLMResponse(
                    text=text, tool_calls=calls, finish_reason="tool_calls" if calls and finish == "stop" else finish, prompt_tokens=int(enc["attention_mask"][row].sum()),
                    completion_tokens=n_new, cost_usd=0.0, latency_s=elapsed, model=request.model,
                    choice_probs=probs[row],
                )
            )
        return responses

    def _choice_probs(self, first_scores, choices: tuple[str, ...]) -> list[dict[str, float]]:
        """Each choice's probability at the first generated token: the mass of the allowed tokens that
        begin only that choice, renormalised over the choices (the grammar has already masked the rest)."""
        import torch

        key = (choices, first_scores.shape[1])
        if key not in self._choice_owners:
            owner: dict[str, list[int]] = {}
            for i, s in enumerate(self._token_strings[: first_scores.shape[1]]):
                starts = [c for c in choices if s and c.startswith(s)]
                if len(starts) == 1:
                    owner.setdefault(starts[0], []).append(i)
            self._choice_owners[key] = owner
        owner = self._choice_owners[key]
        p = torch.softmax(first_scores.float(), dim=-1)
        mass = torch.stack([p[:, owner.get(c, [])].sum(dim=-1) for c in choices], dim=-1)
        mass = mass / mass.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        return [{c: round(float(v), 6) for c, v in zip(choices, row, strict=True)} for row in mass]

    def _encode(self, prompts: list[str]) -> dict:
        """Tokenize a batch, reusing the KV cache of the prefix all prompts share.

        Policy and judge prompts repeat the same instructions and demonstrations (hundreds of
        tokens); prefilling them once per prefix instead of once per row is most of the CPU time
        saved. Rows are laid out as [shared prefix][padding][own suffix]; positions come from the
        attention mask, so the padding in the middle is invisible to the model.
        """
        import copy

        import torch

        model, tok = self._model
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        shared = _common_prefix_len(ids) - 1  # every row keeps at least one uncached token
        if shared < MIN_SHARED_PREFIX:
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            return dict(enc.to(model.device))
        prefix = tuple(ids[0][:shared])
        cache = self._prefix_caches.get(prefix)
        if cache is None:
            with torch.inference_mode():
                cache = model(input_ids=torch.tensor([prefix], device=model.device), use_cache=True).past_key_values
            if len(self._prefix_caches) >= 4:
                self._prefix_caches.pop(next(iter(self._prefix_caches)))
            self._prefix_caches[prefix] = cache
        cache = copy.deepcopy(cache)
        cache.batch_repeat_interleave(len(ids))
        width = max(len(x) for x in ids) - shared
        pad = tok.pad_token_id
        input_ids = [list(prefix) + [pad] * (width - len(x) + shared) + x[shared:] for x in ids]
        mask = [[1] * shared + [0] * (width - len(x) + shared) + [1] * (len(x) - shared) for x in ids]
        return {
            "input_ids": torch.tensor(input_ids, device=model.device),
            "attention_mask": torch.tensor(mask, device=model.device),
            "cache": cache,
        }

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None


def _common_prefix_len(rows: list[list[int]]) -> int:
    first = rows[0]
    n = min(len(r) for r in rows)
    for other in rows[1:]:
        i = 0
        while i < n and other[i] == first[i]:
            i += 1
        n = i
    return n


def _group_key(r: ChatRequest) -> tuple:
    return (r.temperature, r.top_p, r.max_tokens, r.constraint, tuple(r.stop or ()))

