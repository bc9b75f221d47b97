"""ecgfm.data.readers"""
