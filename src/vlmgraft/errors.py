"""One exception type for problems a user can fix; the CLI prints its message without a stack trace."""


class VlmgraftError(Exception):
    """A user-facing error: the message names the file, field or id at fault and what to do about it."""


def require_extra(what: str, extra: str, *modules: str) -> None:
    """Stop `what` (a command) with a one-line error naming the pip extra when a module of that extra is missing."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            raise VlmgraftError(f"{what} needs the '{extra}' extra ({err.name or module} is not installed): "
                                f"pip install 'vlmgraft[{extra}]'") from err
