"""Everything checkable before training, every problem at once, each naming the field and the fix.

Reads config, search, train and evaluate helpers; writes nothing and starts nothing.
"""
