from __future__ import annotations

import torch
from pydantic import Field, ValidationInfo, field_validator

from kvpress_like.budget import BudgetConfig, BudgetStrategy
from kvpress_like.errors import ConfigError
from kvpress_like.hookspecs import LayerView, hookimpl
from kvpress_like.selection import rate_budget


class StreamingLLMConfig(BudgetConfig):
    """StreamingLLM settings: the retention budget holds ``sink_tokens`` sinks plus recent tokens.

    ``window`` is the least number of recent tokens: the budget must hold ``sink_tokens + window``
    (checked here in constant mode, per prompt in proportional mode); the recent part is whatever
    the budget leaves after the sinks.
    """

    window: int = Field(
        8, ge=1, description="least number of recent tokens kept (the budget holds sinks + window)"
    )
    sink_tokens: int = Field(
        4, ge=0, description="first prompt tokens always kept as attention sinks (the paper uses 4)"
    )

    @field_validator("sink_tokens")
    @classmethod
    def _sinks_fit_constant_budget(cls, value: int, info: ValidationInfo) -> int:
        tokens, window = info.data.get("retain_tokens"), info.data.get("window")
        constant = info.data.get("budget_mode") == "constant" and None not in (tokens, window)
        if constant and value + window > tokens:
            raise ValueError(
                f"must leave room for the window in the retain budget: sink_tokens + window = {value} + "
                f"{window} = {value + window} must be <= retain_tokens ({tokens})"
            )
        return value


class StreamingLLM(BudgetStrategy):
    """StreamingLLM (arXiv 2309.17453): every layer keeps the first ``sink_tokens`` tokens of the
    prompt (attention sinks) plus the most recent tokens, up to a uniform budget.

    ``retain`` only (no scores): bool ``[B, Hkv, S]``, the same for every KV head. Per row with a
    budget of ``k`` (``BudgetStrategy.budgets``): its first ``min(sink_tokens, k)`` valid entries
    and its last ``k - min(sink_tokens, k)``; a row whose budget covers it keeps everything.
    """

    name = "streamingllm"
    Config = StreamingLLMConfig
    config: StreamingLLMConfig

    @hookimpl
    def retain(self, layer: LayerView, scores: torch.Tensor | None) -> torch.Tensor:
        valid = layer.valid  # [B, S], valid entries right-aligned
        seq = valid.shape[-1]
        budget = self.budgets("retain", layer.prompt_lengths)[:, None]  # [B, 1]
        sinks = budget.clamp(max=self.config.sink_tokens)
        rank = valid.cumsum(dim=-1) - 1  # [B, S]: index among the row's valid entries
        recent = torch.arange(seq, device=valid.device) >= seq - (budget - sinks)
        keep = valid & ((rank < sinks) | recent)
        return keep[:, None].expand(-1, layer.keys.shape[1], -1)

    def check_prompt(self, prompt_lengths: list[int]) -> None:
        super().check_prompt(prompt_lengths)  # window <= budget
        c = self.config
        if c.budget_mode == "constant":
            return  # checked when the config was built
        for n in prompt_lengths:
            kept = rate_budget(c.retain_rate, n)
            if kept < n and kept < c.sink_tokens + c.window:
                raise ConfigError(
                    f"{self.name}.sink_tokens: must be below the retain budget less the window; "
                    f"retain_rate={c.retain_rate} of a {n}-token prompt keeps {kept} tokens, fewer than "
                    f"sink_tokens + window = {c.sink_tokens} + {c.window} = {c.sink_tokens + c.window} "
                    f"(got sink_tokens={c.sink_tokens}); use a longer prompt, a higher retain_rate, fewer "
                    "sink_tokens or a smaller window"
                )
