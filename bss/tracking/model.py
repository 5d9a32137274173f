"""The final model as an MLflow model: a small pyfunc around the ``best.pt`` checkpoint.

The checkpoint is logged as an artifact (a state_dict and its config, loaded with
``weights_only=True``, never a pickled model); :class:`SegmentationModel` rebuilds the network
from that config when MLflow loads it, and predicts exactly as ``drivers/predict.py``::

    model = mlflow.pyfunc.load_model("models:/bss-obstacle@best")
    masks = model.predict(rgb)     # uint8 (H, W, 3) or (N, H, W, 3) -> uint8 (N, H, W), 0/255
"""

from __future__ import annotations

import contextlib
import io

import mlflow.pyfunc
import numpy as np

# MLflow suggests type hints on predict for its input validation (and forces that warning on,
# once); images are arrays, which its type-hint validation does not take, so predict checks its
# input itself and the suggestion is not printed
with contextlib.redirect_stderr(io.StringIO()):

    class SegmentationModel(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            from bss.inference import Predictor

            self.predictor = Predictor.from_checkpoint(context.artifacts["checkpoint"], device="cpu")

        def predict(self, context, model_input, params=None):
            """RGB uint8 images (one (H, W, 3) or a batch (N, H, W, 3), or a list of them) -> their
            masks, 0/255 at each image's own size, thresholded at the checkpoint's threshold."""
            images = [model_input] if isinstance(model_input, np.ndarray) and model_input.ndim == 3 else list(model_input)
            threshold = (params or {}).get("threshold", self.predictor.config.threshold)
            masks = [(self.predictor.predict_image(np.asarray(image, dtype=np.uint8)) > threshold).astype(np.uint8) * 255 for image in images]
            return np.stack(masks) if len({m.shape for m in masks}) == 1 else masks


def log_segmentation_model(uri: str, checkpoint: str, run_id: str, registered_name: str, alias: str) -> str:
    """Log ``checkpoint`` under ``run_id`` as a pyfunc model, register it as ``registered_name``
    and point ``alias`` at the new version; returns the version."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    requirements = ["bss", "torch", "segmentation-models-pytorch", "numpy", "opencv-python-headless"]
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=SegmentationModel(),
            artifacts={"checkpoint": str(checkpoint)},
            registered_model_name=registered_name,
            pip_requirements=requirements,
        )
    version = str(info.registered_model_version)
    MlflowClient(uri).set_registered_model_alias(registered_name, alias, version)
    return version
