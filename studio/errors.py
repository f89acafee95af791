"""Errors the studio raises on bad input. Each message says what is wrong and what would fit."""


class StudioError(ValueError):
    """Base class of every error caused by user input (configs, files, images, mixes)."""


class PresetError(StudioError):
    """A model preset that does not exist or is malformed."""


class CheckpointError(StudioError):
    """An adapter checkpoint that is unreadable, truncated or made for another base model."""


class MixError(StudioError):
    """A mix description of a wrong version or shape."""


class IncompatibleAdapterError(CheckpointError):
    """An adapter whose shapes do not fit the UNet it is attached to."""
