"""The sweep file: its pydantic schema, loading, and where shipped YAML lives.

Imports nothing else of qsweep: every other stage reads its inputs from here.
"""
