"""dermlens: dermoscopic skin-lesion classification. Research software, not a medical device."""

__version__ = "0.1.0"

DISCLAIMER = (
    "dermlens is research software. It is not a medical device and its output is not a diagnosis. "
    "Any lesion of concern must be examined by a dermatologist."
)


def load(bundle=None, precision=None, threads=None):
    """Open a model bundle (None: the packaged release): `.predict(image, age=, sex=, site=)` returns a
    Prediction, `.predict_folder(folder)` one per image. See dermlens.predict.api."""
    from dermlens.predict.api import load as _load

    return _load(bundle, precision, threads)


__all__ = ["DISCLAIMER", "__version__", "load"]
