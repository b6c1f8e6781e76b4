"""layerstream.compute"""
