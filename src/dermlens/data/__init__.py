"""Data layer: readers, label taxonomy, validation, splits and the decoded-image cache."""
