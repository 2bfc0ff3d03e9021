"""The export layer: the packed ``.qdz`` writer (`packed`, with the layer plan and
threshold folding in `plan`) and the ONNX exporter (`onnx`)."""
