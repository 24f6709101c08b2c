"""Similar photos: embeddings of the catalogue, exact search over them, and the catalogue audit.

features (embed a catalogue), embedding_index (the index folder and search), similar, audit (likely
mislabelled listings, categories that mix), findings (what the audit finds), audit_report (its files).
"""
