"""The one error type for frames the bridge cannot use."""


class FrameError(ValueError):
    """A frame that cannot be used. ``kind`` is one of :attr:`KINDS`; the text says why."""

    KINDS = ("too-large", "not-json", "not-object", "unknown-mt", "invalid")

    def __init__(self, kind: str, detail: str) -> None:
        assert kind in self.KINDS, kind
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
