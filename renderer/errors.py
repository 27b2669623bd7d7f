"""Domain errors of the render core. The servicer maps them to status codes in one place.

`InvalidArgument` and its subclasses name the offending field (`composition.texts[2].text`), so the
servicer can answer INVALID_ARGUMENT with a `google.rpc.BadRequest` field violation. Failures of the render
itself are `renderer.domain.RenderError` (not defined here: the domain owns it).
"""

from __future__ import annotations


class InvalidArgument(ValueError):
    """Malformed input, named by its field path. Maps to INVALID_ARGUMENT."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class SourceNotFound(InvalidArgument):
    """A clip or audio source that does not exist (missing file or s3 object). Maps to INVALID_ARGUMENT."""


class SourceRefused(InvalidArgument):
    """A source the renderer will not read: outside the asset roots, a symlink escaping them, a bucket not
    on the allow-list, an unsupported file type. Maps to INVALID_ARGUMENT."""
