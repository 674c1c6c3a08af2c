"""Weights in and out: `importer` (Keras, timm, torchvision, BiT .npz -> a jaxres run),
`exporter` (a run -> timm / torchvision state dicts, a `jax.export` serving artifact) and
`formats` (each format's reader, name map and layout, shared by both directions)."""
