"""Training: config, augmentation, losses, sampling, Lightning data/module, engine, feature-proxy ablation."""
