"""Triton python-backend model that runs ONNX Runtime on the ``model.onnx`` beside it.

Copied as ``<model>/<version>/model.py`` into the local serving repository (the Triton bundled in
nvidia-pytriton has only the python backend). It keeps the ONNX model's names, shapes, dtypes and
batching: the requests of one dynamic batch are concatenated into a single ONNX Runtime run.
Only the standard library, numpy and onnxruntime are imported: it runs inside Triton's stub process.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = config.get("parameters", {})
        threads = int(params.get("ort_intra_op_threads", {}).get("string_value", "1"))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        spinning = params.get("ort_allow_spinning", {}).get("string_value", "0")
        opts.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        sizes = np.cumsum([len(a) for a in arrays])[:-1]
        batch = np.ascontiguousarray(np.concatenate(arrays), dtype=np.float32)
        out = self.session.run([self.output_name], {self.input_name: batch})[0]
        return [pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, chunk)])
                for chunk in np.split(out, sizes)]
