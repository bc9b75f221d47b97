"""ecgfm.explain"""
