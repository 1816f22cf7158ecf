"""kflift: lift an image classifier with a Kubeflow pipeline."""
__version__ = "0.1.0"
