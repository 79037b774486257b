"""``with_self_healing``: the plan's wrapper, for any callable that is one whole operation.

Not part of the factories' sync/async twin: one function serves both, choosing
:meth:`Policy.call <resilient_db._retry.Policy.call>` or :meth:`Policy.acall
<resilient_db._retry.Policy.acall>` by the kind of function it is given.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

from ._config import Config, load_config, on_reload
from ._retry import Policy
from ._state import STATE

__all__ = ["with_self_healing"]

R = TypeVar("R")

_default_config: Config | None = None


def _env_config() -> Config:
    global _default_config
    if _default_config is None:
        _default_config = load_config()
    return _default_config


def _use_env_config(config: Config) -> None:
    global _default_config
    _default_config = config


on_reload(_use_env_config)

_wrapper_policies: dict[tuple[str, bool, bool, Config], Policy] = {}
# reset_state() drops the cached policies (their breakers and counters are reset with it)
STATE.resetters["wrapper_policies"] = _wrapper_policies.clear


def _policy_for(service: str, use_retry: bool, use_circuit_breaker: bool, config: Config) -> Policy:
    key = (service, use_retry, use_circuit_breaker, config)
    policy = _wrapper_policies.get(key)
    if policy is None:
        policy = Policy(
            service,
            config,
            use_retry=use_retry,
            use_circuit_breaker=use_circuit_breaker,
        )
        if len(_wrapper_policies) > 256:  # configurations come and go with reload_config
            _wrapper_policies.clear()
        _wrapper_policies[key] = policy
    return policy


@overload
def with_self_healing(
    fn: Callable[[], Awaitable[R]],
    *,
    service: str = ...,
    use_retry: bool = ...,
    use_circuit_breaker: bool = ...,
    config: Config | None = ...,
) -> Awaitable[R]: ...
@overload
def with_self_healing(
    fn: Callable[[], R],
    *,
    service: str = ...,
    use_retry: bool = ...,
    use_circuit_breaker: bool = ...,
    config: Config | None = ...,
) -> R: ...
def with_self_healing(
    fn: Callable[[], Any],
    *,
    service: str = "database",
    use_retry: bool = True,
    use_circuit_breaker: bool = True,
    config: Config | None = None,
) -> Any:
    """Call ``fn()`` with retry and the circuit breaker of ``service``, as the plan's wrapper.

    ``fn`` must be safe to call again (it is the whole operation, e.g. it opens its own session).
    For a coroutine function the result is an awaitable. With self-healing off, ``fn()`` runs
    plainly.
    """
    cfg = config if config is not None else _env_config()
    if not callable(fn):
        raise TypeError(f"with_self_healing needs a callable, got {type(fn).__name__}")
    if inspect.iscoroutinefunction(fn):
        if not cfg.enabled:
            return fn()
        return _policy_for(service, use_retry, use_circuit_breaker, cfg).acall(fn)
    if not cfg.enabled:
        return fn()
    return _policy_for(service, use_retry, use_circuit_breaker, cfg).call(fn)
