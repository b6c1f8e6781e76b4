"""layerstream.loader"""
