"""The history report: plots drawn here (matplotlib, Agg) and embedded in one offline HTML page.

DVC's own plot page loads its renderer from a CDN and is blank offline; this page has no script
and no external reference at all: every figure is a base64 PNG inside the file.
"""
