"""The MLflow pyfunc of an AlignLab export, logged "from code" by
:func:`alignlab.platform.export.log_model`: MLflow stores this file beside the export folder
(artifact ``export``) and runs it when loading, so nothing is pickled; the weights are the
export's safetensors file. Loading it needs AlignLab installed.

``predict`` takes a pandas DataFrame, one item (or aligned pair) per row, with the columns the
model reads (the logged signature lists them; every row of a frame has the same columns):

* image side: ``image`` (encoded bytes) for a pixel model; ``region_features`` (K x D),
  ``boxes`` (K x 4) and, where the model reads them, ``tags`` (K names) for a region model;
* text side: ``text`` (a string), with ``phrases`` (word tuples) or ``text_features`` where the
  model reads them (see :class:`~alignlab.platform.export.Processor`).

It returns a DataFrame of ``image_embedding`` and / or ``text_embedding`` (unit-norm lists of
floats, one per row, for the sides given) and, when both sides are given and the model has an
ITM head, ``match_score`` (each row's image against its text).
"""
from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class AlignLabEmbedder(PythonModel):
    def load_context(self, context) -> None:
        from alignlab.models.pretrained import from_pretrained
        from alignlab.platform.export import Processor

        folder = context.artifacts["export"]
        self.model, self.processor = from_pretrained(folder), Processor.from_pretrained(folder)

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        def column(name):
            return list(model_input[name]) if name in model_input.columns else None

        regions = None
        if "region_features" in model_input.columns:
            tags = column("tags") or [()] * len(model_input)
            regions = [{"features": [list(r) for r in f], "boxes": [list(b) for b in boxes], "tags": list(t)}
                       for f, boxes, t in zip(column("region_features"), column("boxes"), tags)]
        images, texts = column("image"), column("text")
        phrases = column("phrases")
        batch = self.processor(images=images, texts=texts, regions=regions,
                               phrases=[[list(p) for p in row] for row in phrases] if phrases is not None else None,
                               text_features=column("text_features"))
        out = {}
        with torch.no_grad():
            if images is not None or regions is not None:
                out["image_embedding"] = self.model.embed_images(batch).float().tolist()
            if texts is not None:
                out["text_embedding"] = self.model.embed_texts(batch).float().tolist()
            if len(out) == 2:
                scores = self.model.match_scores(batch, batch)
                if scores is not None:
                    out["match_score"] = scores.double().tolist()
        return pd.DataFrame(out)


mlflow.models.set_model(AlignLabEmbedder())
