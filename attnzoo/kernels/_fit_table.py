FIT = {}
