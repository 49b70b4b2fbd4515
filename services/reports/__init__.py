"""Figures (matplotlib, Agg, PNG) and self-contained reports (Markdown, HTML) of dosebench results.

Each figure function returns PNG bytes; its ``*_data`` twin returns the numbers it plots, which the
evaluate stage writes as JSON beside the PNG so that every plotted value can be checked.
"""
