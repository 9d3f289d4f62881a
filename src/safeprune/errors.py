"""User-facing errors: one line on stderr, exit code 2, no traceback (see cli.main)."""


class UserError(Exception):
    """A mistake the user can fix (bad path, unknown name, value out of range).

    The message must say what is wrong AND what would be right, in one line.
    """


def check(cond: bool, message: str) -> None:
    """Raise UserError(message) unless cond holds; keeps validation one line per rule."""
    if not cond:
        raise UserError(message)


def choose(kind: str, name: str, registry) -> object:
    """Look up `name` in a registry dict, or fail naming the valid choices."""
    if name not in registry:
        raise UserError(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(registry))}")
    return registry[name]
