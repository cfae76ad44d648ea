"""ct-transfer: CT-scan classification by transfer learning (Pardede & Purohita 2023, and beyond).

The public door. A notebook does the whole job in a few lines::

    import ct_transfer as ct
    run = ct.fit(ct.TrainConfig(data="../shared/datasets/sarscov2-ct", model="EfficientNetLite0",
                                weights="imagenet", epochs=3))      # out=None: nothing written
    run.metrics["test"]["accuracy"]
    run.predict(["scan.png", "slice.dcm", numpy_array, pil_image])  # [Prediction(label, {class: p}, shift_score, in_distribution)]
    run.explain("scan.png", method="gradcam")                       # heat map + overlay
    run.save("runs/lite0"); run = ct.load_run("runs/lite0"); run.export("model.onnx")

The flow: ``data`` → ``models`` → ``engine`` (``fit``) → ``evaluate`` → ``run`` (predict, explain,
export) → ``experiment`` / ``report``; ``cli`` is a thin layer over these.
"""

from .config import TrainConfig
from .data import Preprocess, make_split, read_image, read_split, scan_folder, write_split
from .engine import Callback, EarlyStopping, StopWhen, TimeToAccuracy, fit
from .errors import ConfigError, CTTransferError
from .models import MODEL_TABLE, create_model, resolve as resolve_model
from .run import Prediction, Run, load_run

__version__ = "0.2.0"

__all__ = [
    "TrainConfig", "fit", "Run", "load_run", "Prediction", "create_model", "resolve_model", "MODEL_TABLE",
    "Preprocess", "read_image", "scan_folder", "make_split", "read_split", "write_split",
    "Callback", "EarlyStopping", "StopWhen", "TimeToAccuracy", "CTTransferError", "ConfigError", "__version__",
]
