"""Turning a run directory's files into what a person reads: figures, and self-contained HTML pages (the report
stage's report.html and `loralab compare`'s page)."""
