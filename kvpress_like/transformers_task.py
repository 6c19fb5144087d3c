"""The transformers pipeline task ``"kvpress-like"``: compress a long context once, then answer
several questions from it.

``import kvpress_like`` registers it (when ``transformers.pipelines`` is imported, before or after:
see the end of ``kvpress_like/__init__.py``)::

    import kvpress_like
    from transformers import pipeline

    pipe = pipeline("kvpress-like", model=model, tokenizer=tokenizer, strategy="fastkv", tsp_rate=0.2)
    pipe(context, question="Who?", max_new_tokens=32)   # {"answer": "..."}
    pipe(context, questions=["Who?", "When?"])          # [{"answer": "..."}, {"answer": "..."}]
    pipe(prompt)                                        # {"generated_text": "..."}: plain generation

Layout. With a chat template (the tokenizer's, unless ``chat_template=False``) context and question
are one user turn: ``template(context + separator + question)`` with the generation prompt. The
template is applied once, to a marker, and split there into ``head`` and ``tail``; the compressed
part is ``head + context`` (tokenized once per call, without added special tokens: the template
has them), each question part ``separator + question + tail``. Without a template: the context with
the tokenizer's special tokens, then ``separator + question`` as plain text. Each part is tokenized
on its own, so a tokenizer that merges across the split may give other tokens at the seam than the
whole string would. FastKV and SnapKV choose what to keep with the end of what they compress, which
here is the context's end, not the question (``README.md``).

Construction keywords other than the task's own (below) and transformers' ``Pipeline`` ones
(``device``, ``batch_size``, ...) go to ``kvpress_like.pipeline``: the strategy's settings and
default generation settings. Call keywords other than the task's own go, unchanged, to
``Pipeline.generate`` for every answer.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import AutoModelForCausalLM
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines import Pipeline as TransformersPipeline

from kvpress_like.errors import ConfigError
from kvpress_like.prompts import use_chat_template

TASK = "kvpress-like"

# Keywords transformers' Pipeline.__init__ takes: its parameters and those it pops from **kwargs.
_BASE_KEYWORDS = (
    set(inspect.signature(TransformersPipeline.__init__).parameters)
    - {"self", "model", "tokenizer", "kwargs"}
) | {"args_parser", "dtype", "torch_dtype", "batch_size", "num_workers"}
# The task's own keywords, at construction (defaults) or per call.
_TASK_KEYWORDS = ("question", "questions", "chat_template", "separator", "return_details")
# Stands for the user's message when the chat template is applied once, to be split at.
_MARKER = "[[kvpress-like: the user message]]"


class KVPressLikeTask(TransformersPipeline):
    """``pipe(context, question=None, *, questions=None, chat_template=None, separator="\\n\\n",
    return_details=False, **generation)``.

    ``question``: one answer, ``{"answer": text}``; ``questions=[...]``: a list of those, all from
    one compression of ``context``; neither: plain generation from ``context`` as the whole prompt
    (laid out as a user turn when templated), ``{"generated_text": text}``. A list of contexts gives
    a list of results. ``return_details=True`` adds ``"token_ids"`` (the generated ids) and
    ``"stats"`` (``Generation.stats``) to each result, and ``"context_stats"`` (the compression's
    ``Stats``) to answers. ``self.engine`` is the ``kvpress_like.Pipeline`` doing the work.
    """

    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False

    def __init__(self, model, tokenizer=None, *, strategy: Any = "fastkv", plugins=(), **kwargs: Any):
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in _BASE_KEYWORDS or k in _TASK_KEYWORDS}
        super().__init__(model, tokenizer, **own)  # may move the model to `device`
        if self.tokenizer is None:
            raise ConfigError(f"tokenizer: the {TASK!r} task needs one (got None)")
        import kvpress_like

        self.engine = kvpress_like.pipeline(
            self.model, strategy, tokenizer=self.tokenizer, plugins=plugins, **kwargs
        )

    def __call__(self, context: Any, question: str | None = None, **kwargs: Any) -> Any:
        if (kwargs.get("batch_size") or self._batch_size or 1) > 1:
            raise ConfigError(
                f"batch_size: the {TASK!r} task runs one context at a time, pass 1 or None "
                f"(got {kwargs.get('batch_size') or self._batch_size})"
            )
        return super().__call__(context, question=question, **kwargs)

    def _sanitize_parameters(
        self,
        question: str | None = None,
        questions: list[str] | None = None,
        chat_template: bool | None = None,
        separator: str | None = None,
        return_details: bool | None = None,
        **generation: Any,
    ) -> tuple[dict, dict, dict]:
        # Only what was given: transformers lays a call's parameters over the construction's.
        preprocess: dict[str, Any] = {}
        if question is not None and questions is not None:
            raise ConfigError(
                f"question, questions: give one of them (got both: {question!r}, {questions!r})"
            )
        if question is not None:
            preprocess["questions"] = _texts("question", [question])
            preprocess["single"] = True
        elif questions is not None:
            if isinstance(questions, str) or not questions:
                raise ConfigError(f"questions: must be a non-empty list of strings (got {questions!r:.80})")
            preprocess["questions"] = _texts("questions", list(questions))
            preprocess["single"] = False
        if chat_template is not None:
            preprocess["chat_template"] = chat_template
        if separator is not None:
            preprocess["separator"] = _texts("separator", [separator])[0]
        postprocess = {} if return_details is None else {"return_details": return_details}
        return preprocess, generation, postprocess

    def preprocess(
        self,
        context: Any,
        questions: list[str] | None = None,
        single: bool = True,
        chat_template: bool | None = None,
        separator: str = "\n\n",
    ) -> dict[str, Any]:
        if not isinstance(context, str) or not context:
            raise ConfigError(f"context: must be a non-empty string (got {context!r:.80})")
        layout = self._template(chat_template)
        head, tail = layout or ("", "")
        special = layout is None  # a templated string carries its own special tokens
        if questions is None:
            return {"kind": "plain", "prompt": self._ids(head + context + tail, special)}
        return {
            "kind": "single" if single else "list",
            "context": self._ids(head + context, special),
            "questions": [self._ids(separator + q + tail, False) for q in questions],
        }

    def _forward(self, inputs: dict[str, Any], **generation: Any) -> dict[str, Any]:
        engine, kind = self.engine, inputs["kind"]
        if kind == "plain":
            return {"kind": kind, "generations": [engine.generate(inputs["prompt"], **generation)]}
        longest = inputs["context"].shape[-1] + max(q.shape[-1] for q in inputs["questions"])
        engine.check_settings(longest, **generation)  # a bad setting fails before the compression
        context = engine.compress(inputs["context"])
        generations = [
            # an empty question part (no separator, question nor template tail): answer from the context
            engine.generate(q if q.numel() else None, context=context, **generation)
            for q in inputs["questions"]
        ]
        return {"kind": kind, "generations": generations, "context_stats": context.stats}

    def postprocess(self, outputs: dict[str, Any], return_details: bool = False) -> Any:
        kind = outputs["kind"]
        results = []
        for generation in outputs["generations"]:
            result: dict[str, Any] = {"generated_text" if kind == "plain" else "answer": generation.text}
            if return_details:
                result |= {"token_ids": generation.ids, "stats": generation.stats}
                if kind != "plain":
                    result["context_stats"] = outputs["context_stats"]
            results.append(result)
        return results if kind == "list" else results[0]

    def _template(self, chat_template: bool | None) -> tuple[str, str] | None:
        """(head, tail) around the user's message in the chat template, or None for plain text."""
        tok = self.tokenizer
        if not use_chat_template(tok, chat_template):
            return None
        text = tok.apply_chat_template(
            [{"role": "user", "content": _MARKER}], tokenize=False, add_generation_prompt=True
        )
        if not isinstance(text, str) or text.count(_MARKER) != 1:
            raise ConfigError(
                "chat_template: must place the user's message once and unchanged, to split the context "
                f"from the question there (got {text!r:.200}); pass chat_template=False"
            )
        head, tail = text.split(_MARKER)
        return head, tail

    def _ids(self, text: str, special: bool) -> torch.Tensor:
        return torch.tensor(self.tokenizer(text, add_special_tokens=special)["input_ids"], dtype=torch.long)


def _texts(name: str, values: list[Any]) -> list[str]:
    wrong = [v for v in values if not isinstance(v, str)]
    if wrong:
        raise ConfigError(f"{name}: must be strings (got {type(wrong[0]).__name__} {wrong[0]!r:.40})")
    return values


def register() -> None:
    """Register the task with transformers (again only if another class took the name since)."""
    if PIPELINE_REGISTRY.supported_tasks.get(TASK, {}).get("impl") is not KVPressLikeTask:
        PIPELINE_REGISTRY.register_pipeline(
            TASK, pipeline_class=KVPressLikeTask, pt_model=AutoModelForCausalLM
        )


register()
