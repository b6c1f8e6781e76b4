"""layerstream.proto"""
