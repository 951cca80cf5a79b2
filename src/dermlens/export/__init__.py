"""Export stage: a trained checkpoint -> a bundle's ONNX graphs (fp32 + int8 with its fall-back search),
model.pt and card.json. Needs torch, onnx and onnxruntime (the `train` extra). Trust statistics are fitted
afterwards by dermlens.trust on the precision that will be served (dermlens.pipeline.bundle runs both)."""

from dermlens.errors import ExportError  # noqa: F401 (re-exported)
