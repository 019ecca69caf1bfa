"""`tunelab board`: a Gradio browser UI over the runs folder.

Tabs: Results (a store's quality table, claims and plots), Examples (predictions side by side per
example), Launch (a run or grid from a form, watched from its files on disk) and Playground (one
prompt to several adapters through the serving generation path). The data functions live in
``results``, ``examples``, ``forms``, ``jobs`` and ``playground`` and import no Gradio; the UI is in
``ui/``, assembled by ``app.build_app``.
"""
