"""onnx-graphsurgeon, imported only where a graph is rewritten (export, precision lowering)."""


def quiet_graphsurgeon():
    """onnx-graphsurgeon, logging errors only (its warnings are about our own naming)."""
    import onnx_graphsurgeon as gs
    from onnx_graphsurgeon.logger import G_LOGGER

    G_LOGGER.severity = G_LOGGER.ERROR
    return gs
