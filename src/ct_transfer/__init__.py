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

# The public names load on first use (PEP 562): `import ct_transfer` and `ct-transfer --help` stay
# fast (torch, timm and scipy take seconds to import), while `ct.fit`, `ct.Run`... work as before.
_EXPORTS = {
    "TrainConfig": "config", "fit": "engine", "Callback": "engine", "EarlyStopping": "engine",
    "StopWhen": "engine", "TimeToAccuracy": "engine", "Preprocess": "data", "read_image": "data",
    "make_split": "data", "read_split": "data", "scan_folder": "data", "write_split": "data",
    "ConfigError": "errors", "CTTransferError": "errors", "MODEL_TABLE": "models", "create_model": "models",
    "resolve_model": "models", "Prediction": "run", "Run": "run", "load_run": "run",
}
_RENAMED = {"resolve_model": "resolve"}

__version__ = "0.2.0"

__all__ = [
    "TrainConfig", "fit", "Run", "load_run", "Prediction", "create_model", "resolve_model", "MODEL_TABLE",
    "Preprocess", "read_image", "scan_folder", "make_split", "read_split", "write_split",
    "Callback", "EarlyStopping", "StopWhen", "TimeToAccuracy", "CTTransferError", "ConfigError", "__version__",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ct_transfer' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), _RENAMED.get(name, name))
    globals()[name] = value  # looked up once
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
