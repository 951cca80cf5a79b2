"""dermlens: dermoscopic skin-lesion classification. Research software, not a medical device."""

__version__ = "0.1.0"

DISCLAIMER = (
    "dermlens is research software. It is not a medical device and its output is not a diagnosis. "
    "Any lesion of concern must be examined by a dermatologist."
)
