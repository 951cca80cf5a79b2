"""Model: timm backbone, ImageNet weight loading and the two-level (fine + benign/malignant) network."""
