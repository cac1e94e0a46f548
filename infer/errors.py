"""The error a case file raises, and bounded one-line texts for its messages (stdlib + numpy)."""
import numpy as np


class CaseError(ValueError):
    """A case file that cannot be used as given; the message is one line."""


def show(value, width: int = 40) -> str:
    """A bounded, one-line ``repr`` for messages: strings and bytes are cut before ``repr`` runs,
    containers and very large ints show only their type (their repr can be unbounded)."""
    if isinstance(value, (str, bytes)):
        text = repr(value[:width + 1])
    elif isinstance(value, bool) or value is None or isinstance(value, (float, np.generic)) \
            and not isinstance(value, (np.str_, np.bytes_, np.void, np.object_)):
        text = repr(value)
    elif isinstance(value, int) and value.bit_length() <= 128:
        text = repr(value)
    else:
        text = f"<{type(value).__name__}>"
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= width else text[:width - 3] + "..."



def exc_text(exc: BaseException, width: int = 200) -> str:
    """An exception's message on one line, at most ``width`` characters (never formats more
    than the exception already holds)."""
    try:
        text = str(exc)
    except Exception:
        text = ""
    text = " ".join(text[:4 * width].split())
    return text if len(text) <= width else text[:width - 3] + "..."
