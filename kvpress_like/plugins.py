"""Strategies by name: an entry-point registry, the Strategy base class, one PluginManager per pipeline.

Built-in strategies are registered through the same entry-point group as third-party ones
(see pyproject.toml), so a new strategy needs no change here::

    [project.entry-points."kvpress_like.strategies"]
    mine = "my_package.module:MyStrategy"
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, ClassVar

import pluggy
from pydantic import ValidationError

from kvpress_like import hookspecs
from kvpress_like.config import StrategyConfig
from kvpress_like.errors import ConfigError, config_error_from

ENTRY_POINT_GROUP = "kvpress_like.strategies"
logger = logging.getLogger("kvpress_like")


@dataclass(frozen=True)
class ModelInfo:
    """The shape facts a strategy needs to resolve its defaults and check its settings."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    layer_types: tuple[str, ...]  # "full_attention" or "sliding_attention", one per layer


class Strategy:
    """Base class of strategies: validated settings plus pluggy hook implementations.

    Subclasses set ``Config`` (a StrategyConfig) and mark hook methods with ``@hookimpl``.
    """

    Config: ClassVar[type[StrategyConfig]] = StrategyConfig

    def __init__(self, config: StrategyConfig, model: ModelInfo) -> None:
        self.config = config
        self.model = model

    def check_prompt(self, prompt_lengths: list[int]) -> None:
        """Raise ConfigError if the settings cannot serve prompts of these lengths (before prefill)."""

    def propagation_layer(self) -> int | None:
        """The layer at which ``propagate`` is expected to answer, or None: a hint for prefill.

        Only the propagated tokens go on after that layer, so only their queries attend there.
        Where the layer would run in chunks (``prefill_chunk``) it runs in two passes
        (``chunked_prefill.py``): in chunks up to attention only, the hooks being asked after the
        last chunk, then on the propagated tokens alone; run whole, it asks the hooks before
        attending. Any layer where ``propagate`` answers restricts its attention when run whole.
        A wrong hint costs time, never correctness: in chunks, the hinted layer's norm and
        query/key/value projections run twice (the hooks are asked once), and the layer that does
        propagate attends with every query.
        """
        return None


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _new_manager() -> pluggy.PluginManager:
    """An empty manager that knows the project's hook specs."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs.StrategySpec)
    return pm


def _check_class(cls: object, where: str) -> type[Strategy]:
    """A Strategy subclass whose hook implementations match the hook specs."""
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise TypeError(f"{where} must be a kvpress_like.Strategy subclass (got {cls!r})")
    probe = _new_manager()
    probe.register(cls)  # wrong argument names raise here
    probe.check_pending()  # unknown hook names raise here
    return cls


def _load(ep: EntryPoint) -> type[Strategy]:
    return _check_class(ep.load(), ep.value)


def load_strategy_class(name: str) -> type[Strategy]:
    eps = _entry_points()
    if name not in eps:
        raise ConfigError(f"strategy: must be one of {sorted(eps)} (got {name!r})")
    try:
        return _load(eps[name])
    except Exception as exc:
        raise ConfigError(f"strategy: {name!r} ({_source(eps[name])}) is broken: {exc}") from exc


def strategy_class(strategy: object) -> type[Strategy]:
    """The Strategy class named by a strategy name, class, instance, or settings instance (the
    installed strategy whose ``Config`` it is)."""
    if isinstance(strategy, str):
        return load_strategy_class(strategy)
    if isinstance(strategy, Strategy):
        return type(strategy)
    if isinstance(strategy, StrategyConfig):
        for name in sorted(_entry_points()):
            cls = load_strategy_class(name)
            if cls.Config is type(strategy):
                return cls
        raise ConfigError(
            f"strategy: a {type(strategy).__name__} must be the settings of an installed strategy; "
            "pass the Strategy class with keyword settings instead (got an unregistered one)"
        )
    try:
        return _check_class(strategy, "strategy")
    except Exception as exc:
        raise ConfigError(f"strategy: {exc}") from exc


def strategy_config(
    strategy: str | type[Strategy], settings: Mapping[str, Any]
) -> tuple[type[Strategy], StrategyConfig]:
    """The strategy class (by entry-point name, or given directly) and its validated settings."""
    if isinstance(strategy, str):
        cls, name = load_strategy_class(strategy), strategy
    else:
        try:
            cls = _check_class(strategy, "strategy")
        except Exception as exc:
            raise ConfigError(f"strategy: {exc}") from exc
        name = getattr(cls, "name", cls.__name__)
    try:
        return cls, cls.Config.model_validate(dict(settings))
    except ValidationError as exc:
        raise config_error_from(exc, name) from None


@dataclass(frozen=True)
class StrategyInfo:
    name: str
    description: str  # first sentence of the class docstring
    source: str  # the distribution that registered it


def _source(ep: EntryPoint) -> str:
    return f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else ep.value


def describe_strategies() -> list[StrategyInfo]:
    """Every installed strategy that loads; a broken one is skipped with a warning naming it."""
    found = []
    for name, ep in sorted(_entry_points().items()):
        try:
            cls = _load(ep)
        except Exception as exc:
            logger.warning(
                "strategy plugin %r (%s, from %s) is broken and was skipped: %s: %s",
                name, ep.value, _source(ep), type(exc).__name__, exc,
            )  # fmt: skip
            continue
        doc = " ".join((cls.__doc__ or "").split())
        found.append(StrategyInfo(name, doc.split(". ")[0].rstrip("."), _source(ep)))
    return found


def list_strategies() -> dict[str, str]:
    """Name -> one-line description, for every installed strategy that loads."""
    return {info.name: info.description for info in describe_strategies()}


def check_plugins(plugins: Any) -> list[object]:
    """``plugins`` as a list, each implementing at least one of the project's hooks."""
    if isinstance(plugins, str | bytes) or not isinstance(plugins, Iterable):
        raise ConfigError(f"plugins: must be a list of plugin objects (got {plugins!r:.60})")
    plugins = list(plugins)
    pm = _new_manager()  # a probe: the pipeline's own manager needs the built strategy
    for index, plugin in enumerate(plugins):
        if isinstance(plugin, type):
            raise ConfigError(f"plugins[{index}]: must be an instance, not a class (got {plugin!r:.60})")
        if any(plugin is earlier for earlier in plugins[:index]):
            raise ConfigError(f"plugins[{index}]: must be given once (got {plugin!r:.60} again)")
        try:
            pm.register(plugin)
            pm.check_pending()  # a hook name no spec declares (a misspelling)
        except pluggy.PluginValidationError as exc:  # or a hook's arguments that its spec lacks
            raise ConfigError(f"plugins[{index}]: {exc} (got {plugin!r:.60})") from None
        if not pm.get_hookcallers(plugin):
            raise ConfigError(
                f"plugins[{index}]: must implement at least one of kvpress_like's hooks (methods "
                f"marked with kvpress_like.hookimpl) (got {plugin!r:.60})"
            )
    return plugins


def make_plugin_manager(strategy: Strategy, extra_plugins: Iterable[object] = ()) -> pluggy.PluginManager:
    """A fresh manager: the strategy first, extra plugins on top (asked before it)."""
    pm = _new_manager()
    pm.register(strategy)
    for plugin in extra_plugins:
        pm.register(plugin)
    pm.check_pending()
    return pm
