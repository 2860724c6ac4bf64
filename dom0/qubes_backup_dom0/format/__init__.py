"""The backup format, independent of Qubes: crypto, header, manifest, chunking, inner and outer tar, names."""
