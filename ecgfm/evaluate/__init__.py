"""ecgfm.evaluate"""
