"""The champion as an MLflow pyfunc model, written as "models from code": MLflow copies this file
into the model (serve.save_mlflow_model) and runs it when the model loads, e.g. in
`mlflow models serve` or `mlflow.pyfunc.load_model("models:/kflift-classifier@champion")`.

Input: a DataFrame with a column `image` of encoded images (JPEG, PNG, GIF, BMP, WebP) as bytes;
in the JSON of /invocations as base64 strings, which the scoring server decodes by the model's
signature (`{"dataframe_split": {"columns": ["image"], "data": [["<base64>"], ...]}}` or
`{"dataframe_records": [{"image": "<base64>"}, ...]}`; a base64 string reaching `predict` any other
way is decoded here). Output: one row per image with `label`, `probability` (the label's),
`probability_<class>` for every class, and `error`: null, or why that image could not be
classified (then its other columns are null); one bad image never fails the others.

It needs MLflow, pandas, NumPy and TensorFlow only (not kflift, not tf.Transform): the scorer is
the copy of components/serve.py saved with the model as `kflift_serve` (its code_paths).
"""
import base64
import binascii

import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

try:
    from kflift_serve import Scored, Scorer  # the copy saved with the model (code_paths)
except ImportError:  # MLflow runs this file once while saving it, inside kflift
    from kflift.components.serve import Scored, Scorer


def class_columns(classes) -> list[str]:
    return [f"probability_{c}" for c in classes]


def _image_bytes(value) -> bytes | Scored:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=False)
        except (binascii.Error, ValueError) as exc:
            return Scored(error=f"image is a string but not base64: {exc}")
    return Scored(error=f"no image bytes (got {type(value).__name__})")


class ChampionModel(PythonModel):
    def load_context(self, context):
        self.scorer = Scorer(context.artifacts["serving"])
        if self.scorer.classes is None:
            raise ValueError("the serving SavedModel names no classes: export it again (kflift run)")
        self.columns = ["label", "probability", *class_columns(self.scorer.classes), "error"]

    def predict(self, context, model_input: pd.DataFrame, params=None):
        if isinstance(model_input, dict):
            model_input = pd.DataFrame(model_input)
        column = model_input["image"] if isinstance(model_input, pd.DataFrame) else pd.Series(model_input)
        values = [_image_bytes(v) for v in column]
        scored = iter(self.scorer.score([v for v in values if isinstance(v, bytes)]))
        rows = []
        for value in values:
            s = next(scored) if isinstance(value, bytes) else value
            rows.append([s.label, s.probability, *(s.probabilities or [None] * len(self.scorer.classes)), s.error])
        frame = pd.DataFrame(rows, columns=self.columns, index=column.index)
        if frame["error"].notna().any():  # null, not NaN (which is not JSON), in the failed rows
            frame = frame.astype(object).where(frame.notna(), None)
        return frame


set_model(ChampionModel())
