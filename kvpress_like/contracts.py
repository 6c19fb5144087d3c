"""Hook answers checked where they are received: what each hook must return, and which plugin broke it.

The hooks are ``firstresult`` (``hookspecs.py``): plugins are asked newest (or ``tryfirst``)
first and the first answer that is not ``None`` wins. ``HookRunner`` asks them in that same order
itself, so that it knows which plugin answered (or raised) and can name it, with its distribution,
in a ``PluginError``. Shapes and dtypes are checked at once; checks of values (finite scores,
enough entries kept) are reductions on the device, read together once the prefill pass is done
(``verify``), so they add no host sync to prefill and nothing to decoding, where no hook is asked.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from importlib.metadata import packages_distributions, version
from typing import Any

import pluggy
import torch

from kvpress_like.errors import ConfigError, PluginError
from kvpress_like.hookspecs import LayerView
from kvpress_like.parallel import TensorParallel

HOOKS = ("score", "retain", "propagate", "restart")
Check = tuple[torch.Tensor, Callable[[], str]]  # (all True when the contract is met, the complaint)


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return packages_distributions()


def describe_plugin(plugin: object) -> str:
    """``'KeyNorm' (kvpress_like_keynorm, from kvpress-like-keynorm 0.1.0)``: class, module and
    the installed distribution that ships it, when there is one."""
    cls = plugin if isinstance(plugin, type) else type(plugin)
    module = cls.__module__
    dists = _distributions().get(module.split(".")[0], [])
    source = f", from {dists[0]} {version(dists[0])}" if dists else ""
    return f"{cls.__name__!r} ({module}{source})"


def _shape(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {list(value.shape)}"
    return f"{type(value).__name__} {value!r:.60}"


class HookRunner:
    """Asks a plugin manager's hooks for one layer and checks every answer against its contract.

    ``min_kept`` is the least number of entries (per row and KV head) a ``retain`` mask must keep
    and of tokens (per row) a ``propagate`` mask must choose: the strategy's ``window`` (its most
    recent tokens are always kept), capped by the row's valid tokens.
    """

    def __init__(
        self, manager: pluggy.PluginManager, min_kept: int, parallel: TensorParallel | None = None
    ) -> None:
        self.manager, self.min_kept = manager, min_kept
        self.parallel = parallel or TensorParallel()  # given to the hooks' LayerView
        for name in HOOKS:
            self._impls(name)  # old-style wrappers are refused when the pipeline is built

    def _impls(self, name: str) -> list[pluggy.HookImpl]:
        """The hook's implementations in pluggy's calling order, read at every call: a plugin
        registered on the pipeline's manager later takes part too."""
        impls = getattr(self.manager.hook, name).get_hookimpls()[::-1]
        legacy = [impl for impl in impls if impl.hookwrapper]
        if legacy:
            raise ConfigError(
                f"plugins: old-style hookwrapper=True implementations are not supported, use "
                f"wrapper=True (got a {name} hookwrapper from {describe_plugin(legacy[0].plugin)})"
            )
        return impls

    def _call(self, impl: pluggy.HookImpl, name: str, layer_idx: int, kwargs: dict[str, Any]) -> Any:
        try:
            return impl.function(*(kwargs[arg] for arg in impl.argnames))
        except Exception as exc:
            raise PluginError(
                f"plugin {describe_plugin(impl.plugin)} raised in hook {name} at layer "
                f"{layer_idx}: {type(exc).__name__}: {exc}"
            ).with_traceback(sys.exc_info()[2]) from exc

    def _first(self, name: str, layer: LayerView, **kwargs: Any) -> tuple[Any, object | None]:
        """The first answer that is not None, and the plugin that gave it, as pluggy's firstresult
        call would give it: ``wrapper=True`` implementations (observers, say) see the answer
        and may replace it, in which case the answer is theirs. Unlike pluggy, an exception of an
        inner implementation is not thrown into the wrappers: it ends the call as a PluginError."""
        kwargs["layer"] = layer
        at = layer.layer_idx
        impls = self._impls(name)
        wrappers = [(impl, self._call(impl, name, at, kwargs)) for impl in impls if impl.wrapper]
        for impl, generator in wrappers:
            self._advance(impl, generator, name, at, None, first=True)
        answer, plugin = None, None
        for impl in impls:
            if not impl.wrapper:
                answer = self._call(impl, name, at, kwargs)
                if answer is not None:
                    plugin = impl.plugin
                    break
        for impl, generator in reversed(wrappers):
            wrapped = self._advance(impl, generator, name, at, answer)
            if wrapped is not answer:
                answer, plugin = wrapped, impl.plugin
        return answer, plugin

    @staticmethod
    def _advance(
        impl: pluggy.HookImpl, generator: Any, name: str, at: int, answer: Any, first: bool = False
    ) -> Any:
        """Run a wrapper up to its ``yield`` (``first``), or on from it with ``answer``: its result."""
        try:
            if first:
                next(generator)
                return None
            generator.send(answer)
        except StopIteration as done:
            if not first:
                return done.value
            raise PluginError(
                f"plugin {describe_plugin(impl.plugin)}'s {name} wrapper did not yield"
            ) from None
        except Exception as exc:
            raise PluginError(
                f"plugin {describe_plugin(impl.plugin)} raised in hook {name} wrapper at layer {at}: "
                f"{type(exc).__name__}: {exc}"
            ).with_traceback(sys.exc_info()[2]) from exc
        raise PluginError(f"plugin {describe_plugin(impl.plugin)}'s {name} wrapper yielded twice")

    def ask(
        self, layer: LayerView, ask_retain: bool, checks: list[Check]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
        """``retain`` mask ``[B, Hkv, S]`` (None: keep all; not asked when ``ask_retain`` is False),
        ``propagate`` mask ``[B, S]`` (None: every token) and ``restart``. Shapes and types are
        checked now; the checks of values are appended to ``checks`` for ``verify``."""
        batch, kv_heads, seq, _ = layer.keys.shape
        at = layer.layer_idx
        least = layer.valid.sum(dim=-1).clamp(max=self.min_kept)  # [B]
        enough = f"at least min(window={self.min_kept}, valid tokens)"

        scores, plugin = self._first("score", layer)
        if scores is not None:
            _expect_tensor(
                scores, plugin, "score", at, "float [B, Hkv, S]", (batch, kv_heads, seq), layer.keys.device
            )
            finite = torch.isfinite(scores) | ~layer.valid[:, None]
            checks.append(
                _check(
                    finite,
                    plugin,
                    "score",
                    at,
                    "finite scores at valid entries",
                    lambda: f"{int((~finite).sum())} NaN or infinite",
                )
            )

        keep = None
        if ask_retain:
            keep, plugin = self._first("retain", layer, scores=scores)
            if keep is not None:
                _expect_tensor(
                    keep, plugin, "retain", at, "bool [B, Hkv, S]", (batch, kv_heads, seq), layer.keys.device
                )
                kept = (keep & layer.valid[:, None]).sum(dim=-1)  # [B, Hkv]
                checks.append(
                    _check(
                        kept >= least[:, None],
                        plugin,
                        "retain",
                        at,
                        f"{enough} entries kept per row and KV head",
                        lambda: f"as few as {int(kept.min())}",
                    )
                )

        propagated, plugin = self._first("propagate", layer, scores=scores)
        restart = False
        if propagated is not None:
            _expect_tensor(
                propagated, plugin, "propagate", at, "bool [B, S]", (batch, seq), layer.keys.device
            )
            if not self.parallel.agree(propagated & layer.valid):  # ranks must go on with one set
                raise _broken(
                    plugin, "propagate", at,
                    "the same tokens on every tensor-parallel rank (choose over every rank's heads: "
                    "LayerView.head_sum or all_heads)",
                    "different tokens on different ranks",
                )  # fmt: skip
            chosen = (propagated & layer.valid).sum(dim=-1)  # [B]
            checks.append(
                _check(
                    chosen >= least,
                    plugin,
                    "propagate",
                    at,
                    f"{enough} tokens per row",
                    lambda: f"as few as {int(chosen.min())}",
                )
            )
            answer, plugin = self._first("restart", layer)
            if answer is not None and not isinstance(answer, bool):
                raise _broken(plugin, "restart", at, "a bool or None", _shape(answer))
            restart = bool(answer)

        return keep, propagated, restart

    @staticmethod
    def verify(checks: list[Check]) -> None:
        """Raise the first complaint among ``checks`` not met: one host sync for all of them."""
        if not checks:
            return
        met = torch.stack([ok.all() for ok, _ in checks]).tolist()
        for fine, (_, complaint) in zip(met, checks, strict=True):
            if not fine:
                raise PluginError(complaint())


def _broken(plugin: object, hook: str, layer_idx: int, expected: str, got: str) -> PluginError:
    return PluginError(
        f"plugin {describe_plugin(plugin)} broke hook {hook} at layer {layer_idx}: expected {expected} "
        f"(got {got})"
    )


def _check(
    ok: torch.Tensor, plugin: object, hook: str, layer_idx: int, expected: str, got: Callable[[], str]
) -> Check:
    """A condition read later (with the layer's other checks) and its complaint, built only if needed."""
    return ok, lambda: str(_broken(plugin, hook, layer_idx, expected, got()))


def _expect_tensor(
    value: Any,
    plugin: object,
    hook: str,
    layer_idx: int,
    expected: str,
    shape: tuple[int, ...],
    device: torch.device,
) -> None:
    floating = hook == "score"
    dtype_ok = isinstance(value, torch.Tensor) and (
        value.is_floating_point() if floating else value.dtype == torch.bool
    )
    if dtype_ok and value.device != device:
        raise _broken(plugin, hook, layer_idx, f"a tensor on the layer's device, {device}", str(value.device))
    if not dtype_ok or tuple(value.shape) != shape:
        hint = " (indices are not accepted: return a mask)" if not floating and _is_int(value) else ""
        raise _broken(plugin, hook, layer_idx, f"{expected} = {list(shape)}", _shape(value) + hint)


def _is_int(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dtype != torch.bool
