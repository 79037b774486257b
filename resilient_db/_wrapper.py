"""``with_self_healing``: the plan's wrapper, for any callable that is one whole operation.

Not part of the factories' sync/async twin: one function serves both, choosing
:meth:`Policy.call <resilient_db._retry.Policy.call>` or :meth:`Policy.acall
<resilient_db._retry.Policy.acall>` by the kind of function it is given.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

from ._config import Config, env_config
from ._retry import Policy
from ._state import STATE

__all__ = ["with_self_healing"]

R = TypeVar("R")


def _policy_for(service: str, use_retry: bool, use_circuit_breaker: bool, config: Config) -> Policy:
    key = (service, use_retry, use_circuit_breaker, config)
    policies = STATE.wrapper_policies
    policy: Policy | None = policies.get(key)
    if policy is None:
        policy = Policy(
            service,
            config,
            use_retry=use_retry,
            use_circuit_breaker=use_circuit_breaker,
        )
        if len(policies) > 256:  # configurations come and go with reload_config
            policies.clear()
        policies[key] = policy
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
    cfg = config if config is not None else env_config()
    if not callable(fn):
        raise TypeError(f"with_self_healing needs a callable, got {type(fn).__name__}")
    if inspect.iscoroutinefunction(fn):
        if not cfg.enabled:
            return fn()
        return _policy_for(service, use_retry, use_circuit_breaker, cfg).acall(fn)
    if not cfg.enabled:
        return fn()
    return _policy_for(service, use_retry, use_circuit_breaker, cfg).call(fn)
