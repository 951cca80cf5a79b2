"""Prediction outside the HTTP service: folders of images (one process or Ray), the typed patient fields
people give, and the DICOM SR writer. Torch-free."""
