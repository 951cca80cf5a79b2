"""Inference layer, torch-free: a bundle's ONNX session, input preprocessing, the trust state and the
Predictor that applies calibration, OOD, refer rule, conformal sets, TTA and CAM (numpy + Pillow).

Every stage that scores images (export, evaluate, trust fitting, distillation, serve) calls this layer.
"""
