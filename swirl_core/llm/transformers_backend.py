"""In-process generation with transformers, batched across concurrent requests.

Requests arrive one coroutine at a time; a collector groups those that share decoding settings
into one left-padded `generate` call, so K samples × many questions become a few batches.

The `grammar` constraint makes a small model's message exactly one action tag with well-formed
content (see `ActionGrammar`). Measured on SmolLM2-135M: unconstrained it almost never emits a tag
(0 of 8 first steps); constrained, every message parses.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from functools import cached_property
from pathlib import Path

from swirl_core.llm.base import ChatRequest, LLMError
from swirl_core.records import LLMResponse

ACTION_OPEN_TAGS = ("<search_query>", "<math_exp>", "<answer>")

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


# Characters allowed inside each tag when decoding is constrained. Math stays arithmetic (the
# calculator rejects prose anyway); a math answer is a number; QA text is one line.
_MATH_CHARS = frozenset("0123456789.+-*/()^%, $")
_NUMBER_CHARS = frozenset("0123456789.,-$ /")
_LINE_FORBIDDEN = frozenset("<>\n")
MAX_CONSTRAINED_CONTENT = 200
CLOSE_BUDGET_TOKENS = 6  # tokens kept back to write the closing tag
MIN_SHARED_PREFIX = 32  # below this, prefix caching is not worth a cache copy


def _content_ok(tag: str, task_is_math: bool, text: str) -> bool:
    if tag == "math_exp":
        return all(c in _MATH_CHARS for c in text)
    if tag == "answer" and task_is_math:
        return all(c in _NUMBER_CHARS for c in text)
    return not any(c in _LINE_FORBIDDEN for c in text)


class ActionGrammar:
    """A logits processor: the message is exactly `<tag>content</tag>` for one allowed tag.

    Per row it tracks the generated text: before the tag, only tokens that extend a prefix of an
    allowed opening tag; inside, only content characters or the start of the closing tag; once
    closed, only end-of-sequence. Masks depend on a short state string, so they are computed once
    per state and cached across batches.
    """

    def __init__(self, tokenizer, prompt_len: int, max_new_tokens: int, tags: tuple[str, ...], task_is_math: bool,
                 token_strings: list[str], cache: dict) -> None:
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.max_new_tokens = max_new_tokens
        self.tags = tags
        self.math = task_is_math
        self.tokens = token_strings
        self.cache = cache
        self.eos = tokenizer.eos_token_id

    def _mask(self, state: tuple, vocab: int, device):
        key = (state, self.math, self.tags, vocab)
        if key not in self.cache:
            import torch

            allowed = torch.zeros(vocab, dtype=torch.bool)
            if state[0] == "closed":
                ids = [self.eos]
            elif state[0] == "force":  # out of budget: the longest token that continues the closing tag
                rest = f"</{state[1]}>"[len(state[2]):]
                ids = [max((i for i, s in enumerate(self.tokens[:vocab]) if s and rest.startswith(s)),
                           key=lambda i: len(self.tokens[i]))]
            else:
                ids = [i for i, s in enumerate(self.tokens[:vocab]) if s and self._allows(state, s)]
            allowed[ids] = True
            self.cache[key] = (~allowed).to(device)
        return self.cache[key]

    def _allows(self, state: tuple, s: str) -> bool:
        phase = state[0]
        if phase == "open":  # state[1]: text so far, a proper prefix of some opening tag
            text = state[1] + s
            return any(f"<{t}>".startswith(text) or text == f"<{t}>" for t in self.tags)
        tag, content_len, pending = state[1], state[2], state[3]
        close = f"</{tag}>"
        if pending:  # inside the closing tag: finish it exactly
            return close.startswith(pending + s)
        if content_len >= MAX_CONSTRAINED_CONTENT:
            return close.startswith(s)
        cut = s.find("<")
        body, rest = (s, "") if cut < 0 else (s[:cut], s[cut:])
        if not _content_ok(tag, self.math, body):
            return False
        if rest and (content_len + len(body.strip()) == 0 or not close.startswith(rest)):
            return False
        return True

    def state_of(self, text: str) -> tuple:
        for t in self.tags:
            opening = f"<{t}>"
            if text.startswith(opening):
                content = text[len(opening):]
                close = f"</{t}>"
                if close in content:
                    return ("closed",)
                cut = content.rfind("<")
                pending = content[cut:] if cut >= 0 else ""
                return ("inside", t, min(len(content.strip()), MAX_CONSTRAINED_CONTENT), pending)
        return ("open", text)

    def __call__(self, input_ids, scores):
        generated = input_ids[:, self.prompt_len:]
        out_of_budget = self.max_new_tokens - generated.shape[1] <= CLOSE_BUDGET_TOKENS
        for row in range(scores.shape[0]):
            text = self.tokenizer.decode(generated[row], skip_special_tokens=True)
            state = self.state_of(text)
            if state[0] == "inside" and out_of_budget and state[2] > 0:
                state = ("force", state[1], state[3])  # close the tag before max_new_tokens cuts it
            elif state[0] == "inside" and 0 < state[2] < MAX_CONSTRAINED_CONTENT:
                state = ("inside", state[1], 1, state[3])  # masks differ only at 0 and at the cap
            scores[row] = scores[row].masked_fill(self._mask(state, scores.shape[1], scores.device), float("-inf"))
        return scores


class ChoiceGrammar:
    """A logits processor: the whole message is one of `choices` (e.g. a judge's GOOD or BAD)."""

    def __init__(self, tokenizer, prompt_len: int, choices: tuple[str, ...], token_strings: list[str], cache: dict) -> None:
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.choices = choices
        self.tokens = token_strings
        self.cache = cache

    def _mask(self, prefix: str, vocab: int, device):
        key = ("choice", self.choices, prefix, vocab)
        if key not in self.cache:
            import torch

            if prefix in self.choices:
                ids = [self.tokenizer.eos_token_id]
            else:
                ids = [i for i, s in enumerate(self.tokens[:vocab])
                       if s and any(c.startswith(prefix + s) for c in self.choices)]
            allowed = torch.zeros(vocab, dtype=torch.bool)
            allowed[ids] = True
            self.cache[key] = (~allowed).to(device)
        return self.cache[key]

    def __call__(self, input_ids, scores):
        generated = input_ids[:, self.prompt_len:]
        for row in range(scores.shape[0]):
            prefix = self.tokenizer.decode(generated[row], skip_special_tokens=True)
            scores[row] = scores[row].masked_fill(self._mask(prefix, scores.shape[1], scores.device), float("-inf"))
        return scores


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
        self._grammar_masks: dict = {}
        self._prefix_caches: dict[tuple[int, ...], object] = {}

    @cached_property
    def _model(self):
        return load_model(self.model_path, self.device)

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
        prompts = [tok.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=False) for r in requests]
        enc = self._encode(prompts)
        prompt_len = enc["input_ids"].shape[1]
        kwargs = dict(max_new_tokens=first.max_tokens, pad_token_id=tok.pad_token_id)
        if first.temperature > 0:
            kwargs.update(do_sample=True, temperature=first.temperature, top_p=first.top_p or 1.0)
        else:
            kwargs.update(do_sample=False)
        kind, _, arg = (first.constraint or "").partition(":")
        if kind == "grammar":
            tags = _allowed_tags(first.constraint)
            processor = ActionGrammar(tok, prompt_len, first.max_tokens, tags, "math_exp" in tags, self._token_strings, self._grammar_masks)
        elif kind == "choice":
            choices = tuple(arg.split("|"))
            processor = ChoiceGrammar(tok, prompt_len, choices, self._token_strings, self._grammar_masks)
            kwargs.update(output_scores=True, return_dict_in_generate=True)
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
        probs = self._choice_probs(out.scores[0], choices) if kind == "choice" else [None] * len(requests)
        if kind == "choice":
            out = out.sequences
        elapsed = time.perf_counter() - started
        self.batches.append(len(requests))
        responses = []
        for row, request in enumerate(requests):
            new = out[row, prompt_len:]
            n_new = int((new != tok.pad_token_id).sum())
            text = tok.decode(new, skip_special_tokens=True)
            finish = "stop" if n_new < first.max_tokens else "length"
            responses.append(
                LLMResponse(
                    text=text, finish_reason=finish, prompt_tokens=int(enc["attention_mask"][row].sum()),
                    completion_tokens=n_new, cost_usd=0.0, latency_s=elapsed, model=request.model,
                    choice_probs=probs[row],
                )
            )
        return responses

    def _choice_probs(self, first_scores, choices: tuple[str, ...]) -> list[dict[str, float]]:
        """Each choice's probability at the first generated token: the mass of the allowed tokens that
        begin only that choice, renormalised over the choices (the grammar has already masked the rest)."""
        import torch

        key = ("owners", choices, first_scores.shape[1])
        if key not in self._grammar_masks:
            owner: dict[str, list[int]] = {}
            for i, s in enumerate(self._token_strings[: first_scores.shape[1]]):
                starts = [c for c in choices if s and c.startswith(s)]
                if len(starts) == 1:
                    owner.setdefault(starts[0], []).append(i)
            self._grammar_masks[key] = owner
        owner = self._grammar_masks[key]
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


def _allowed_tags(constraint: str) -> tuple[str, ...]:
    """`grammar:math_exp|answer` → the tags a message may use (all when none are named)."""
    _, _, names = constraint.partition(":")
    return tuple(names.split("|")) if names else tuple(t[1:-1] for t in ACTION_OPEN_TAGS)
