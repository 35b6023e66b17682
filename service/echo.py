"""Client-sent values quoted in status messages, bounded.

A status message travels in the grpc-message trailer, percent-encoded, and clients refuse trailers over their metadata
limit (8 KiB by default) with RESOURCE_EXHAUSTED, which hides the code we meant. So every value a client chose (model
name, version, datatype, tensor name, shape) is quoted through `echo`, and `bounded` caps a whole message as the last
step before it is sent, for any message that quotes client input some other way.
"""

ECHO_CHARS = 64  # of a quoted value; enough to recognise a typo
MESSAGE_CHARS = 1024  # of a whole message, after escaping to ASCII (so percent-encoding cannot grow it)


def echo(value: object) -> str:
    """`value` as Python's ascii() quotes it, cut to ECHO_CHARS characters with the length of what was left out."""
    text = ascii(value)
    if len(text) <= ECHO_CHARS:
        return text
    return f"{text[:ECHO_CHARS]}... ({len(text) - ECHO_CHARS} more characters)"


def bounded(message: str) -> str:
    """`message` in ASCII (other characters backslash-escaped), cut to MESSAGE_CHARS characters."""
    text = message.encode("ascii", "backslashreplace").decode("ascii")
    if len(text) <= MESSAGE_CHARS:
        return text
    return f"{text[:MESSAGE_CHARS]}... ({len(text) - MESSAGE_CHARS} more characters)"
