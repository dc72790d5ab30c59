"""Transfer to dense tasks: detection and segmentation models built from the checkpoint's
backbone, their training data pipelines and inference."""
