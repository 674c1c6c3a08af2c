"""Benchmarks behind `scripts/benchmark.py`; results and how they were taken live in `benchmarks/`.

`steps`: train / infer / e2e step throughput of jaxres, appended to
`benchmarks/results.jsonl` and rendered as markdown; `torch_ref`: the PyTorch
reference side of the train / infer comparison, timed the same way; `input`:
the input pipeline (our transforms and grain vs tf.data vs plain PIL,
`benchmarks/input.md`); `probe`: the linear probes vs scikit-learn and
feature extraction vs torchvision / Keras (`benchmarks/probe.md`).
"""
