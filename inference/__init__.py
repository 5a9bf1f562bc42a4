"""What a trained EfficientNet is used for: load any weights for inference (``loading``), name
its classes (``class_names``), export it (``export``: SavedModel, TFLite, ONNX). Never imported
by a training run."""
