"""Click front end for dsgonnx, installed as the ``dsgonnx_cli`` package (see README)."""
