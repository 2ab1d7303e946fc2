"""stitchkit: controlled experiments on how vision models and VLMs stitch information together."""

__version__ = "0.1.0"
