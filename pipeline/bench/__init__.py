"""Programs that measure the library, apart from it: nothing in ``pipeline`` imports them.

endtoend    ``make bench`` (``python -m pipeline.bench``): the two-stage design against the classic loop,
            extraction against the bare forward, heads and memory, on the CPU
heads       heads on features of real images (augmented digits through ImageNet MobileNetV2)
fidelity    feature agreement of every preprocessing path and precision against PIL fp32
gpu         ``make bench-gpu``: the GPU path against its ceilings, in under 5 minutes
audit       the audit's passes on 50,000 x 512 and 100,000 x 2,048 real-image features; planted faults
demo_data   how the committed demo images (``data/digits``) were made
"""
