"""layerstream.coordinator"""
