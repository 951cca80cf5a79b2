"""Trust fitting: temperatures, per-condition calibration, OOD statistics, conformal thresholds, the
not-dermoscopy head and the refer thresholds, fitted from model outputs of the inference layer
(dermlens.infer, which applies them at prediction time). scipy / scikit-learn when fitting.
"""
