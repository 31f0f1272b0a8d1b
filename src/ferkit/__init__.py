"""ferkit: facial expression recognition on FER-2013, from training to reading emotions in photos."""

__version__ = "0.1.0"
