"""Diagrams of the rules: Mermaid ``stateDiagram-v2`` and Graphviz ``digraph`` text, from a mapped
model (states as declared, under the model's name) or from plain :class:`TransitionRules`. Pure:
labels are escaped for each format, nothing is rendered or sent anywhere."""

from __future__ import annotations

from typing import Any

from ._rules import (
    TransitionRules,
    TransitionRulesError,
    expand,
    identity_key,
    one_guard,
    plain,
    sort_key,
)

__all__ = ["rules_to_dot", "rules_to_mermaid"]


def _graph_of(model_or_rules: object, column: str | None) -> tuple[str, list[Any], Any, Any]:
    """(title, states, initial, next) for drawing, from a model or plain rules."""
    if isinstance(model_or_rules, TransitionRules):
        rules = model_or_rules
        if column is not None and column != rules.column:  # as a model's unknown column
            raise TransitionRulesError(
                f"the rules are for column {rules.column!r}; they declare no transitions for "
                f"column {column!r}"
            )
        graph = expand(rules.declared_states, rules.transitions, key=identity_key)
        return rules.column, sorted(graph, key=sort_key), rules.initial, graph
    guard = one_guard(model_or_rules, column)
    states = [guard.state(k) for k in sorted(guard.next, key=sort_key)]
    nxt = {guard.state(k): {guard.state(t) for t in targets} for k, targets in guard.next.items()}
    initial = {guard.state(k) for k in guard.initial}
    return f"{guard.model}.{guard.attr_key}", states, initial, nxt


def _label(state: object) -> str:
    return "NULL" if state is None else str(plain(state))


def _mermaid_text(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"#<>;:{}[]|\\`' or ord(ch) < 32:
            out.append(f"#{ord(ch)};")
        else:
            out.append(ch)
    return "".join(out)


def rules_to_mermaid(model: object, *, column: str | None = None) -> str:
    """A Mermaid ``stateDiagram-v2`` of the rules of ``model`` (a mapped class or rules).

    ``[*] --> s`` marks initial states and ``s --> [*]`` states with no way out. State names are
    written as labels (``state "name" as sN``) with special characters entity-escaped.
    """
    title, states, initial, nxt = _graph_of(model, column)
    ids = {s: f"s{i}" for i, s in enumerate(states)}
    lines = ["stateDiagram-v2", f"    %% {_mermaid_text(title)}"]
    lines += [f'    state "{_mermaid_text(_label(s))}" as {ids[s]}' for s in states]
    lines += [f"    [*] --> {ids[s]}" for s in states if s in initial]
    for s in states:
        targets = sorted(nxt.get(s, ()), key=sort_key)
        lines += [f"    {ids[s]} --> {ids[t]}" for t in targets]
        if not targets:
            lines.append(f"    {ids[s]} --> [*]")
    return "\n".join(lines) + "\n"


def _dot_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = escaped.replace("\r", "\\r").replace("\n", "\\n")
    return f'"{escaped}"'


def rules_to_dot(model: object, *, column: str | None = None) -> str:
    """A Graphviz ``digraph`` of the rules of ``model`` (a mapped class or rules); a point node
    leads into the initial states. Names are written as escaped, double-quoted labels."""
    title, states, initial, nxt = _graph_of(model, column)
    ids = {s: f"n{i}" for i, s in enumerate(states)}
    lines = [
        f"digraph {_dot_string(title)} {{",
        "    rankdir=LR;",
        "    node [shape=box, style=rounded];",
        '    start [shape=point, label=""];',
    ]
    lines += [f"    {ids[s]} [label={_dot_string(_label(s))}];" for s in states]
    lines += [f"    start -> {ids[s]};" for s in states if s in initial]
    for s in states:
        lines += [f"    {ids[s]} -> {ids[t]};" for t in sorted(nxt.get(s, ()), key=sort_key)]
    lines.append("}")
    return "\n".join(lines) + "\n"
