"""Weights in: `importer` (Keras, timm, torchvision, BiT .npz -> a jaxres run) and `formats`
(each format's reader and name map)."""
