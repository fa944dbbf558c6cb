"""Test bed for tests, benchmarks and the demo: a real local registry and images built and pushed without Docker."""

from fastpull.testbed.images import (
    BuiltImage,
    Descriptor,
    LayerDescriptor,
    LayerSpec,
    Platform,
    build_image,
    build_index,
    push_image,
    push_index,
)
from fastpull.testbed.registry import LocalRegistry, LocalRegistryError, ServedRequest

__all__ = [
    "BuiltImage",
    "Descriptor",
    "LayerDescriptor",
    "LayerSpec",
    "LocalRegistry",
    "LocalRegistryError",
    "Platform",
    "ServedRequest",
    "build_image",
    "build_index",
    "push_image",
    "push_index",
]
