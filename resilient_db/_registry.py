"""Which session belongs to which resilient factory, without touching the session.

Behaviour attaches through events on SQLAlchemy's ``Session`` class (registered once, acting
only for sessions found here) rather than through a subclass of the user's session class or keys
in ``session.info``: ``session.info`` stays the user's, and clearing it changes nothing.

* sync: ``ResilientSession`` is a ``sessionmaker``, which makes a subclass of the user's class
  per factory (``Session.class_``, as plain ``sessionmaker`` does); that class names the factory.
* async: an ``AsyncSession``'s ``sync_session`` is of a subclass the factory makes of the
  user's ``sync_session_class`` (``FactoryCore._routed``); that class names the factory.

Entries are weak: a factory or session that is gone leaves nothing behind. A sync factory's
entry names it by a weak reference (a strong one, from a dictionary keyed by the class the factory
holds, would keep both alive for good); the class holds its factory instead, so that a session
outliving every other reference to its factory (``ResilientSession(engine)()``) is still one of
its sessions, as a plain ``sessionmaker``'s session needs nothing of its factory.
"""

from __future__ import annotations

import weakref
from typing import Any

from sqlalchemy.orm import Session

from ._config import Config
from ._state import STATE

__all__ = [
    "config_of",
    "factory_of",
    "in_unit",
    "live_policies",
    "register_class",
]


#: the attribute by which the class a factory makes holds the factory (only held: the
#: factory is looked up in the registry)
_FACTORY_ATTRIBUTE = "_resilient_db_factory"


def register_class(session_class: type[Session], factory: Any) -> None:
    """Sessions of ``session_class`` (a class only ``factory`` makes) belong to ``factory``."""
    setattr(session_class, _FACTORY_ATTRIBUTE, factory)  # its sessions keep it alive
    with STATE.lock:
        STATE.factory_by_class[session_class] = weakref.ref(factory)


def factory_of(session: Session) -> object:
    """The resilient factory that made ``session``, or None."""
    ref = STATE.factory_by_class.get(type(session))
    if ref is not None:
        return ref()  # alive while a session of its class is
    return None


def config_of(session: Session) -> Config | None:
    """The configuration governing ``session`` (None: not one of ours)."""
    config: Config | None = getattr(factory_of(session), "config", None)
    return config


def service_of(session: Session) -> str | None:
    """The service of ``session``'s factory (None: not one of ours)."""
    service: str | None = getattr(factory_of(session), "service", None)
    return service


def in_unit(session: Session) -> bool:
    """``session`` is running a unit of work (which retries by itself)."""
    return session in STATE.unit_sessions


def live_policies() -> list[Any]:
    """The policy of every live factory (each is registered on its engine's hooks, and those
    of the environment's configuration for ``reload_config``) and of every cached
    ``with_self_healing`` call: what uses breakers and retry budgets."""
    with STATE.lock:
        factories = list(STATE.default_config_users)
        for hooks in list(STATE.engine_hooks.values()):
            factories.extend(hooks.factories)
        policies = list(STATE.wrapper_policies.values())
    policies.extend(p for f in factories if (p := getattr(f, "policy", None)) is not None)
    return policies
